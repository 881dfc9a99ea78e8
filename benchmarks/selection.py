"""One EPIC selection round on 50,000 proxies, against apricot-select's facility location.

    python benchmarks/selection.py [--source mnist|synthetic] [--repeats 3] [--threads T]
                                   [--no-apricot] [--no-submodlib] [--out PATH]
    python benchmarks/selection.py --one-class      # one class of 50,000: time and memory

Proxies are ``softmax(z) - onehot(y)`` of a partly trained model: by default a linear model
trained for one epoch on the first 50,000 MNIST training images (read from
``$EPIC_SHARED_DATA/mnist``), or with ``--source synthetic`` a seeded mix of confident, uncertain
and misfit examples. Per class, both libraries pick ``fraction * n_c`` medoids by lazy greedy
with Euclidean distances; both subsets are scored with the same objective
``F(S) = sum_i max_{j in S} (c0 - ||g_i - g_j||)``, c0 the largest distance in the class.
apricot converts squared Euclidean distances to similarities, so a second apricot row runs on
our exact similarity matrix (``metric="precomputed"``, the matrix's computation timed with it).
When ``import submodlib`` works (``pip install submodlib-py``; not a dependency of epic), its
dense facility location with lazy greedy is timed the same two ways; otherwise a note says it
was skipped. ``--threads`` sets torch's threads (on a machine shared with other jobs, 1 avoids
the stalls of oversubscribed OpenMP threads).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save, stats, timed  # noqa: E402
from epic.selection import EPIC, facility_location, gradient_proxy, objective  # noqa: E402
from epic.selection.proxy import pairwise_distances  # noqa: E402


def mnist_proxies(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from epic.data import load_split

    root = Path(os.environ.get("EPIC_SHARED_DATA", "../shared/data")) / "mnist"
    data = load_split("mnist", root, train=True)
    x = data.images[:n].flatten(1).float() / 255.0
    y = data.labels[:n]
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in torch.randperm(n).split(128):  # one epoch: partly trained
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    with torch.no_grad():
        return gradient_proxy(model(x), y).vectors, y


def synthetic_proxies(n: int, seed: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    logits = torch.randn(n, classes, generator=g)
    kind = torch.rand(n, generator=g)
    confident = kind < 0.7                     # well fit: large margin on the true class
    misfit = kind > 0.95                       # confidently wrong
    logits[confident, y[confident]] += 6.0
    shift = torch.randint(0, classes - 1, (int(misfit.sum()),), generator=g)
    wrong = (y[misfit] + 1 + shift) % classes
    logits[misfit, wrong] += 5.0
    return gradient_proxy(logits, y).vectors, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=["mnist", "synthetic"], default="mnist")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-apricot", action="store_true", help="skip apricot")
    ap.add_argument("--no-submodlib", action="store_true", help="skip submodlib")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own choice)")
    ap.add_argument("--one-class", action="store_true",
                    help="put every proxy in one class (memory check; epic only, no repeats)")
    ap.add_argument("--out", default=None, help="JSON path (default runs/selection-<time>/)")
    args = ap.parse_args()

    if args.source == "mnist":
        try:
            proxies, labels = mnist_proxies(args.n, args.seed)
        except Exception as err:  # the offline copy is absent: say so and fall back
            print(f"mnist proxies unavailable ({err}); using --source synthetic", file=sys.stderr)
            args.source = "synthetic"
    if args.source == "synthetic":
        proxies, labels = synthetic_proxies(args.n, args.seed)
    if args.one_class:
        labels = torch.zeros_like(labels)
        args.no_apricot, args.no_submodlib, args.repeats = True, True, 1
    classes = labels.unique().tolist()
    per_class = [(labels == c).nonzero().squeeze(1) for c in classes]
    epic = EPIC(subset_fraction=args.fraction, optimizer="lazy")

    def run_epic(optimizer: str):
        return [facility_location(proxies[i], epic.budget(len(i)), optimizer=optimizer).medoids
                for i in per_class]

    rows, results = [], {}
    methods = {"epic lazy": lambda: run_epic("lazy"),
               "epic stochastic": lambda: run_epic("stochastic")}
    if not args.one_class:
        methods["epic round (EPIC.select)"] = lambda: epic.select(proxies, labels)
    if not args.no_apricot:
        from apricot import FacilityLocationSelection

        def run_apricot(precomputed: bool):
            out = []
            for i in per_class:
                x = proxies[i].double()
                k = epic.budget(len(i))
                if precomputed:
                    d = pairwise_distances(x, x).numpy()
                    sel = FacilityLocationSelection(k, metric="precomputed", optimizer="lazy")
                    sel.fit(d.max() - d)
                else:
                    sel = FacilityLocationSelection(k, metric="euclidean", optimizer="lazy")
                    sel.fit(x.numpy())
                out.append(torch.as_tensor(np.asarray(sel.ranking, dtype=np.int64)))
            return out

        methods["apricot lazy (euclidean)"] = lambda: run_apricot(False)
        methods["apricot lazy (precomputed)"] = lambda: run_apricot(True)
    notes = []
    if not args.no_submodlib:
        try:
            from submodlib import FacilityLocationFunction
        except ImportError as err:
            notes.append(f"submodlib skipped: cannot import it ({err}); "
                         "`pip install submodlib-py` to time it too")
        else:
            def run_submodlib(precomputed: bool):
                out = []
                for i in per_class:
                    x = proxies[i].double()
                    k = epic.budget(len(i))
                    if precomputed:  # our exact objective's similarities, c0 - d
                        d = pairwise_distances(x, x).numpy()
                        fl = FacilityLocationFunction(n=len(i), mode="dense",
                                                      sijs=(d.max() - d).astype(np.float32),
                                                      separate_rep=False)
                    else:  # like apricot, similarities from squared Euclidean distances
                        fl = FacilityLocationFunction(n=len(i), mode="dense", data=x.numpy(),
                                                      metric="euclidean")
                    picked = fl.maximize(budget=k, optimizer="LazyGreedy", show_progress=False)
                    out.append(torch.tensor([j for j, _ in picked], dtype=torch.int64))
                return out

            methods["submodlib lazy (euclidean)"] = lambda: run_submodlib(False)
            methods["submodlib lazy (precomputed)"] = lambda: run_submodlib(True)

    if args.threads is not None:  # after the imports: importing apricot resets torch's threads
        torch.set_num_threads(args.threads)
    for name, fn in methods.items():
        times, out = timed(fn, args.repeats, warmup=0 if args.one_class else 1)
        if not isinstance(out, list):  # a SelectionResult: global medoids -> per-class positions
            out = [torch.isin(i, out.medoids).nonzero().squeeze(1) for i in per_class]
        f = sum(objective(proxies[i], m) for i, m in zip(per_class, out, strict=True))
        results[name] = {"seconds": stats(times), "objective": f,
                         "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}

    base = results.get("apricot lazy (euclidean)", {}).get("seconds", {}).get("mean")
    for name, r in results.items():
        s = r["seconds"]
        ratio = f"{base / s['mean']:.1f}x" if base else "-"
        rows.append([name, f"{s['mean']:.3f} ± {s['std']:.3f}", ratio, f"{r['objective']:.2f}",
                     r["peak_rss_mib"]])
    print(f"\n{args.n} proxies ({args.source}), {len(classes)} classes, fraction {args.fraction}, "
          f"{torch.get_num_threads()} threads, mean ± std over {args.repeats} runs")
    print_table(["method", "seconds", "speed-up vs apricot", "objective F(S)",
                 "peak RSS MiB (process so far)"], rows)
    for note in notes:
        print(note)
    path = save("selection", {"config": vars(args), "results": results,
                              "notes": notes}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
