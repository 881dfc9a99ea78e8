r"""Why gradient matching does or does not transfer: poison-target alignment on each model.

For every trial of a gradient-matching run of ``benchmarks/attack_defense.py`` (its ``--root``),
loads the surrogate the poisons were crafted on and the undefended victim trained on them (its
final weights), and reports ``1 - cos(grad of the target's adversarial loss, grad of the
poisons' training loss)`` over all parameters (the crafting objective, without augmentation):
for the poisons and, as a reference, for the unperturbed base images. Also the victim's
probability of the adversarial class on the target.

    python benchmarks/gm_alignment.py --root runs/attack_defense/scratch-cifar10 \
        --surrogate .cache/surrogates/cifar10-resnet20-15ep-0:5000.pt --data-root .cache/cifar10

Alignment close to 0 on the victim means the poisons push its weights the attacker's way; near
1 (orthogonal gradients) means the victim's training landed where they no longer do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, save  # noqa: E402
from epic.attacks.gradient_matching import alignment_loss, parameter_gradients  # noqa: E402
from epic.data import PoisonSet, load_split  # noqa: E402
from epic.evaluation.run import parse_slice  # noqa: E402
from epic.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="attack_defense.py --root of a GM setting")
    ap.add_argument("--surrogate", required=True, help="the surrogate model file")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--train-slice", default="0:5000")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    folder = Path(args.root) / "gradient-matching"
    train = load_split(args.dataset, args.data_root, train=True)
    train = train.subset(parse_slice(args.train_slice, len(train)))
    surrogate = load_model(args.surrogate).eval()
    rows, results = [], []
    for trial in sorted((folder / "poisons").glob("trial-*")):
        run = folder / f"{trial.name}-none" / "checkpoint.pt"
        if not run.exists():
            continue
        poisons = PoisonSet.load(trial / "poisons.npz")
        victim = load_model(args.surrogate).eval()
        victim.load_state_dict(torch.load(run, map_location="cpu", weights_only=True)["model"])
        target = poisons.target_image[None].float() / 255
        bases = train.images.index_select(0, poisons.base_indices).float() / 255
        images = poisons.images.float() / 255
        r = {"trial": trial.name, "target_index": poisons.target_index,
             "adv_label": poisons.adv_label}
        for name, model in (("surrogate", surrogate), ("victim", victim)):
            grad = parameter_gradients(model, target, poisons.adv_label)
            r[f"{name}_poisons"] = alignment_loss(model, images, poisons.labels, grad)
            r[f"{name}_bases"] = alignment_loss(model, bases, poisons.labels, grad)
            with torch.no_grad():
                r[f"{name}_p_adv"] = float(model(target).softmax(1)[0, poisons.adv_label])
        results.append(r)
        rows.append([trial.name, f"{poisons.target_label} -> {poisons.adv_label}",
                     f"{r['surrogate_poisons']:.3f}", f"{r['surrogate_bases']:.3f}",
                     f"{r['victim_poisons']:.3f}", f"{r['victim_bases']:.3f}",
                     f"{r['surrogate_p_adv']:.3f}", f"{r['victim_p_adv']:.3f}"])
    print_table(["trial", "target", "surrogate: poisons", "surrogate: bases", "victim: poisons",
                 "victim: bases", "surrogate p(adv)", "victim p(adv)"], rows)
    print("entries: 1 - cos(target adversarial gradient, poison gradient); lower = aligned")
    path = save("gm_alignment", {"benchmark": "gm_alignment", "config": vars(args),
                                 "env": environment(), "results": results}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
