r"""Clean accuracy of a CIFAR-10 bench's victims on test images at their true pixels.

Every CIFAR-10 test image of ``make data``'s copy went through JPEG (quality 75) once, so a
victim's clean accuracy there is measured on compressed images. That suits a victim trained on
JPEG copies (the ``jpeg`` defense) more than a real test set would. The shared data also holds
the first 1,000 official test images losslessly. This tool finds each of them in the bench's
(class-major) compressed test split (same label, nearest in mean absolute pixel difference)
and evaluates every stored victim of the bench folders on both versions of those 1,000
images: true pixels and the compressed copy.

    python tools/true_pixel_accuracy.py --bench runs/bench/bpl runs/bench/bpl-b \
        [--defense none jpeg epic-plus] [--shared ../shared/data]

Reads each victim's ``checkpoint.pt`` under ``FOLDER/runs/<attack>/victim/<defense>/`` (the
trainer's checkpoint; undefended replicates ``rep1``, ``rep2`` included) and the surrogate file
its ``config.yaml`` names, whose spec rebuilds the model. Per defense: the mean accuracy over
its victims on the true pixels and on the compressed copies, the spread over victims, and the
mean change (with its standard error) against the undefended victim of the same trial and bench
seed (its first replicate), on the true pixels; for ``none`` itself, its other replicates
against the first: the spread that training seeds alone give.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _bench import open_bench  # noqa: E402
from _common import print_table, save  # noqa: E402
from cifar10_lossless import SUBSET  # noqa: E402  (the shared lossless subset's path)
from epic.models import load_model  # noqa: E402

# The shared copy's mean absolute error against the true pixels is 5.8/255; a match farther
# than this is not the same image.
MATCH_LIMIT = 20.0


def lossless_test(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared subset's (N, 3, 32, 32) uint8 true-pixel test images and their labels."""
    with np.load(path) as data:
        images = torch.from_numpy(data["x_test"]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(data["y_test"]).long().reshape(-1)
    return images, labels


def match(true: torch.Tensor, labels: torch.Tensor, copy: torch.Tensor,
          copy_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each true-pixel image, the index of its compressed version in ``copy`` (same label,
    smallest mean absolute difference) and that difference, in levels of 255."""
    index = torch.empty(len(true), dtype=torch.long)
    error = torch.empty(len(true))
    for c in labels.unique().tolist():
        mine = (labels == c).nonzero().squeeze(1)
        theirs = (copy_labels == c).nonzero().squeeze(1)
        d = torch.cdist(true[mine].flatten(1).float(), copy[theirs].flatten(1).float(), p=1)
        best, at = d.min(1)
        index[mine] = theirs[at]
        error[mine] = best / true[0].numel()
    return index, error


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        logits = torch.cat([model(x.float() / 255) for x in images.split(500)])
    return float((logits.argmax(1) == labels).float().mean())


def victims(folder: Path, defenses: list[str] | None) -> list[tuple[str, str, Path]]:
    """(defense, ``attack/seed/trial`` key, run folder) of every stored victim."""
    found = []
    for ckpt in sorted(folder.glob("runs/*/victim/*/seed*/trial*/**/checkpoint.pt")):
        run = ckpt.parent
        trial = run if run.name.startswith("trial") else run.parent
        defense = trial.parent.parent.name
        if defenses is None or defense in defenses:
            found.append((defense, f"{trial.parent.parent.parent.parent.name}/"
                                   f"{trial.parent.name}/{trial.name}", run))
    return found


def evaluate(run: Path, cache: dict[str, torch.nn.Module], sets: list[tuple[torch.Tensor,
             torch.Tensor]]) -> list[float]:
    """The victim of ``run`` (its surrogate's architecture, its own weights) on each set."""
    with open(run / "config.yaml", encoding="utf-8") as f:
        surrogate = yaml.safe_load(f)["checkpoint"]
    if surrogate not in cache and not Path(surrogate).is_file():
        sys.exit(f"error: {run / 'config.yaml'} names the model {surrogate}, which is not "
                 "there; run from the folder the bench ran in")
    if surrogate not in cache:
        cache[surrogate] = load_model(surrogate).eval()
    model = cache[surrogate]
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return [accuracy(model, x, y) for x, y in sets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, nargs="+",
                        help="epic bench folders of one CIFAR-10 config (their victims pooled)")
    parser.add_argument("--defense", nargs="+", default=None,
                        help="only these defenses' victims (default: all)")
    parser.add_argument("--shared", type=Path,
                        default=Path(os.environ.get("EPIC_SHARED_DATA", "../shared/data")),
                        help="the shared data folder holding " + SUBSET)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not (args.shared / SUBSET).is_file():
        sys.exit(f"error: {args.shared / SUBSET} not found; pass --shared (the folder of "
                 "../shared/data)")
    torch.set_num_threads(1)
    bench = open_bench(args.bench[0])
    if bench.config.dataset != "cifar10":
        sys.exit(f"error: {args.bench[0]} is a {bench.config.dataset} bench; this tool reads "
                 "CIFAR-10 ones")
    test = bench.test
    true, labels = lossless_test(args.shared / SUBSET)
    index, error = match(true, labels, test.images, test.labels)
    if float(error.max()) > MATCH_LIMIT or len(index.unique()) < len(index):
        sys.exit(f"error: the lossless test images do not all have a copy in the bench's test "
                 f"split (largest difference {float(error.max()):.1f} levels of 255)")
    sets = [(true, labels), (test.images[index], labels)]
    found, seen = [], set()
    for folder in args.bench:  # a cell run in two folders (copies of one bench): its first
        for defense, key, run in victims(Path(folder), args.defense):
            if (defense, key, run.name) not in seen:
                seen.add((defense, key, run.name))
                found.append((defense, key, run))
    if not found:
        sys.exit("error: no victim checkpoints under FOLDER/runs/*/victim/ of --bench"
                 + (" for --defense" if args.defense else ""))
    cache: dict[str, torch.nn.Module] = {}
    rows = []
    for i, (defense, key, run) in enumerate(found):
        acc_true, acc_copy = evaluate(run, cache, sets)
        rows.append({"defense": defense, "trial": key, "run": str(run), "true": acc_true,
                     "compressed": acc_copy})
        print(f"[{i + 1}/{len(found)}] {run}: {acc_true:.4f} true, {acc_copy:.4f} compressed",
              file=sys.stderr)
    base = {r["trial"]: r for r in rows
            if r["defense"] == "none" and Path(r["run"]).name.startswith("trial")}
    summary = []
    for defense in dict.fromkeys(r["defense"] for r in rows):
        mine = [r for r in rows if r["defense"] == defense]
        t, c = [r["true"] for r in mine], [r["compressed"] for r in mine]
        # against the undefended victim of the same target (for `none`: its other seeds)
        paired = [r["true"] - base[r["trial"]]["true"] for r in mine
                  if r["trial"] in base and r is not base[r["trial"]]]
        summary.append({
            "defense": defense, "victims": len(mine), "true": statistics.fmean(t),
            "true_spread": statistics.pstdev(t), "compressed": statistics.fmean(c),
            "change_vs_none_true": statistics.fmean(paired) if paired else None,
            "change_stderr": (statistics.stdev(paired) / len(paired) ** 0.5
                              if len(paired) > 1 else None), "paired": len(paired)})
    print(f"{len(true)} test images, matched at {float(error.mean()):.1f} levels of 255 on "
          f"average (largest {float(error.max()):.1f})")
    print_table(["defense", "victims", "accuracy, true pixels", "accuracy, compressed copies",
                 "change vs none, true pixels (pairs)"],
                [[s["defense"], s["victims"], f"{s['true']:.2%} ± {s['true_spread']:.2%}",
                  f"{s['compressed']:.2%}",
                  "-" if s["change_stderr"] is None
                  else f"{100 * s['change_vs_none_true']:+.2f} ± "
                       f"{100 * s['change_stderr']:.2f} pt ({s['paired']})"] for s in summary])
    path = save("true_pixel_accuracy", {"summary": summary, "victims": rows,
                                        "match_error_mean": float(error.mean()),
                                        "match_error_max": float(error.max()),
                                        "bench": args.bench}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
