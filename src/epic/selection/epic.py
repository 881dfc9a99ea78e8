"""EPIC: find the isolated medoids of each class in gradient space and drop them.

Yang, Liu and Mirzasoleiman, "Not All Poisons are Created Equal: Robust Training against Data
Poisoning", ICML 2022. Effective poisons pull their gradients away from the clean examples of
their class; a facility-location coreset of the class then spends a medoid on each of them, and
nothing else is close enough to join its cluster. Clusters of no more than
``cluster_threshold`` examples are dropped, every member.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import EpicError
from .._validation import check_choice, check_fraction, check_int, check_labels
from .facility import OPTIMIZERS, FacilityLocationResult, facility_location
from .proxy import METRICS, GradientProxy, as_proxy

__all__ = ["EPIC", "SelectionResult"]


@dataclass(frozen=True)
class SelectionResult:
    """What one EPIC round found. All index tensors refer to positions in the input.

    Attributes:
        keep: (N,) bool mask, False for dropped examples.
        dropped: (n_dropped,) int64 indices of the dropped examples, ascending.
        medoids: (M,) int64 indices of every medoid of every class.
        cluster_sizes: (M,) int64 size of each medoid's cluster (the medoid included).
        assignment: (N,) int64 index of each example's nearest medoid (same class).
    """

    keep: Tensor
    dropped: Tensor
    medoids: Tensor
    cluster_sizes: Tensor
    assignment: Tensor

    @property
    def num_dropped(self) -> int:
        return int(self.dropped.numel())


@dataclass(frozen=True)
class EPIC:
    """Per-class facility-location medoids; isolated medoids are dropped.

    Args:
        subset_fraction: medoid budget of each class as a fraction of its size, in (0, 1]
            (EPIC-0.1/0.2/0.3 in the paper). Each class gets ``max(1, round(f * n_c))``.
        cluster_threshold: clusters of at most this many examples are dropped, every member
            (default 1: singleton medoids, the paper's choice).
        metric: ``"euclidean"`` (the paper's) or ``"cosine"``.
        optimizer: ``"lazy"`` exact greedy, ``"stochastic"`` greedy, or ``"auto"``.
        memory_mb: bound on the distance block held in memory at once.
        seed: seed of the stochastic optimizer; each class ``c`` draws from its own generator
            seeded from ``(seed, c)``, so a class's medoids do not depend on which other
            classes are selected (or by which process).
    """

    subset_fraction: float = 0.1
    cluster_threshold: int = 1
    metric: str = "euclidean"
    optimizer: str = "auto"
    memory_mb: float = 2048.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_fraction("subset_fraction", self.subset_fraction)
        check_int("cluster_threshold", self.cluster_threshold, minimum=0)
        check_choice("metric", self.metric, METRICS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if not self.memory_mb > 0:
            raise EpicError(f"memory_mb must be > 0, got {self.memory_mb}")

    def budget(self, class_size: int) -> int:
        """Number of medoids for a class of ``class_size`` examples."""
        return min(class_size, max(1, int(self.subset_fraction * class_size + 0.5)))

    def select(self, proxies: Tensor | GradientProxy, labels: Tensor, *,
               num_classes: int | None = None,
               classes: Tensor | Sequence[int] | None = None) -> SelectionResult:
        """Run one selection round.

        Args:
            proxies: (N, d) per-example gradient proxies, or a :class:`GradientProxy`
                (see :func:`~epic.selection.gradient_proxy`).
            labels: (N,) integer class labels (the training labels, poisons included).
            num_classes: if given, labels must lie in [0, num_classes) and every class in that
                range must have examples.
            classes: cluster only these classes (e.g. one process's share of them); the
                examples of the other classes are kept, are no medoids and are assigned to
                themselves. Classes without examples are ignored. Default: every class.

        Returns:
            A :class:`SelectionResult` over the N inputs.

        Raises:
            EpicError: on mismatched shapes, labels out of range, empty input or empty classes.
        """
        pts = as_proxy(proxies)
        n = len(pts)
        if n == 0:
            raise EpicError("proxies are empty: there are no examples to select from")
        labels = check_labels(labels, n, num_classes).to(pts.device)
        present = torch.unique(labels).tolist()
        if num_classes is not None and len(present) < num_classes:
            missing = sorted(set(range(num_classes)) - set(present))
            raise EpicError(f"class(es) {missing} have no examples; pass num_classes=None to "
                            "select over the classes present")

        chosen = present
        if classes is not None:
            wanted = set(torch.as_tensor(classes).reshape(-1).tolist())
            chosen = [c for c in present if c in wanted]

        device = pts.device
        assignment = torch.arange(n, device=device)
        members = [(c, (labels == c).nonzero().squeeze(1)) for c in chosen]
        members = [(c, idx) for c, idx in members if len(idx) > self.cluster_threshold]
        # (classes with too few examples for isolation to mean anything keep them all)
        medoids, sizes = [], []
        for idx, res in zip((idx for _, idx in members),
                            _map_classes(self._select_class, pts, members), strict=True):
            medoids.append(idx[res.medoids])
            sizes.append(res.cluster_sizes)
            assignment[idx] = idx[res.medoids[res.assignment]]
        empty = torch.empty(0, dtype=torch.long, device=device)
        medoids_t = torch.cat(medoids) if medoids else empty
        sizes_t = torch.cat(sizes) if sizes else empty
        # Every member of a small cluster goes (the authors' rule): with the paper's threshold
        # of 1 that is the singleton medoid itself.
        small = medoids_t[sizes_t <= self.cluster_threshold]
        in_small = torch.zeros(n, dtype=torch.bool, device=device)
        in_small[small] = True
        keep = ~in_small[assignment]
        dropped = (~keep).nonzero().squeeze(1)
        return SelectionResult(keep, dropped, medoids_t, sizes_t, assignment)


    def _select_class(self, points: GradientProxy, c: int) -> FacilityLocationResult:
        """Facility location on the proxies ``points`` of class ``c``."""
        gen = torch.Generator().manual_seed(_class_seed(self.seed, c))
        return facility_location(points, self.budget(len(points)), metric=self.metric,
                                 optimizer=self.optimizer, memory_mb=self.memory_mb,
                                 generator=gen)


def _map_classes(fn: Callable[[GradientProxy, int], FacilityLocationResult],
                 pts: GradientProxy, members: list[tuple[int, Tensor]]
                 ) -> list[FacilityLocationResult]:
    """``fn(pts[idx], c)`` for every class ``(c, idx)``. On a CPU with several torch threads the
    classes run side by side, one thread each: a class's greedy is a chain of small operations
    that one core runs best. They run in worker processes where that is safe (see
    :func:`_class_pool`): in threads of one process, the Python between those operations holds
    the interpreter lock, so two classes at once took 0.8x the time of one after the other
    instead of 0.5x. The results do not depend on the number of threads or on the pool."""
    threads = torch.get_num_threads()
    if pts.device.type != "cpu" or threads < 2 or len(members) < 2:
        return [fn(pts[idx], c) for c, idx in members]
    # largest classes first, so that no worker is left with a big one at the end
    order = sorted(range(len(members)), key=lambda k: -len(members[k][1]))
    workers = min(threads, len(members))
    work = sum(len(idx) ** 2 for _, idx in members)  # ~ the distance matrices' size
    pool = _class_pool(workers) if work >= _PROCESS_WORK or workers in _POOLS else None
    if pool is not None:
        try:
            return _run(pool, fn, pts, members, order)
        except BrokenProcessPool:  # a worker died (e.g. killed): threads from now on
            _POOLS.pop(workers, None)
            _NO_PROCESSES.append(True)
            pool.shutdown(wait=False, cancel_futures=True)
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as threads_pool:
            return _run(threads_pool, fn, pts, members, order)
    finally:
        torch.set_num_threads(threads)


def _run(pool: Executor, fn: Callable[[GradientProxy, int], FacilityLocationResult],
         pts: GradientProxy, members: list[tuple[int, Tensor]], order: list[int]
         ) -> list[FacilityLocationResult]:
    futures = {k: pool.submit(fn, pts[members[k][1]], members[k][0]) for k in order}
    return [futures[k].result() for k in range(len(members))]


# Rounds with less work than this (the sum of the squared class sizes; ~0.3 s of greedy) keep
# to threads unless a pool is already running: starting one costs ~0.1 s.
_PROCESS_WORK = 5 * 10**7
_POOLS: dict[int, ProcessPoolExecutor] = {}
_NO_PROCESSES: list[bool] = []  # set once a pool broke


def _one_thread() -> None:
    torch.set_num_threads(1)


def _class_pool(workers: int) -> ProcessPoolExecutor | None:
    """A pool of ``workers`` forked processes (one torch thread each, as in a DataLoader
    worker) for the classes of a round, kept for the rounds after it. ``None`` where threads
    are used instead: not on Linux, with CUDA initialised or a ``torch.distributed`` process
    group in this process, or after a pool broke. Forked, not spawned: a spawned worker would
    re-run the user's main script."""
    if (_NO_PROCESSES or not sys.platform.startswith("linux") or torch.cuda.is_initialized()
            or (torch.distributed.is_available() and torch.distributed.is_initialized())):
        return None
    pool = _POOLS.get(workers)
    if pool is None:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_one_thread)
        _POOLS[workers] = pool
    return pool


def _class_seed(seed: int, c: int) -> int:
    """The stochastic solver's seed for class ``c`` of a selection seeded with ``seed``."""
    return (seed * 1_000_003 + c) % (2**63 - 1)
