r"""Where do the poisons fall among EPIC's clusters? A diagnostic for one poisoned trial.

Trains the victim of a transfer-learning trial undefended, and before chosen epochs clusters
the poison class's gradient proxies as one EPIC round would (without dropping anything). For
each budget it reports how many clusters hold poisons, how many clean examples share them, how
many poisons are singletons (what EPIC would drop) and how many clean singletons go with them.

    python benchmarks/poison_clusters.py --bench runs/bench/cpu-cifar10-transfer --trial 0

``--bench`` is a folder written by ``epic bench`` for a transfer config (its surrogate and the
trial's poisons are reused); the victim follows that config's first victim.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, save  # noqa: E402
from epic.evaluation import RunConfig, load_bench_config, prepare_data  # noqa: E402
from epic.evaluation.bench import default_data_root  # noqa: E402
from epic.evaluation.run import _resolved_train_config, build_model  # noqa: E402
from epic.selection import gradient_proxy  # noqa: E402
from epic.selection.facility import facility_location  # noqa: E402
from epic.training import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", required=True, help="folder written by `epic bench` (transfer)")
    ap.add_argument("--attack", default="bullseye-polytope")
    ap.add_argument("--trial", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 8])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    bench = Path(args.bench)
    cfg = load_bench_config(bench / "config.yaml")
    victim = cfg.victims[0]
    train = {k: victim[k] for k in ("scenario", "epochs", "lr", "weight_decay", "batch_size")
             if k in victim}
    run = RunConfig(dataset=cfg.dataset, data_root=cfg.data_root or default_data_root(
        cfg.dataset), defense="none", train_slice=cfg.train_slice,
        poisons=str(bench / "poisons" / args.attack / f"seed{args.seed}" /
                    f"trial-{args.trial:03d}" / "poisons.npz"),
        checkpoint=str(bench / "surrogates" / f"seed{args.seed}.pt"),
        train={**train, "eval_every": 0, "progress": False})
    data = prepare_data(run)
    trainer = Trainer(build_model(run, data["train"]), data["train"],
                      config=_resolved_train_config(run), poison_mask=data["poison_mask"])
    adv = data["poisons"].adv_label
    members = (trainer.labels.cpu() == adv).nonzero().squeeze(1)
    poison = data["poison_mask"][members]
    rows, table = [], []
    for epoch in range(max(args.epochs) + 1):
        if epoch in args.epochs:
            logits, _ = trainer.predict(members)
            g = gradient_proxy(logits, trainer.labels.index_select(
                0, members.to(trainer.labels.device))).vectors
            for frac in args.fractions:
                k = max(1, round(frac * len(members)))
                res = facility_location(g, k, optimizer="lazy")
                sizes = res.cluster_sizes[res.assignment]  # each point's cluster size
                hit = res.assignment[poison].unique()
                shared = torch.isin(res.assignment, hit) & ~poison
                row = {"epoch": epoch, "fraction": frac, "medoids": k,
                       "poison_clusters": len(hit), "clean_in_poison_clusters": int(shared.sum()),
                       "poison_singletons": int((poison & (sizes <= 1)).sum()),
                       "clean_singletons": int((~poison & (sizes <= 1)).sum()),
                       "poison_pred_target": int((logits[poison].argmax(1).cpu()
                                                  == data["poisons"].target_label).sum())}
                rows.append(row)
                table.append([epoch, frac, k, row["poison_clusters"],
                              row["clean_in_poison_clusters"], row["poison_singletons"],
                              row["clean_singletons"], row["poison_pred_target"]])
        if epoch < max(args.epochs):
            trainer._train_epoch(epoch)
            trainer.scheduler.step()
    print(f"class {adv}: {len(members)} images, {int(poison.sum())} poisons "
          f"(target {data['poisons'].target_index}, class {data['poisons'].target_label})")
    print_table(["epoch", "fraction", "medoids", "clusters with poisons",
                 "clean in them", "poison singletons", "clean singletons",
                 "poisons predicted as target class"], table)
    path = save("poison_clusters", {"benchmark": "poison_clusters", "rows": rows,
                                    "args": vars(args), "env": environment(),
                                    "command": " ".join(sys.argv)}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
