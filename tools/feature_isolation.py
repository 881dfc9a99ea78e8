r"""Are a transfer bench's poisons isolated in the frozen extractor's feature space?

For every trial of an ``epic bench`` folder of a transfer config, computes the penultimate
features of the poisoned training set with the bench's surrogate (the frozen extractor), scores
every example by how isolated it is within its labelled class, and counts the poisons among the
top ``--top`` share of the scores. A defense that drops that share can at best catch that many.

    python tools/feature_isolation.py --bench runs/bench/cpu-cifar10-transfer [--top 0.03] \
        [--k 10 30 50]

Scores (Euclidean distances between features; ``d_k`` is the distance to the k-th nearest
example of the same label, ``a_k`` to the k-th nearest of any label):
``iso{k}`` = ``d_k``; ``ratio{k}`` = ``d_k / a_k``; ``drop5-{k}`` = ``d_k / d_5`` (a tight group
far from the rest of its class); ``disagree{k}``: share of the k nearest with another label;
``group{k}``: the larger of the percentile ranks of ``drop5-{k}`` and ``ratio{k}``
(:func:`epic.selection.group_isolation`, what ``epic-plus`` ranks by default).

With ``--label-scores`` it also ranks by how badly a linear classifier reads each example's
label: ``head-loss``, the cross-entropy under the extractor's own head (which a transfer
victim does not have: it trains a new head), and ``oof-loss``, under a logistic regression
fit on the other folds of the poisoned set (5-fold, scikit-learn), as label-noise detectors
do; ``reference-loss``, under a linear head fit on the examples whose 200 nearest neighbours
mostly carry their label (:func:`epic.selection.reference_loss`), and ``group30+reference``,
the larger of its percentile rank and ``group30``'s (what ``epic-plus`` with
``reference=True`` ranks by).

With ``--squeeze Q [Q ...]`` it also ranks by ``squeeze{Q}``, how far each example's features
move on a JPEG copy of its image at quality Q (:func:`epic.defenses.epic_plus.squeeze_shift`),
and by ``group30+squeeze{Q}``, the larger of its percentile rank and ``group30``'s (what
``epic-plus`` with ``squeeze=Q`` ranks by). ``Q1+Q2`` (e.g. ``70+90``) ranks by
``group30+squeeze{Q1+Q2}``, the largest of ``group30``'s rank and each quality's.

Per trial it also reports how many poisons ``group30`` flags, the poisons' median percentile
under it, and the share of poisons that the extractor's own head (the pretrained model's)
assigns to a class other than their label: poisons still read as their label have not moved
away from it, and no within-class score can set them apart. And where the trial sits
(:func:`poison_geometry`): how far the poisons' features moved from their clean images', how
far the target sits from the adversarial class, and how close the poisons' mean came to it;
a target near the adversarial class needs poisons that barely move, which no score sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _bench import open_bench  # noqa: E402
from _common import print_table, save  # noqa: E402
from epic.data import PoisonSet, jpeg_compress, splice_poisons  # noqa: E402
from epic.defenses.epic_plus import squeeze_shift, with_rank, with_reference  # noqa: E402
from epic.models.features import forward_with_features  # noqa: E402
from epic.selection import group_isolation, reference_loss  # noqa: E402

KS = (10, 30, 50)


def scores(features: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = KS
           ) -> dict[str, torch.Tensor]:
    """Every isolation score of the module docstring for every ``k`` of ``ks``."""
    d = torch.cdist(features, features).fill_diagonal_(float("inf"))
    same = labels[:, None] == labels[None, :]
    kmax = max(ks)
    own = d.masked_fill(~same, float("inf")).topk(kmax, largest=False).values
    near, idx = d.topk(kmax, largest=False)
    out = {}
    for k in ks:
        out[f"iso{k}"] = own[:, k - 1]
        out[f"ratio{k}"] = own[:, k - 1] / near[:, k - 1]
        out[f"drop5-{k}"] = own[:, k - 1] / own[:, 4]
        out[f"disagree{k}"] = (labels[idx[:, :k]] != labels[:, None]).float().mean(1)
        out[f"group{k}"] = group_isolation(features, labels, k=k)
    return out


def label_scores(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, *,
                 group: torch.Tensor | None = None, folds: int = 5, seed: int = 0
                 ) -> dict[str, torch.Tensor]:
    """The ``--label-scores``: the label's cross-entropy under the extractor's own head
    (``logits``), under an out-of-fold logistic regression on the standardised features, and
    under :func:`~epic.selection.reference_loss`'s head (alone and with ``group``, the
    ``group30`` score, computed here when not given)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x = features.double().numpy()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = labels.numpy()
    proba = cross_val_predict(LogisticRegression(max_iter=300), x, y, method="predict_proba",
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    oof = -np.log(proba[np.arange(len(y)), y] + 1e-12)
    ref = reference_loss(features, labels)
    if group is None:
        group = group_isolation(features, labels, k=30)
    return {"head-loss": -logits.log_softmax(1).gather(1, labels[:, None]).squeeze(1),
            "oof-loss": torch.from_numpy(oof).float(), "reference-loss": ref,
            "group30+reference": with_reference(group, ref)}


def poison_geometry(poisons: PoisonSet, base_images: torch.Tensor, feats: torch.Tensor,
                    labels: torch.Tensor, is_poison: torch.Tensor, extract
                    ) -> dict[str, float]:
    """Where one trial's poisons and target sit in the feature space. ``base_images``: the
    clean images the poisons were made from; ``feats``: the poisoned training set's features;
    ``extract``: images to features. ``poison_move``: the mean distance of a poison's features
    from its base image's; ``target_to_adv_class``: the target's distance from the mean feature
    of the adversarial class's clean examples (a target near that class needs poisons that
    move little); ``poison_mean_to_target``: the poisons' mean feature's distance from the
    target's (what Bullseye minimises)."""
    target = extract(poisons.target_image[None])[0]
    moved = (feats[poisons.base_indices] - extract(base_images)).norm(dim=1).mean()
    adv = feats[(labels == poisons.adv_label) & ~is_poison].mean(0)
    return {"poison_move": float(moved), "target_to_adv_class": float((target - adv).norm()),
            "poison_mean_to_target": float((feats[is_poison].mean(0) - target).norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="an epic bench folder (transfer config)")
    parser.add_argument("--top", type=float, default=0.03, help="share of examples flagged")
    parser.add_argument("--seed", type=int, default=0, help="the bench seed")
    parser.add_argument("--k", type=int, nargs="+", default=list(KS),
                        help=f"the far neighbours scored (default {' '.join(map(str, KS))})")
    parser.add_argument("--label-scores", action="store_true",
                        help="also rank by the label's loss under the extractor's own head, "
                             "an out-of-fold logistic regression and reference_loss's head")
    parser.add_argument("--squeeze", nargs="+", default=[], metavar="Q",
                        help="also rank by the features' move on a JPEG copy at quality Q "
                             "(1-100), alone and with group30; Q1+Q2: with group30, the "
                             "largest of the ranks at each quality")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if min(args.k) < 6:
        parser.error("--k values must be >= 6: the scores compare with the 5th neighbour")
    try:
        combos = [tuple(int(q) for q in spec.split("+")) for spec in args.squeeze]
    except ValueError:
        parser.error("--squeeze values must be JPEG qualities, 1-100, or joined by '+'")
    if any(not 1 <= q <= 100 for combo in combos for q in combo):
        parser.error("--squeeze values must be JPEG qualities, 1-100")
    qualities = sorted({q for combo in combos for q in combo})
    torch.set_num_threads(1)
    bench = open_bench(args.bench, args.seed)
    counts: dict[str, list[int]] = {}
    trials: list[dict[str, float]] = []
    files = sorted(bench.folder.glob(f"poisons/*/seed{args.seed}/trial-*/poisons.npz"))

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return tuple(torch.cat(t) for t in zip(*[  # type: ignore[return-value]
                forward_with_features(bench.surrogate, x.float() / 255)
                for x in images.split(500)], strict=True))

    for path in files:
        poison_set = PoisonSet.load(path)
        poisoned, is_poison = splice_poisons(bench.train, poison_set)
        logits, feats = forward(poisoned.images)
        geometry = poison_geometry(poison_set, bench.train.images[poison_set.base_indices],
                                   feats, poisoned.labels, is_poison, lambda x: forward(x)[1])
        flagged = int(round(args.top * len(feats)))
        ranked = scores(feats, poisoned.labels, tuple(args.k))
        group = ranked.get("group30")  # computed there unless --k leaves 30 out
        if group is None:
            group = group_isolation(feats, poisoned.labels, k=30)
        if args.label_scores:
            ranked.update(label_scores(feats, logits, poisoned.labels, group=group))
        shifts = {q: squeeze_shift(feats, forward(jpeg_compress(poisoned.images, q))[1])
                  for q in qualities}
        folded = {q: with_rank(group, shift) for q, shift in shifts.items()}
        for combo in combos:
            name = "+".join(map(str, combo))
            if len(combo) == 1:
                ranked[f"squeeze{name}"] = shifts[combo[0]]
            ranked[f"group30+squeeze{name}"] = torch.stack([folded[q] for q in combo]).amax(0)
        for name, score in ranked.items():
            top = score.topk(flagged).indices
            counts.setdefault(name, []).append(int(is_poison[top].sum()))
        rank = group.argsort().argsort().float() / max(len(group) - 1, 1)
        off = logits.argmax(1) != poisoned.labels
        trials.append({"trial": int(path.parent.name.split("-")[-1]),
                       "group30_flagged": int(is_poison[group.topk(flagged).indices].sum()),
                       "poison_median_percentile": float(rank[is_poison].median()),
                       "poisons_off_label": float(off[is_poison].float().mean()),
                       "clean_off_label": float(off[~is_poison].float().mean()), **geometry})
    poisons = int(is_poison.sum())
    rows = [{"score": name, "mean_poisons_flagged": sum(c) / len(c),
             "trials_with_80pct": sum(x >= 0.8 * poisons for x in c), "per_trial": c}
            for name, c in counts.items()]
    print(f"{len(files)} trials, {poisons} poisons each, top {args.top:.0%} flagged")
    print_table(["score", "mean poisons flagged", "trials >= 80% flagged"],
                [[r["score"], f"{r['mean_poisons_flagged']:.1f}", r["trials_with_80pct"]]
                 for r in rows])
    print_table(["trial", "group30 flagged", "poisons' median percentile",
                 "poisons off their label", "clean off their label", "poisons' move",
                 "target to adversarial class", "poisons' mean to target"],
                [[t["trial"], t["group30_flagged"], f"{t['poison_median_percentile']:.3f}",
                  f"{t['poisons_off_label']:.0%}", f"{t['clean_off_label']:.0%}",
                  f"{t['poison_move']:.2f}", f"{t['target_to_adv_class']:.2f}",
                  f"{t['poison_mean_to_target']:.2f}"] for t in trials])
    path = save("feature_isolation", {"rows": rows, "trials": trials,
                                      "bench": str(bench.folder)}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
