"""EPIC's two proxy passes on the same problem: what each drops, and its selection seconds.

    python benchmarks/proxy_pass.py [--seeds 0 1 2] [--mislabelled 20] [--out PATH]

Digits (scikit-learn's, no download), ``--mislabelled`` training labels flipped at random to
another class (isolated in gradient space, as effective poisons are), a ConvNet trained 12
epochs, EPIC-0.1 every epoch after 3 warm-up epochs; once with ``proxy_pass="separate"`` (an
inference pass per round) and once with ``"training"`` (the previous epoch's training logits).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, save  # noqa: E402
from epic.data import ImageTensors, load_split  # noqa: E402
from epic.defenses import create_defense  # noqa: E402
from epic.models import create_model  # noqa: E402
from epic.training import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--mislabelled", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    train, test = load_split("digits", None, train=True), load_split("digits", None, train=False)
    rows, results = [], []
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        bad = torch.randperm(len(train), generator=g)[:args.mislabelled]
        labels = train.labels.clone()
        labels[bad] = (labels[bad] + 1 + torch.randint(0, 9, (len(bad),), generator=g)) % 10
        mask = torch.zeros(len(train), dtype=torch.bool)
        mask[bad] = True
        for proxy_pass in ("separate", "training"):
            torch.manual_seed(seed)
            model = create_model("convnet", num_classes=10, in_channels=1, mean=(0.31,),
                                 std=(0.38,))
            epic = create_defense("epic", subset_fraction=0.1, warmup=3, interval=1,
                                  proxy_pass=proxy_pass)
            trainer = Trainer(model, ImageTensors(train.images, labels, train.classes),
                              test=test, poison_mask=mask, callbacks=[epic],
                              config=TrainConfig(epochs=12, batch_size=64, lr=0.05,
                                                 augment="none", seed=seed, progress=False))
            history = trainer.fit()
            dropped = ~trainer.active
            r = {"seed": seed, "proxy_pass": proxy_pass,
                 "mislabelled_dropped": int(dropped[mask].sum()),
                 "clean_dropped": int(dropped[~mask].sum()), "clean": int((~mask).sum()),
                 "test_acc": history[-1]["test_acc"],
                 "selection_seconds": epic.summary()["selection_seconds"]}
            results.append(r)
            rows.append([seed, proxy_pass, f"{r['mislabelled_dropped']}/{len(bad)}",
                         f"{r['clean_dropped']}/{r['clean']}", f"{r['test_acc']:.4f}",
                         f"{r['selection_seconds']:.2f}"])
    print_table(["seed", "proxy pass", "mislabelled dropped", "clean dropped", "test acc",
                 "selection s"], rows)
    path = save("proxy_pass", {"benchmark": "proxy_pass", "config": vars(args),
                               "env": environment(), "results": results}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
