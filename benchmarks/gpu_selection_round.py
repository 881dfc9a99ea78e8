"""One EPIC selection round on synthetic proxies built on the device: seconds and peak memory.

    python benchmarks/gpu_selection_round.py                        # 1.28M proxies, 1,000 classes
    python benchmarks/gpu_selection_round.py --optimizer stochastic lazy
    python benchmarks/gpu_selection_round.py --device cpu --n 2000 --num-classes 20  # smoke run
    [--n N] [--num-classes K] [--dim D] [--fraction 0.1] [--memory-mb 2048] [--repeats 1]
    [--device auto] [--seed 0] [--out PATH]

The proxies follow ``benchmarks/selection_scaling.py --mode classes`` (``softmax(z) - onehot(y)``
with logits ``z`` from a seeded Gaussian mixture per class: confident, less confident and
confusable components, plus 1% of examples confidently in another class; ``y = i mod K``), but
are drawn on ``--device`` with a generator of that device, chunk by chunk, so a GPU never holds
them on the host (the numbers differ from the CPU script's; their statistics do not). ``--dim``
projects them onto fewer dimensions with a seeded Gaussian matrix.

Each ``--optimizer`` (default ``stochastic``, as ``selection_scaling.py --mode classes``) runs
``EPIC(subset_fraction=--fraction, optimizer=...).select(proxies, labels)`` after an untimed
warm-up on two whole classes; on CUDA the timing is bracketed by ``torch.cuda.synchronize`` and
``peak_gpu_mib`` is ``torch.cuda.max_memory_allocated`` over the round (the proxies included,
``resident_gpu_mib`` before it). On CPU ``peak_rss_mib`` is the process's high-water mark
(never reset). The JSON is rewritten after every round, so a run cut short keeps the rounds done.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, save  # noqa: E402
from epic.selection import EPIC, gradient_proxy  # noqa: E402

_MiB = 2**20


def device_proxies(n: int, num_classes: int, *, device: torch.device, seed: int,
                   dim: int | None = None,
                   chunk: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim or num_classes) float32 proxies and (n,) labels, drawn on ``device``.

    The mixture of ``selection_scaling.synthetic_proxies``: margins 9, 6, 3 and 0 on the true
    class (weights 0.4, 0.3, 0.2, 0.1), the last three lifting a fixed rival class by 2, 3 and
    4; 1% of the examples get a margin of 9 on a random other class instead.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    k = num_classes
    labels = torch.arange(n, device=device) % k
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], device=device)
    margins = torch.tensor([9.0, 6.0, 3.0, 0.0], device=device)
    lifts = torch.tensor([0.0, 2.0, 3.0, 4.0], device=device)
    shift = torch.randint(0, max(k - 1, 1), (k, 4), generator=g, device=device)
    rivals = (torch.arange(k, device=device)[:, None] + 1 + shift) % k
    proj = None
    if dim is not None:
        proj = torch.randn(k, dim, generator=g, device=device) / math.sqrt(dim)
    out = torch.empty(n, k if proj is None else dim, device=device)
    for lo in range(0, n, chunk):
        y = labels[lo:lo + chunk]
        m = len(y)
        rows = torch.arange(m, device=device)
        comp = torch.multinomial(weights, m, replacement=True, generator=g)
        z = torch.randn(m, k, generator=g, device=device)
        z[rows, rivals[y, comp]] += lifts[comp]
        misfit = torch.rand(m, generator=g, device=device) < 0.01
        other = (y + 1 + torch.randint(0, max(k - 1, 1), (m,), generator=g, device=device)) % k
        top = torch.where(misfit, other, y)
        z[rows, top] += torch.where(misfit, 9.0, margins[comp])
        vectors = gradient_proxy(z, y).vectors
        out[lo:lo + m] = vectors if proj is None else vectors @ proj
    return out, labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one_round(epic: EPIC, proxies: torch.Tensor, labels: torch.Tensor,
              device: torch.device) -> dict[str, Any]:
    """Time ``epic.select`` once; peak device memory over the round on CUDA."""
    cuda = device.type == "cuda"
    if cuda:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    result = epic.select(proxies, labels)
    _sync(device)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"seconds": seconds, "medoids": int(result.medoids.numel()),
                           "dropped": result.num_dropped,
                           "result_device": str(result.keep.device)}
    if cuda:
        out["resident_gpu_mib"] = resident / _MiB
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / _MiB
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_280_000, help="number of proxies")
    ap.add_argument("--num-classes", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=None,
                    help="project the proxies onto this many dimensions (default: num classes)")
    ap.add_argument("--fraction", type=float, default=0.1, help="EPIC subset_fraction")
    ap.add_argument("--optimizer", nargs="+", choices=["auto", "lazy", "stochastic"],
                    default=["stochastic"], help="one round per optimizer, in this order")
    ap.add_argument("--memory-mb", type=float, default=2048.0, help="EPIC memory_mb")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds per optimizer")
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda[:N]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="JSON path (default runs/gpu_selection_round-<time>/result.json)")
    args = ap.parse_args()
    if args.n < 2 * args.num_classes:
        ap.error(f"--n must be at least 2 per class ({2 * args.num_classes}), got {args.n}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available; use --device cpu")

    _sync(device)
    t0 = time.perf_counter()
    proxies, labels = device_proxies(args.n, args.num_classes, device=device, seed=args.seed,
                                     dim=args.dim)
    _sync(device)
    payload: dict[str, Any] = {
        "config": {**vars(args), "resolved_device": str(device)},
        "env": environment(),
        "proxies": {"n": args.n, "classes": args.num_classes, "dim": int(proxies.shape[1]),
                    "mib": proxies.numel() * proxies.element_size() / _MiB,
                    "build_seconds": time.perf_counter() - t0},
        "results": [],
    }
    warm = (labels < 2).nonzero().squeeze(1)  # two whole classes: kernels, allocator
    path = None
    for name in args.optimizer:
        epic = EPIC(subset_fraction=args.fraction, optimizer=name, memory_mb=args.memory_mb,
                    seed=args.seed)
        print(f"{name}: warm-up, then {args.repeats} round(s) on {args.n:,} proxies ...",
              file=sys.stderr, flush=True)
        epic.select(proxies[warm], labels[warm])
        rounds = [one_round(epic, proxies, labels, device) for _ in range(args.repeats)]
        seconds = [r["seconds"] for r in rounds]
        payload["results"].append({
            "optimizer": name, "seconds": seconds, "mean_seconds": statistics.fmean(seconds),
            "std_seconds": statistics.pstdev(seconds), **{k: v for k, v in rounds[-1].items()
                                                          if k != "seconds"}})
        path = save("gpu_selection_round", payload, path or args.out)

    rows = [[r["optimizer"], f"{r['mean_seconds']:.2f}", r["medoids"], r["dropped"],
             f"{r['peak_gpu_mib'] / 1024:.2f}" if "peak_gpu_mib" in r else "-",
             f"{r['peak_rss_mib'] / 1024:.2f}"] for r in payload["results"]]
    gpu = payload["env"]["cuda"] if device.type == "cuda" else "cpu"
    print(f"\nOne EPIC-{args.fraction} round on {args.n:,} proxies of dimension "
          f"{payload['proxies']['dim']} in {args.num_classes:,} classes, {device} ({gpu}); "
          f"proxies built in {payload['proxies']['build_seconds']:.1f} s")
    print_table(["optimizer", "seconds", "medoids", "dropped", "peak GPU GiB", "peak RSS GiB"],
                rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
