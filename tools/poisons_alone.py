r"""Do a bench's poisons work on their own surrogate? A check of the attack, not of a victim.

For each trial of an ``epic bench`` folder, copies the bench's surrogate, takes ``--steps``
full-batch SGD steps (``--lr``) on the poisons alone, and reports the target's adversarial
loss and prediction before and after; the same steps on the poisons' unperturbed base images
are the control. Poisons that flip the target here but not in the bench's victims are a
property of the victims' training (clean data, other seeds), not a bug of the attack.

    python tools/poisons_alone.py --bench runs/bench/pilot-gm-digits
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _bench import open_bench  # noqa: E402
from _common import print_table, save  # noqa: E402
from epic.data import PoisonSet  # noqa: E402


def train_on(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             target: torch.Tensor, adv: int, *, steps: int, lr: float) -> tuple[float, int]:
    """The target's adversarial loss and prediction after ``steps`` SGD steps of a copy of
    ``model`` (eval mode, as the poisons were crafted) on ``images``."""
    model = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    with torch.no_grad():
        logits = model(target)
    return float(F.cross_entropy(logits, torch.tensor([adv]))), int(logits.argmax())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="an epic bench folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="the bench seed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    bench = open_bench(args.bench, args.seed)
    model = bench.surrogate
    rows = []
    for path in sorted(bench.folder.glob(f"poisons/*/seed{args.seed}/trial-*/poisons.npz")):
        p = PoisonSet.load(path)
        target = p.target_image.float()[None] / 255
        with torch.no_grad():
            before = float(F.cross_entropy(model(target), torch.tensor([p.adv_label])))
        row = {"trial": path.parent.name, "target_label": p.target_label,
               "adv_label": p.adv_label, "adv_loss_before": before}
        for kind, images in (("poisons", p.images),
                             ("bases", bench.train.images[p.base_indices])):
            loss, pred = train_on(model, images.float() / 255, p.labels, target, p.adv_label,
                                  steps=args.steps, lr=args.lr)
            row[f"{kind}_adv_loss"], row[f"{kind}_flipped"] = loss, pred == p.adv_label
        rows.append(row)
    print(f"{len(rows)} trials; {args.steps} SGD steps at lr {args.lr} on the poisons alone")
    print_table(["trial", "adv loss before", "after poisons", "flipped", "after bases",
                 "flipped (bases)"],
                [[r["trial"], f"{r['adv_loss_before']:.2f}", f"{r['poisons_adv_loss']:.2f}",
                  r["poisons_flipped"], f"{r['bases_adv_loss']:.2f}", r["bases_flipped"]]
                 for r in rows])
    path = save("poisons_alone", {"rows": rows, "steps": args.steps, "lr": args.lr,
                                  "bench": str(bench.folder)}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
