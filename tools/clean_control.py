r"""Which of a bench's targets does a victim trained *without poisons* already send to the
attacker's class? Those "hits" are not the attack's doing, and no defense can stop them.

``epic bench`` picks targets at random among the test images, so some are images the clean
model gets wrong, and some of those it gets wrong in exactly the attacker's class. Neither
three undefended seeds nor a matched random drop rule that out; a clean run does. For a bench
folder, this trains the undefended victim's recipe (the resolved config of one of its ``none``
cells) on the clean training split, once per ``--seeds`` seed, and for every target records
the clean victims' predictions: a target is *clean-explained* when a clean victim predicts its
adversarial class. Every target of a transfer bench shares the same clean training set, so one
run per seed covers them all.

    python tools/clean_control.py --bench runs/bench/c10-fc-g-final [--seeds 3]

It writes ``clean_control.json`` into the bench folder (or ``--out``); ``epic report`` then
leaves the clean-explained targets out of the robust hits and adds a "net" success column.
The clean victims follow the recipe of the first undefended cell's victim.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import environment, print_table, save  # noqa: E402
from epic.evaluation import RunConfig  # noqa: E402
from epic.evaluation.run import execute_run  # noqa: E402

SEED0 = 7000  # clean victims' seeds: 7000, 7001, ... (no bench cell uses them)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="an epic bench folder")
    parser.add_argument("--seeds", type=int, default=3, help="clean victims to train")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [json.loads(line) for line in
            (Path(args.bench) / "results.jsonl").read_text().splitlines() if line.strip()]
    none = [r for r in rows if r["defense_name"] == "none"]
    if not none:
        sys.exit(f"error: {args.bench}/results.jsonl has no undefended (none) cell to copy")
    targets = sorted({(r["seed"], r["trial"], r["target_index"], r["adv_label"]) for r in none})
    hits: dict[tuple[int, int], list[bool]] = {}
    for r in none:
        hits.setdefault((r["seed"], r["trial"]), []).append(bool(r["summary"]["attack_success"]))
    config = {k: v for k, v in none[0]["config"].items() if k != "attack"}
    base = RunConfig.from_dict(config)
    preds = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(args.seeds):
            cfg = replace(base, poisons=None, defense=None, out=f"{tmp}/seed{s}",
                          train=replace(base.train, seed=SEED0 + s, progress=False))
            summary, trainer, _ = execute_run(cfg, resume=False)
            test_images = trainer.test[0]
            if not isinstance(test_images, torch.Tensor):
                sys.exit("error: the bench streams its test split; this tool needs it in memory")
            index = torch.tensor([t[2] for t in targets], device=test_images.device)
            logits, _ = trainer.predict(images=test_images.index_select(0, index))
            preds.append(logits.argmax(1).tolist())
            print(f"clean victim seed {SEED0 + s}: test accuracy {summary['clean_test_acc']:.4f}")
    out_rows = []
    for k, (seed, trial, index, adv) in enumerate(targets):
        p = [seed_preds[k] for seed_preds in preds]
        h = hits[seed, trial]
        out_rows.append({"seed": seed, "trial": trial, "target_index": index, "adv_label": adv,
                         "clean_predictions": p, "clean_adv": sum(x == adv for x in p),
                         "undefended_hits": sum(h), "undefended_runs": len(h)})
    explained = [r for r in out_rows if r["clean_adv"]]
    robust = [r for r in out_rows if r["undefended_hits"] == r["undefended_runs"]]
    print(f"{len(out_rows)} targets; {len(explained)} clean-explained (a clean victim predicts "
          f"the adversarial class), {sum(r['clean_adv'] > 0 for r in robust)} of the "
          f"{len(robust)} robust hits")
    print_table(["seed/trial", "target", "adv", "clean predictions", "undefended hits"],
                [[f"{r['seed']}/{r['trial']}", r["target_index"], r["adv_label"],
                  r["clean_predictions"],
                  f"{r['undefended_hits']}/{r['undefended_runs']}"] for r in explained])
    path = save("clean_control", {"benchmark": "clean_control", "bench": str(args.bench),
                                  "seeds": [SEED0 + s for s in range(args.seeds)],
                                  "rows": out_rows, "env": environment()},
                args.out or str(Path(args.bench) / "clean_control.json"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
