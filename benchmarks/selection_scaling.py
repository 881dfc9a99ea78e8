"""Selection at scale: seconds and peak memory of one EPIC round as n grows, on CPU.

    python benchmarks/selection_scaling.py --mode classes     # n = 10k .. 1.28M in 1,000 classes
    python benchmarks/selection_scaling.py --mode one-class   # one class of n = 10k .. 200k
    python benchmarks/selection_scaling.py --quick            # small sizes: a smoke run
    [--sizes N ...] [--memory-mb 2048] [--repeats 1] [--threads T] [--timeout 900] [--out PATH]

Each point is one full ``EPIC(subset_fraction=0.1).select(proxies, labels)`` round on synthetic
proxies ``softmax(z) - onehot(y)``: logits ``z`` drawn per class from a seeded Gaussian mixture
(confident, less confident and confusable components, plus 1% of examples confidently in another
class), so the proxy dimension is the number of classes (``--num-classes``; ``--dim`` projects
the proxies onto fewer dimensions with a seeded Gaussian matrix). ``--mode classes`` spreads n
over 1,000 classes (10 to 1,280 per class) with stochastic greedy; ``--mode one-class`` puts all
n in one class of a 10-class model (proxy dimension 10; pass ``--num-classes`` for more), with
stochastic greedy and, up to ``--lazy-max``, lazy greedy.

Every point runs in a fresh child process (forked before any torch work), which builds its
proxies, warms up on a small slice, resets the kernel's peak-RSS counter and then times the
round: ``peak_rss_mib`` is that process's high-water mark during selection (proxies included).
A point that runs past ``--timeout`` is killed and the larger sizes of its series are skipped, as
is a point that the last two measured ones predict to run past it; their seconds are
extrapolated from the last two measured points (marked as such). The growth
exponent of a series is the least-squares slope of log seconds against log n.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import re
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, save  # noqa: E402

FULL_SIZES = {"classes": [10_000, 50_000, 200_000, 1_280_000],
              "one-class": [10_000, 50_000, 200_000]}
QUICK_SIZES = {"classes": [1_000, 2_000], "one-class": [500, 1_000]}
DEFAULT_CLASSES = {"classes": 1_000, "one-class": 10}
QUICK_CLASSES = {"classes": 20, "one-class": 10}
_MiB = 2**20


# ----------------------------------------------------------------------------- the proxies
def synthetic_proxies(n: int, num_classes: int, *, one_class: bool, seed: int,
                      dim: int | None = None, chunk: int = 65_536):
    """(n, dim or num_classes) float32 proxies and (n,) labels, built chunk by chunk.

    Each class has four logit components: margins 9, 6, 3 and 0 on the true class (weights
    0.4, 0.3, 0.2, 0.1), the last three also lifting a fixed rival class by 2, 3 and 4; 1% of
    the examples get a margin of 9 on a random other class instead (misfits, the isolated kind).
    """
    import torch

    from epic.selection import gradient_proxy

    g = torch.Generator().manual_seed(seed)
    k = num_classes
    labels = torch.zeros(n, dtype=torch.long) if one_class else torch.arange(n) % k
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    margins = torch.tensor([9.0, 6.0, 3.0, 0.0])
    lifts = torch.tensor([0.0, 2.0, 3.0, 4.0])
    shift = torch.randint(0, max(k - 1, 1), (k, 4), generator=g)
    rivals = (torch.arange(k)[:, None] + 1 + shift) % k  # a fixed other class per component
    proj = None
    if dim is not None:
        proj = torch.randn(k, dim, generator=g) / math.sqrt(dim)
    out = torch.empty(n, k if proj is None else dim)
    for lo in range(0, n, chunk):
        y = labels[lo:lo + chunk]
        m = len(y)
        rows = torch.arange(m)
        comp = torch.multinomial(weights, m, replacement=True, generator=g)
        z = torch.randn(m, k, generator=g)
        z[rows, rivals[y, comp]] += lifts[comp]
        misfit = torch.rand(m, generator=g) < 0.01
        other = (y + 1 + torch.randint(0, max(k - 1, 1), (m,), generator=g)) % k
        top = torch.where(misfit, other, y)
        z[rows, top] += torch.where(misfit, torch.tensor(9.0), margins[comp])
        vectors = gradient_proxy(z, y).vectors
        out[lo:lo + m] = vectors if proj is None else vectors @ proj
    return out, labels


# ------------------------------------------------------------------------------ one point
def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one point's proxies and time ``repeats`` EPIC rounds on them (in this process)."""
    import torch

    from epic.selection import EPIC

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    proxies, labels = synthetic_proxies(spec["n"], spec["num_classes"],
                                        one_class=spec["mode"] == "one-class",
                                        seed=spec["seed"], dim=spec["dim"])
    build = time.perf_counter() - t0
    epic = EPIC(subset_fraction=spec["fraction"], optimizer=spec["optimizer"],
                memory_mb=spec["memory_mb"], seed=spec["seed"])
    warm = min(spec["n"], 2_000)  # untimed warm-up on a slice: kernels, allocator
    epic.select(proxies[:warm], labels[:warm])
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak()
    times, result = [], None
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        result = epic.select(proxies, labels)
        times.append(time.perf_counter() - t0)
    hwm = _status_kib("VmHWM") if reset else None
    return {
        "seconds": times,
        "build_seconds": build,
        "peak_rss_mib": (hwm if hwm is not None
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
        "peak_is_selection_only": hwm is not None,
        "rss_before_mib": None if rss_before is None else rss_before / 1024,
        "proxies_mib": proxies.numel() * proxies.element_size() / _MiB,
        "dim": int(proxies.shape[1]),
        "classes": int(labels.unique().numel()),
        "medoids": int(result.medoids.numel()),
        "dropped": result.num_dropped,
    }


def _child(spec: dict[str, Any], conn) -> None:
    try:
        conn.send({"status": "ok", **measure(spec)})
    except BaseException as err:  # report, don't hang the parent
        conn.send({"status": "error", "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()})
    finally:
        conn.close()


def run_point(spec: dict[str, Any], timeout: float, in_process: bool) -> dict[str, Any]:
    """One point in a fresh child process (forked, so torch is imported only once)."""
    if in_process:
        return {"status": "ok", **measure(spec)}
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, send))
    t0 = time.perf_counter()
    proc.start()
    send.close()
    if not recv.poll(timeout):  # nothing sent and the pipe still open: still running
        proc.kill()
        proc.join()
        return {"status": "timeout", "after_seconds": time.perf_counter() - t0}
    try:
        out = recv.recv()
    except EOFError:  # died without a word (e.g. killed for memory)
        out = None
    proc.join()
    if out is None:
        out = {"status": "error", "error": f"child exited with code {proc.exitcode}"}
    return out


# ------------------------------------------------------------------------------- analysis
def slope(ns: list[int], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) against log(n)."""
    if len(ns) < 2:
        return None
    xs, ys = [math.log(n) for n in ns], [math.log(s) for s in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def distance_path(class_size: int, memory_mb: float) -> str:
    """How facility location gets its distances for a class of this size (see ``_Distances``)."""
    return "precomputed" if class_size**2 * 4 <= memory_mb * _MiB / 2 else "on the fly"


def _rate(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, str]:
    """Growth exponent from two points; across a change of distance path their slope says
    nothing about larger n, so use 2 instead (greedy's O(n^2) distance evaluations per class)."""
    if a["distances"] != b["distances"]:
        return 2.0, "n^2 (the two largest measured points used different distance paths)"
    return slope([a["n"], b["n"]], [a["mean_seconds"], b["mean_seconds"]]), "last two points"


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def _available_mib() -> float | None:
    kib = None
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(),
                          re.MULTILINE)
        kib = int(found.group(1)) if found else None
    except OSError:
        pass
    return None if kib is None else kib / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["classes", "one-class", "both"], default="both")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="n for every sweep (default: 10k 50k 200k [1.28M for classes])")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="classes of the synthetic model = proxy dimension "
                         "(default 1000 for classes, 10 for one-class)")
    ap.add_argument("--dim", type=int, default=None, help="project proxies onto this many dims")
    ap.add_argument("--fraction", type=float, default=0.1, help="EPIC subset_fraction")
    ap.add_argument("--lazy-max", type=int, default=50_000,
                    help="one-class: also time lazy greedy up to this n (0: never)")
    ap.add_argument("--memory-mb", type=float, default=2048.0,
                    help="EPIC's bound on the distance block held at once")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int,
                    default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count(),
                    help="torch threads in each point (default $OMP_NUM_THREADS or all cores)")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds one point may take, proxies included; larger n then skipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small sizes and classes (smoke run)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the points in this process (faster start; peak memory then "
                         "includes the earlier points)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default runs/selection_scaling-<time>/result.json)")
    args = ap.parse_args()

    modes = ["classes", "one-class"] if args.mode == "both" else [args.mode]
    series = []
    for mode in modes:
        sizes = sorted(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)[mode])
        classes = args.num_classes or (QUICK_CLASSES if args.quick else DEFAULT_CLASSES)[mode]
        optimizers = ["stochastic"]
        if mode == "one-class" and args.lazy_max > 0 and sizes[0] <= args.lazy_max:
            optimizers.append("lazy")
        for opt in optimizers:
            todo = [n for n in sizes if opt == "stochastic" or n <= args.lazy_max]
            series.append({"mode": mode, "optimizer": opt, "num_classes": classes, "sizes": todo})

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the children's thread pools
    load_before = os.getloadavg()  # other work on the machine inflates the seconds
    results = []
    for s in series:
        points, stop = [], None
        for n in s["sizes"]:
            spec = {"mode": s["mode"], "optimizer": s["optimizer"], "n": n,
                    "num_classes": s["num_classes"], "dim": args.dim, "fraction": args.fraction,
                    "memory_mb": args.memory_mb, "repeats": args.repeats, "seed": args.seed,
                    "threads": args.threads}
            # The proxies, and ~1.75x them while EPIC's input check (isfinite) runs.
            per_class = n if s["mode"] == "one-class" else math.ceil(n / s["num_classes"])
            need = n * (args.dim or s["num_classes"]) * 4 / _MiB * 3
            avail = _available_mib()
            done = [p for p in points if p["status"] == "ok"]
            guess = None
            if len(done) >= 2:  # from the last two points: skip what would run past --timeout
                b, rate = done[-1], _rate(done[-2], done[-1])[0]
                guess = b["mean_seconds"] * (n / b["n"]) ** rate * args.repeats
            if stop is not None:
                out = {"status": "skipped", "reason": stop}
            elif guess is not None and guess > args.timeout:
                out = {"status": "skipped", "reason": f"predicted ~{guess:.0f} s > --timeout"}
            elif avail is not None and need > avail:
                out = {"status": "skipped",
                       "reason": f"needs ~{need:.0f} MiB of proxies, {avail:.0f} MiB available"}
            else:
                print(f"{s['mode']} {s['optimizer']} n={n} ...", file=sys.stderr, flush=True)
                out = run_point(spec, args.timeout, args.in_process)
                if out["status"] != "ok":
                    stop = f"n={n} {out['status']}"
                    print(f"  {out.get('error', out['status'])}", file=sys.stderr)
            if out["status"] == "ok":
                out["distances"] = distance_path(per_class, args.memory_mb)
                out["mean_seconds"] = statistics.fmean(out["seconds"])
                out["std_seconds"] = statistics.pstdev(out["seconds"])
            points.append({"n": n, **out})
        done = [p for p in points if p["status"] == "ok"]
        exponent = slope([p["n"] for p in done], [p["mean_seconds"] for p in done])
        local = [slope([a["n"], b["n"]], [a["mean_seconds"], b["mean_seconds"]])
                 for a, b in zip(done, done[1:], strict=False)]
        if len(done) >= 2:  # extrapolate what was not measured from the last two points
            last, rate, source = done[-1], *_rate(done[-2], done[-1])
            for p in points:
                if p["status"] != "ok" and p["n"] > last["n"]:
                    p["extrapolated_seconds"] = last["mean_seconds"] * (p["n"] / last["n"]) ** rate
                    p["extrapolated_with_exponent"] = rate
                    p["exponent_from"] = source
        results.append({**s, "points": points, "growth_exponent": exponent,
                        "local_exponents": local})

    rows = []
    for r in results:
        for i, p in enumerate(r["points"]):
            if p["status"] == "ok":
                secs = _fmt(p["mean_seconds"])
                if len(p["seconds"]) > 1:
                    secs += f" ± {_fmt(p['std_seconds'])}"
                mem = f"{p['peak_rss_mib']:.0f}"
                extra = f"{p['dropped']}/{p['medoids']}"
            else:
                est = p.get("extrapolated_seconds")
                secs = f"~{_fmt(est)} (extrapolated)" if est is not None else "-"
                mem, extra = "-", p["status"]
            per_class = p["n"] if r["mode"] == "one-class" else p["n"] / r["num_classes"]
            exp = f"{r['growth_exponent']:.2f}" if i == 0 and r["growth_exponent"] else ""
            rows.append([r["mode"], r["optimizer"], f"{p['n']:,}", f"{per_class:,.0f}",
                         args.dim or r["num_classes"], p.get("distances", "-"), secs, mem, extra,
                         exp])
    where = "in process" if args.in_process else "one process per point"
    print(f"\nOne EPIC round (subset_fraction {args.fraction}, memory_mb {args.memory_mb:g}), "
          f"{args.threads} thread(s), {where}, mean of {args.repeats}")
    print_table(["mode", "optimizer", "n", "per class", "dim", "distances", "seconds",
                 "peak RSS MiB",
                 "dropped/medoids", "growth exponent"], rows)
    for r in results:
        for p in r["points"]:
            if p["status"] != "ok":
                why = (p.get("reason") or p.get("error")
                       or f"killed after {p.get('after_seconds', 0):.0f} s")
                print(f"{r['mode']} {r['optimizer']} n={p['n']:,}: {p['status']} ({why})")
        if r["local_exponents"]:
            steps = ", ".join(f"{e:.2f}" for e in r["local_exponents"])
            print(f"{r['mode']} {r['optimizer']}: exponent between consecutive sizes: {steps}")
    env = {**environment(), "threads": args.threads,  # what every point ran with
           "load_average_before": load_before, "load_average_after": os.getloadavg()}
    path = save("selection_scaling", {"config": vars(args),
                                      "threads": args.threads, "env": env, "results": results},
                args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
