r"""Where do the poisons fall among EPIC's clusters? A diagnostic for one poisoned trial.

Trains the victim of a transfer-learning trial undefended, and before chosen epochs clusters
the poison class's gradient proxies as one EPIC round would (without dropping anything). For
each budget it reports how many clusters hold poisons, how many clean examples share them, how
many poisons are singletons (what EPIC would drop) and how many clean singletons go with them.

    python tools/poison_clusters.py --bench runs/bench/cpu-cifar10-transfer --trial 0

``--bench`` is a folder written by ``epic bench`` for a transfer config (its surrogate and the
trial's poisons are reused); the victim follows that config's first victim.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# the environment record, table and JSON output shared with the speed benchmarks
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import print_table, save  # noqa: E402
from epic.data import dataset_info  # noqa: E402
from epic.evaluation import RunConfig, build_model, load_bench_config, prepare_data  # noqa: E402
from epic.evaluation.bench import TRAIN_KEYS, default_data_root, surrogate_paths  # noqa: E402
from epic.selection import facility_location, gradient_proxy  # noqa: E402
from epic.training import Callback, TrainConfig, Trainer  # noqa: E402


class _Done(Exception):
    """Raised by :class:`Clusters` after the last chosen epoch: the rest is not needed."""


class Clusters(Callback):
    """Before each chosen epoch (and after the last one), clusters the poison class's gradient
    proxies as one EPIC round would, for each budget, without dropping anything."""

    def __init__(self, members: torch.Tensor, poison: torch.Tensor, target_label: int,
                 epochs: list[int], fractions: list[float]) -> None:
        self.members, self.poison, self.target_label = members, poison, target_label
        self.epochs, self.fractions = sorted(set(epochs)), fractions
        self.rows: list[dict] = []

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if epoch in self.epochs:
            self.measure(trainer, epoch)
        if epoch >= self.epochs[-1]:
            raise _Done

    def on_train_end(self, trainer) -> None:
        if trainer.config.epochs in self.epochs:
            self.measure(trainer, trainer.config.epochs)

    def measure(self, trainer, epoch: int) -> None:
        members, poison = self.members, self.poison
        logits, _ = trainer.predict(members, precision="float32")
        g = gradient_proxy(logits, trainer.labels.index_select(
            0, members.to(trainer.labels.device))).vectors
        for frac in self.fractions:
            k = max(1, round(frac * len(members)))
            res = facility_location(g, k, optimizer="lazy")
            sizes = res.cluster_sizes[res.assignment]  # each point's cluster size
            hit = res.assignment[poison].unique()
            shared = torch.isin(res.assignment, hit) & ~poison
            self.rows.append({
                "epoch": epoch, "fraction": frac, "medoids": k, "poison_clusters": len(hit),
                "clean_in_poison_clusters": int(shared.sum()),
                "poison_singletons": int((poison & (sizes <= 1)).sum()),
                "clean_singletons": int((~poison & (sizes <= 1)).sum()),
                "poison_pred_target": int((logits[poison].argmax(1).cpu()
                                           == self.target_label).sum())})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", required=True, help="folder written by `epic bench` (transfer)")
    ap.add_argument("--attack", default="bullseye-polytope")
    ap.add_argument("--trial", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 8],
                    help="epochs before which to cluster (past the victim's last epoch, its "
                         "run and learning-rate schedule are lengthened)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    bench = Path(args.bench)
    cfg = load_bench_config(bench / "config.yaml")
    victim = cfg.victims[0]
    train = {k: victim[k] for k in TRAIN_KEYS if k in victim}
    train["epochs"] = max(train.get("epochs", TrainConfig.epochs), max(args.epochs))
    if train.get("augment") is None:
        train["augment"] = dataset_info(cfg.dataset).augmentation
    train.update(eval_every=0, progress=False)
    run = RunConfig(dataset=cfg.dataset, data_root=cfg.data_root or default_data_root(
        cfg.dataset), defense="none", train_slice=cfg.train_slice,
        poisons=str(bench / "poisons" / args.attack / f"seed{args.seed}" /
                    f"trial-{args.trial:03d}" / "poisons.npz"),
        checkpoint=str(surrogate_paths(cfg, bench, args.seed)[0]))
    data = prepare_data(run)
    adv = data["poisons"].adv_label
    members = (data["train"].labels == adv).nonzero().squeeze(1)
    poison = data["poison_mask"][members]
    clusters = Clusters(members, poison, data["poisons"].target_label, args.epochs,
                        args.fractions)
    torch.manual_seed(args.seed)  # the new head's initialisation
    trainer = Trainer(build_model(run, data["train"]), data["train"], callbacks=[clusters],
                      config=TrainConfig(**train),
                      poison_mask=data["poison_mask"])
    try:
        trainer.fit(resume=False)
    except _Done:
        pass
    rows = clusters.rows
    table = [[r["epoch"], r["fraction"], r["medoids"], r["poison_clusters"],
              r["clean_in_poison_clusters"], r["poison_singletons"], r["clean_singletons"],
              r["poison_pred_target"]] for r in rows]
    print(f"class {adv}: {len(members)} images, {int(poison.sum())} poisons "
          f"(target {data['poisons'].target_index}, class {data['poisons'].target_label})")
    print_table(["epoch", "fraction", "medoids", "clusters with poisons",
                 "clean in them", "poison singletons", "clean singletons",
                 "poisons predicted as target class"], table)
    path = save("poison_clusters", {"rows": rows, "args": vars(args)},
                args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
