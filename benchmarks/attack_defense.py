r"""Attack success with and without EPIC, per target, on real data.

    # transfer learning (the poisoning benchmark's setting): frozen CIFAR-10 extractor,
    # linear head fine-tuned on the first 2,500 training images, 25 poisons, eps 8/255
    python benchmarks/attack_defense.py --setting transfer --targets 20 \
        --attacks bullseye-polytope feature-collision

    # from scratch: gradient matching, 1% budget, eps 16/255, a small net on a training subset
    python benchmarks/attack_defense.py --setting scratch --dataset cifar10 --targets 5
    python benchmarks/attack_defense.py --setting scratch --dataset mnist --targets 5

    # the paper's full setting (ResNet-18, 40 epochs, 100 targets): needs a GPU
    python benchmarks/attack_defense.py --setting paper --dataset cifar10 --targets 100

Every stage is cached under ``--root`` and skipped when its output exists (surrogate, each
trial's poisons, each training run), so an interrupted benchmark resumes. ``--jobs N`` trains N
victims at once, each in its own process (give each ``OMP_NUM_THREADS=1`` on a small machine).
Prints one table per attack and writes ``result.json`` with the per-target rows and the
resolved settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, save  # noqa: E402
from epic.data import load_split  # noqa: E402
from epic.evaluation import (  # noqa: E402
    CraftConfig,
    RunConfig,
    choose_targets,
    craft_poisons,
    pretrain,
    run_training,
)

# Resolved settings per (setting, dataset). CPU-sized; the paper-scale runs need a GPU.
SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    ("transfer", "cifar10"): {
        "surrogate": {"model": "convnet", "epochs": 15, "train_slice": "2500:50000",
                      "lr": 0.05, "batch_size": 128},
        "victim_slice": "0:2500", "num_poisons": 25, "eps": 8.0,
        "victim": {"scenario": "transfer", "epochs": 40, "lr": 0.01, "batch_size": 128,
                   "eval_every": 0},
        "epic": {"subset_fraction": 0.1, "warmup": 1, "interval": 1},
        "attack_options": {"bullseye-polytope": {"steps": 1500},
                           "feature-collision": {"steps": 1000}},
    },
    ("scratch", "cifar10"): {
        "surrogate": {"model": "resnet20", "epochs": 15, "train_slice": "0:5000",
                      "lr": 0.1, "batch_size": 128},
        "victim_slice": "0:5000", "budget": 0.01, "eps": 16.0,
        "victim": {"scenario": "scratch", "epochs": 15, "lr": 0.1, "batch_size": 128,
                   "eval_every": 0,
                   "model": "resnet20"},
        "epic": {"subset_fraction": 0.1, "warmup": 2, "interval": 2},
        "attack_options": {"gradient-matching": {"steps": 250, "restarts": 1}},
    },
    # The paper's setting (Geiping et al.'s benchmark, EPIC Table 1): ResNet-18 from scratch on
    # all of CIFAR-10, 40 epochs, Gradient Matching with 8 restarts, 1% budget, eps 16; run
    # with --targets 100 on a GPU (not run here: this project has no GPU figures yet).
    # EPIC: T=2 for 40 epochs; K=4 is our scaling of the paper's K=10 at 200 epochs.
    ("paper", "cifar10"): {
        "surrogate": {"model": "resnet18", "epochs": 40, "train_slice": "0:50000",
                      "lr": 0.1, "batch_size": 128},
        "victim_slice": "0:50000", "budget": 0.01, "eps": 16.0,
        "victim": {"scenario": "scratch", "epochs": 40, "lr": 0.1, "batch_size": 128,
                   "eval_every": 0, "model": "resnet18"},
        "epic": {"subset_fraction": 0.1, "warmup": 4, "interval": 2},
        "attack_options": {"gradient-matching": {"steps": 250, "restarts": 8}},
    },
    ("scratch", "mnist"): {
        "surrogate": {"model": "convnet", "epochs": 6, "train_slice": "0:10000",
                      "lr": 0.05, "batch_size": 128},
        "victim_slice": "0:10000", "budget": 0.01, "eps": 16.0,
        "victim": {"scenario": "scratch", "epochs": 6, "lr": 0.05, "batch_size": 128,
                   "eval_every": 0,
                   "model": "convnet"},
        "epic": {"subset_fraction": 0.1, "warmup": 1, "interval": 1},
        "attack_options": {"gradient-matching": {"steps": 250, "restarts": 1, "flip": False}},
    },
}


def data_root(dataset: str) -> str:
    shared = Path(os.environ.get("EPIC_SHARED_DATA", "../shared/data"))
    cache = Path(os.environ.get("EPIC_CACHE", ".cache"))
    return str(cache / "cifar10" if dataset == "cifar10" else shared / "mnist")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=["transfer", "scratch", "paper"], default="transfer")
    ap.add_argument("--dataset", choices=["cifar10", "mnist"], default="cifar10")
    ap.add_argument("--attacks", nargs="+", default=None)
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--surrogate-model", default=None,
                    help="override the setting's surrogate / extractor model (e.g. resnet20)")
    ap.add_argument("--surrogate-epochs", type=int, default=None)
    ap.add_argument("--surrogate-slice", default=None, help="START:STOP of its training images")
    ap.add_argument("--attack-steps", type=int, default=None, help="override every attack's steps")
    ap.add_argument("--victim", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override the victim's training options, e.g. weight_decay=0 lr=0.1")
    ap.add_argument("--epic", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override EPIC's options, e.g. subset_fraction=0.2 stop=10")
    ap.add_argument("--jobs", type=int, default=1,
                    help="training runs at once, each in its own process with "
                         "$OMP_NUM_THREADS (default 1) threads; crafting stays in this process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=None, help="cache folder (default runs/attack_defense/...)")
    ap.add_argument("--out", default=None, help="JSON path (default runs/attack_defense-<time>/)")
    args = ap.parse_args()

    key = (args.setting, args.dataset)
    if key not in SETTINGS:
        sys.exit(f"error: no setting {key}; choose from {sorted(SETTINGS)}")
    s = SETTINGS[key]
    attacks = args.attacks or list(s["attack_options"])
    droot = data_root(args.dataset)
    t0 = time.perf_counter()

    sur = dict(s["surrogate"])
    sur["model"] = args.surrogate_model or sur["model"]
    sur["epochs"] = args.surrogate_epochs or sur["epochs"]
    sur["train_slice"] = args.surrogate_slice or sur["train_slice"]
    default_root = f"runs/attack_defense/{args.setting}-{args.dataset}"
    if args.surrogate_model or args.attack_steps:  # other poisons: keep them apart
        default_root += f"-{sur['model']}-{args.attack_steps or 'default'}steps"
    root = Path(args.root or default_root)
    if args.attack_steps is not None:
        s = {**s, "attack_options": {k: {**v, "steps": args.attack_steps}
                                     for k, v in s["attack_options"].items()}}
    victim_overrides = {k: float(v) if k in ("lr", "weight_decay") else int(v)
                        for k, v in (pair.split("=", 1) for pair in args.victim)}
    victim_tag = "".join(f"-{k}{v:g}" for k, v in sorted(victim_overrides.items()))
    s = {**s, "victim": {**s["victim"], **victim_overrides}}
    epic_overrides = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.epic)}
    epic_tag = "".join(f"-{k}{v}" for k, v in sorted(epic_overrides.items()))
    s = {**s, "epic": {**s["epic"], **epic_overrides}}
    surrogate = Path(os.environ.get("EPIC_CACHE", ".cache")) / "surrogates" / \
        f"{args.dataset}-{sur['model']}-{sur['epochs']}ep-{sur['train_slice']}.pt"
    if not surrogate.exists():
        print(f"pretraining the surrogate {surrogate} (cached for later runs)")
        pretrain(RunConfig(dataset=args.dataset, data_root=droot, model=sur["model"],
                           train_slice=sur["train_slice"], out=str(surrogate) + ".run",
                           train={"epochs": sur["epochs"], "lr": sur["lr"],
                                  "batch_size": sur["batch_size"], "seed": args.seed,
                                  "progress": False}), surrogate)

    test = load_split(args.dataset, droot, train=False)
    pairs = choose_targets(test, args.targets, args.seed)
    results: dict[str, Any] = {}
    for attack in attacks:
        trials = craft_poisons(CraftConfig(
            attack=attack, checkpoints=[str(surrogate)], dataset=args.dataset, data_root=droot,
            train_slice=s["victim_slice"], targets=pairs, num_poisons=s.get("num_poisons"),
            budget=s.get("budget", 0.01), eps=s["eps"],
            attack_options=s["attack_options"].get(attack, {}), seed=args.seed,
            out=str(root / attack / "poisons"), progress=True))
        configs = {}
        for trial in trials:
            for defense in ("none", "epic"):
                victim = dict(s["victim"])
                model = victim.pop("model", sur["model"])
                scenario = victim["scenario"]
                configs[trial["trial"], defense] = RunConfig(
                    dataset=args.dataset, data_root=droot, model=model, defense=defense,
                    poisons=trial["file"], train_slice=s["victim_slice"],
                    checkpoint=str(surrogate) if scenario != "scratch" else None,
                    defense_options=dict(s["epic"]) if defense == "epic" else {},
                    out=str(root / attack / (f"trial-{trial['trial']:03d}-{defense}{victim_tag}"
                                          + (epic_tag if defense == "epic" else ""))),
                    train={**victim, "seed": args.seed + trial["trial"], "progress": False})
        summaries = run_all(list(configs.values()), args.jobs)
        rows = []
        for trial in trials:
            row = {"target": trial["target_index"], "true": trial["target_label"],
                   "adv": trial["adv_label"]}
            for defense in ("none", "epic"):
                summary = summaries[configs[trial["trial"], defense].out]
                row[defense] = {k: summary.get(k) for k in (
                    "attack_success", "clean_test_acc", "target_pred", "poisons_dropped",
                    "poisons_total", "clean_dropped", "train_examples", "wall_seconds")}
            rows.append(row)
            print(f"{attack} target {row['target']} ({row['true']}->{row['adv']}): "
                  f"undefended {'HIT' if row['none']['attack_success'] else 'miss'}, "
                  f"EPIC {'HIT' if row['epic']['attack_success'] else 'miss'} "
                  f"({row['epic']['poisons_dropped']}/{row['epic']['poisons_total']} poisons, "
                  f"{row['epic']['clean_dropped']} clean dropped)", flush=True)
        results[attack] = {"rows": rows, "totals": totals(rows)}

    for attack, r in results.items():
        n = len(r["rows"])
        print(f"\n{attack}: {args.setting} on {args.dataset}, {n} targets, "
              f"train slice {s['victim_slice']}, eps {s['eps']:g}/255")
        table = []
        for defense in ("none", "epic"):
            t = r["totals"][defense]
            table.append([defense, f"{t['attack_success']:.0%} ± {t['success_se']:.0%}",
                          f"{t['clean_acc']:.4f} ± {t['clean_acc_std']:.4f}",
                          f"{t['poisons_dropped_pct']:.0%}", f"{t['clean_dropped_pct']:.2%}",
                          f"{t['seconds']:.1f}"])
        print_table(["defense", "attack success", "clean acc", "poisons dropped",
                     "clean dropped", "s / run"], table)
    path = save("attack_defense", {
        "benchmark": "attack_defense", "setting": args.setting, "dataset": args.dataset,
        "resolved": {**s, "surrogate": sur}, "targets": pairs, "results": results,
        "env": environment(), "seconds": time.perf_counter() - t0,
        "command": " ".join(sys.argv)}, args.out)
    print(f"\nwrote {path}")


def run_all(configs: list[RunConfig], jobs: int) -> dict[str, dict[str, Any]]:
    """Each run's summary by its ``out``: read when it exists (cached), else trained, ``jobs``
    at a time in worker processes (a run is seeded, so it does not depend on which)."""
    def cached(cfg: RunConfig) -> dict[str, Any] | None:
        path = Path(cfg.out) / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    todo = [c for c in configs if cached(c) is None]
    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            for cfg, _ in zip(todo, pool.map(run_training, todo), strict=True):
                print(f"finished {cfg.out}", flush=True)
    else:
        for cfg in todo:
            run_training(cfg)
    return {c.out: cached(c) for c in configs}


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for defense in ("none", "epic"):
        runs = [r[defense] for r in rows]
        p = sum(bool(r["attack_success"]) for r in runs) / len(runs)
        accs = [r["clean_test_acc"] for r in runs]
        poisons = sum(r["poisons_total"] for r in runs)
        clean = sum(r["train_examples"] - r["poisons_total"] for r in runs)
        out[defense] = {
            "attack_success": p, "success_se": (p * (1 - p) / len(runs)) ** 0.5,
            "clean_acc": statistics.fmean(accs),
            "clean_acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "poisons_dropped_pct": sum(r["poisons_dropped"] for r in runs) / max(poisons, 1),
            "clean_dropped_pct": sum(r["clean_dropped"] for r in runs) / max(clean, 1),
            "seconds": statistics.fmean(r["wall_seconds"] for r in runs),
        }
    return out


if __name__ == "__main__":
    main()
