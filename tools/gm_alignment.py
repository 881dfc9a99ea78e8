r"""Why gradient matching does or does not transfer: poison-target alignment on each model.

For every trial of a gradient-matching attack in a folder written by ``epic bench``, loads the
surrogate the poisons were crafted on and the undefended victim trained on them (its final
weights), and reports ``1 - cos(grad of the target's adversarial loss, grad of the poisons'
training loss)`` over all parameters (the crafting objective, without augmentation): for the
poisons and, as a reference, for the unperturbed base images. Also each model's probability of
the adversarial class on the target.

    OMP_NUM_THREADS=1 epic bench configs/cpu-cifar10-scratch.yaml
    python tools/gm_alignment.py --bench runs/bench/cpu-cifar10-scratch

``--attack``, ``--victim`` and ``--seed`` pick the attack label (default: the config's first
gradient-matching attack), the victim label and the seed (default: the first of each).
Alignment close to 0 on the victim means the poisons push its weights the attacker's way; near
1 (orthogonal gradients) means the victim's training landed where they no longer do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

# the environment record, table and JSON output shared with the speed benchmarks
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _bench import open_bench  # noqa: E402
from _common import print_table, save  # noqa: E402
from epic import EpicError  # noqa: E402
from epic.attacks.gradient_matching import alignment_loss, parameter_gradients  # noqa: E402
from epic.data import PoisonSet  # noqa: E402
from epic.evaluation import RunConfig, build_model  # noqa: E402
from epic.evaluation.bench import Cell  # noqa: E402


def load_victim(run_dir: Path, train) -> torch.nn.Module:
    """The model a bench run trained, rebuilt from its ``config.yaml`` with its last weights."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = build_model(RunConfig.from_dict(saved), train)
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", required=True, help="folder written by `epic bench`")
    ap.add_argument("--attack", default=None, help="attack label (default: the first "
                    "gradient-matching attack of the config)")
    ap.add_argument("--victim", default=None, help="victim label (default: the first)")
    ap.add_argument("--seed", type=int, default=None, help="bench seed (default: the first)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    opened = open_bench(args.bench, args.seed)
    bench, cfg, seed = opened.folder, opened.config, opened.seed
    train, surrogate = opened.train, opened.surrogate
    gm = [a["label"] for a in cfg.attacks if a["name"] == "gradient-matching"]
    attack = args.attack or (gm[0] if gm else None)
    if attack not in gm:
        raise SystemExit(f"error: no gradient-matching attack {attack!r} in {bench}; "
                         f"choose from {gm}")
    victim = args.victim or cfg.victims[0]["label"]
    rows, results = [], []
    for folder in sorted((bench / "poisons" / attack / f"seed{seed}").glob("trial-*")):
        trial = int(folder.name.removeprefix("trial-"))
        run = bench / "runs" / Cell(attack, victim, "none", seed, trial).key
        if not (run / "checkpoint.pt").exists():
            continue
        poisons = PoisonSet.load(folder / "poisons.npz")
        try:
            model = load_victim(run, train)
        except (EpicError, RuntimeError) as err:
            raise SystemExit(f"error: cannot rebuild the victim of {run}: {err}") from None
        target = poisons.target_image[None].float() / 255
        bases = train.images.index_select(0, poisons.base_indices).float() / 255
        images = poisons.images.float() / 255
        r = {"trial": trial, "target_index": poisons.target_index,
             "adv_label": poisons.adv_label}
        for name, net in (("surrogate", surrogate), ("victim", model)):
            grad = parameter_gradients(net, target, poisons.adv_label)
            r[f"{name}_poisons"] = alignment_loss(net, images, poisons.labels, grad)
            r[f"{name}_bases"] = alignment_loss(net, bases, poisons.labels, grad)
            with torch.no_grad():
                r[f"{name}_p_adv"] = float(net(target).softmax(1)[0, poisons.adv_label])
        results.append(r)
        rows.append([trial, f"{poisons.target_label} -> {poisons.adv_label}",
                     f"{r['surrogate_poisons']:.3f}", f"{r['surrogate_bases']:.3f}",
                     f"{r['victim_poisons']:.3f}", f"{r['victim_bases']:.3f}",
                     f"{r['surrogate_p_adv']:.3f}", f"{r['victim_p_adv']:.3f}"])
    print_table(["trial", "target", "surrogate: poisons", "surrogate: bases", "victim: poisons",
                 "victim: bases", "surrogate p(adv)", "victim p(adv)"], rows)
    print("entries: 1 - cos(target adversarial gradient, poison gradient); lower = aligned")
    config = {**vars(args), "attack": attack, "victim": victim, "seed": seed}
    path = save("gm_alignment", {"config": config, "results": results},
                args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
