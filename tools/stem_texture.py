r"""Do a bench's poisons stand out in first-layer texture, and does EPIC-plus's class test see it?

For the training split without poisons and for every trial of an ``epic bench`` folder,
computes with the bench's first surrogate (the frozen extractor in transfer, the starting
model in fine-tuning; from scratch a model of the victims' recipe, not a victim) the
first-layer statistics of every training example (:func:`epic.models.capture_stem_stats`)
and the penultimate features, and reports:

* the class test of ``epic-plus``'s ``stem="auto"``: the class that holds the most of the top
  1% of :func:`~epic.defenses.epic_plus.stem_isolation` against its share of the set, its
  count, and the log10 of its one-sided binomial tail (the test fires below log10 1e-5 = -5);
* how many poisons the top ``--top`` share holds under the texture rank alone, the group score
  alone (:func:`~epic.selection.group_isolation`, ``k`` 30) and the rank ``epic-plus`` uses
  (the larger of the two in the class the test names, the group score elsewhere).

    python tools/stem_texture.py --bench runs/bench/dgm-all [--top 0.03] [--trials N]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _bench import open_bench  # noqa: E402
from _common import print_table, save  # noqa: E402
from epic.data import PoisonSet, splice_poisons  # noqa: E402
from epic.defenses.epic_plus import (  # noqa: E402
    class_concentration,
    stem_isolation,
    with_texture,
)
from epic.models import capture_stem_stats, forward_with_features  # noqa: E402
from epic.selection import group_isolation  # noqa: E402


def class_test(texture: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, float]:
    """(class, its count among the top 1%, log10 of its binomial tail) for the class with the
    smallest tail (:func:`~epic.defenses.epic_plus.class_concentration`); (-1, 0, 0.0) if
    none."""
    found = class_concentration(texture, labels)
    return (-1, 0, 0.0) if found is None else (found[0], found[1], found[2] / math.log(10))


def view(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First-layer statistics and penultimate features of uint8 ``images``."""
    stats, feats = [], []
    with torch.no_grad():
        for x in images.split(500):
            with capture_stem_stats(model) as cap:
                _, f = forward_with_features(model, x.float() / 255)
            stats.append(cap.stats())
            feats.append(f)
    return torch.cat(stats), torch.cat(feats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="an epic bench folder")
    parser.add_argument("--top", type=float, default=0.03, help="share of examples flagged")
    parser.add_argument("--seed", type=int, default=0, help="the bench seed")
    parser.add_argument("--trials", type=int, default=None, help="only the first N trials")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = open_bench(args.bench, args.seed)
    model = bench.surrogate
    stats, _ = view(model, bench.train.images)
    clean = class_test(stem_isolation(stats, bench.train.labels), bench.train.labels)
    print(f"clean training split: class {clean[0]}, {clean[1]} of the top 1%, "
          f"log10 tail {clean[2]:.1f}")
    files = sorted(bench.folder.glob(f"poisons/*/seed{args.seed}/trial-*/poisons.npz"),
                   key=lambda p: int(p.parent.name.split("-")[-1]))[:args.trials]
    rows = []
    for path in files:
        poisoned, is_poison = splice_poisons(bench.train, PoisonSet.load(path))
        labels = poisoned.labels
        stats, feats = view(model, poisoned.images)
        texture, group = stem_isolation(stats, labels), group_isolation(feats, labels, k=30)
        named, count, tail = class_test(texture, labels)
        used, _ = with_texture(group, texture, labels)  # what epic-plus ranks by default
        flagged = int(round(args.top * len(labels)))
        caught = {k: int(is_poison[s.topk(flagged).indices].sum())
                  for k, s in (("texture", texture), ("group", group), ("epic-plus", used))}
        rows.append({"trial": int(path.parent.name.split("-")[-1]),
                     "poison_class": int(labels[is_poison][0]), "named_class": named,
                     "count": count, "log10_tail": tail, "poisons": int(is_poison.sum()),
                     **caught})
    print_table(["trial", "poisons' class", "class named", "of the top 1%", "log10 tail",
                 f"poisons in top {args.top:.0%}: texture", "group", "epic-plus"],
                [[r["trial"], r["poison_class"], r["named_class"], r["count"],
                  f"{r['log10_tail']:.1f}", f"{r['texture']}/{r['poisons']}", r["group"],
                  r["epic-plus"]] for r in rows])
    if rows:
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("texture", "group", "epic-plus")}
        fired = sum(r["log10_tail"] < -5 and r["named_class"] == r["poison_class"] for r in rows)
        print(f"{len(rows)} trials: the test names the poisons' class in {fired}; mean poisons "
              f"in the top {args.top:.0%}: texture {mean['texture']:.1f}, group "
              f"{mean['group']:.1f}, epic-plus {mean['epic-plus']:.1f}")
    path = save("stem_texture", {"clean": clean, "rows": rows, "bench": str(bench.folder)},
                args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
