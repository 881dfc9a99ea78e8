"""Greedy maximisation of the facility-location function.

``F(S) = sum_i max_{j in S} (c0 - d(i, j))`` rewards a set of medoids ``S`` that is close to every
point. With ``c0`` at least the largest distance, the greedy choice does not depend on ``c0``:
the first medoid minimises ``sum_i d(i, j)`` and every later one maximises the reduction
``sum_i max(0, m_i - d(i, j))`` of each point's distance ``m_i`` to its nearest medoid so far.
So the solvers below work on distances alone and ``c0`` only enters :func:`objective`.

Two solvers, both vectorised and chunked so that memory stays bounded. When the distance
matrix does not fit, each row sum (a point's total distance, a candidate's gain) is computed
over cache-sized blocks and never held whole: a greedy step evaluates tens of rows of ``n``
distances, and with low-dimensional proxies their cost is memory traffic, not arithmetic.

* ``"lazy"``: exact greedy. With the matrix in memory, every candidate's gain is kept exact by
  incremental updates (see :func:`_exact_greedy`): the points a new medoid takes over change
  the gains of nearby candidates only. Otherwise Minoux's lazy evaluation in batches: stale
  gains are upper bounds (submodularity); each step re-evaluates the stale top of the bound
  vector together, in one matrix operation, until the best bound is a fresh gain.
* ``"stochastic"``: stochastic greedy (Mirzasoleiman et al. 2015): each step evaluates a seeded
  random sample of ``(n / k) log(1 / epsilon)`` candidates; ``1 - 1/e - epsilon`` in expectation.

While selecting, each point remembers its nearest medoid, so the assignment of points to
medoids comes for free (ties go to the earlier medoid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import EpicError
from .._validation import check_int
from .proxy import GradientProxy, as_proxy, pairwise_distances

__all__ = ["FacilityLocationResult", "facility_location", "objective", "OPTIMIZERS"]

OPTIMIZERS = ("lazy", "stochastic", "auto")
_MiB = 2**20
# On-the-fly row sums go over blocks of about _BLOCK distances (<= _BLOCK_ROWS rows), which
# stay in cache: a few in-cache passes per block instead of several passes over (rows, n).
_BLOCK = 2**17
_BLOCK_ROWS = 256
# The CPU storage of the last precomputed matrix is kept for the next one (if at most
# _SPARE_MB): a fresh 100 MB tensor costs ~35 ms of page faults, about what computing the
# matrix costs, and a selection round builds one per class, round after round.
_SPARE_MB = 512
# Rows of the exact greedy's update read together (each block reads a window of columns).
_STEP_ROWS = 64
# Top candidates the exact greedy examines at once: more rows cost more than the extra
# disjoint picks save (8 vs 16: ~7% faster on 5,000 MNIST proxies).
_TAKE_MAX = 8
_spare: list[Tensor] = []


@dataclass(frozen=True)
class FacilityLocationResult:
    """Medoids in selection order and the assignment of every point.

    Attributes:
        medoids: (k,) int64 point indices, in the order they were chosen.
        gains: (k,) marginal reduction of the summed nearest-medoid distance at each pick
            (the first is ``-sum_i d(i, medoid_0)``, i.e. relative to ``c0 = 0``).
        assignment: (n,) int64 position in ``medoids`` of each point's nearest medoid.
        cluster_sizes: (k,) int64 number of points assigned to each medoid.
        min_dist: (n,) distance of each point to its nearest medoid.
    """

    medoids: Tensor
    gains: Tensor
    assignment: Tensor
    cluster_sizes: Tensor
    min_dist: Tensor


def _fits(n: int, memory_mb: float) -> bool:
    """Whether the (n, n) float32 matrix is precomputed: it takes at most half the budget."""
    return n * n * 4 <= memory_mb * _MiB / 2


def _line(points: GradientProxy) -> Tensor:
    """(n,) a 1-Lipschitz map of the points to a line, ``|key_i - key_j| <= ||p_i - p_j||``.

    Plain vectors: their coordinate along the leading principal direction (a few power
    iterations from the longest vector; any unit direction would do, this one spreads the
    points most). Factored proxies: the norm of the flattened vector.
    """
    if points.features is not None:
        return points.sq_norms().sqrt()
    x = points.vectors
    v = x[x.pow(2).sum(1).argmax()]
    for _ in range(8):
        v = x.T @ (x @ v)
        v = v / v.norm().clamp(min=torch.finfo(x.dtype).tiny)  # all-equal points: v = 0
    return x @ v


class _Distances:
    """Rows of the pairwise distance matrix: precomputed if it fits the budget, else on the fly."""

    def __init__(self, points: GradientProxy, metric: str, memory_mb: float) -> None:
        self.points = points
        self.metric = metric
        self.n = len(points)
        self.sq = points.sq_norms()
        # Rows per chunk so that a (rows, n) float32 block stays within a quarter of the budget.
        self.chunk = max(1, int(memory_mb * _MiB / 4 / (4 * max(self.n, 1))))
        # Rows of an on-the-fly row sum at once: cache-sized blocks on the CPU; elsewhere (GPU)
        # whole rows, as few large kernels beat many small ones there.
        self.cpu = points.device.type == "cpu"
        self.sum_rows = min(self.chunk, _BLOCK_ROWS) if self.cpu else self.chunk
        # Rows of the matrix built (or scanned) at once: blocks of about _BLOCK distances on
        # the CPU, so that the in-place passes over a block run in cache.
        self.block_rows = (min(self.chunk, max(8, _BLOCK // max(self.n, 1))) if self.cpu
                           else self.chunk)
        self._columns: dict[int, list[tuple[GradientProxy, Tensor, int]]] = {}
        self.full: Tensor | None = None
        self.row_sums: Tensor | None = None
        if _fits(self.n, memory_mb):
            self.full, self.row_sums = self._matrix()

    def _matrix(self) -> tuple[Tensor, Tensor]:
        """The (n, n) distance matrix, built block by block in place, and its row sums."""
        n, storage = self.n, None
        if self.cpu:
            try:  # pop (atomic): a concurrent call finds another or allocates its own
                storage = _spare.pop()
            except IndexError:
                storage = None
            if storage is not None and (storage.dtype != self.sq.dtype
                                        or storage.numel() < n * n):
                storage = None
        self.storage = self.sq.new_empty(n * n) if storage is None else storage
        full = self.storage[:n * n].view(n, n)
        plain = self.points.features is None and self.metric == "euclidean"
        if plain:  # |a|^2 + |b|^2 - 2 a.b as one product: [-2a, 1, |a|^2] . [b, |b|^2, 1]
            x, sq, ones = self.points.vectors, self.sq[:, None], self.sq.new_ones(n, 1)
            left, right = torch.cat([x * -2, ones, sq], 1), torch.cat([x, sq, ones], 1).T
        sums = []
        for lo in range(0, n, self.block_rows):
            part = slice(lo, min(lo + self.block_rows, n))
            if plain:
                block = torch.mm(left[part], right, out=full[part]).clamp_(min=0).sqrt_()
            else:
                block = pairwise_distances(self.points[part], self.points, metric=self.metric,
                                           a_sq=self.sq[part], b_sq=self.sq, out=full[part])
            block[:, part].diagonal().zero_()  # exact zeros (rounding leaves ~1e-4 there)
            sums.append(block.sum(1))  # while the block is in cache
        return full, torch.cat(sums) if sums else self.sq.new_zeros(0)

    def release(self) -> None:
        """Done with the matrix: keep its CPU storage for the next one (see ``_SPARE_MB``)."""
        storage, self.full, self.storage = getattr(self, "storage", None), None, None
        if storage is not None and storage.device.type == "cpu" \
                and storage.numel() * storage.element_size() <= _SPARE_MB * _MiB:
            _spare[:] = [storage, *_spare][:2]  # two: classes may run side by side

    def _compute(self, idx: Tensor) -> Tensor:
        blocks = [
            pairwise_distances(self.points[part], self.points, metric=self.metric,
                               a_sq=self.sq.index_select(0, part), b_sq=self.sq)
            for part in idx.split(self.chunk)
        ]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def rows(self, idx: Tensor) -> Tensor:
        """(len(idx), n) distances from the points ``idx`` to every point."""
        # index_select: advanced indexing of rows is ~100x slower on CPU for small index sets.
        return self.full.index_select(0, idx) if self.full is not None else self._compute(idx)

    def row(self, j: int) -> Tensor:
        """(n,) distances from point ``j`` (a view when the matrix is precomputed)."""
        if self.full is not None:
            return self.full[j]
        return self._compute(torch.tensor([j], device=self.points.device))[0]

    def columns(self, rows: int) -> list[tuple[GradientProxy, Tensor, int]]:
        """Column blocks ``(points, squared norms, first index)`` of about ``_BLOCK / rows``
        points on the CPU (a power of two, at least 256; cached per width), else one block."""
        width = 1 << max(8, (_BLOCK // max(rows, 1)).bit_length() - 1) if self.cpu else self.n
        if width not in self._columns:
            self._columns[width] = [(self.points[lo:lo + width], self.sq[lo:lo + width], lo)
                                    for lo in range(0, self.n, width)]
        return self._columns[width]

    def sums(self, idx: Tensor, offset: Tensor | None = None) -> Tensor:
        """(len(idx),) ``sum_i d(j, i)`` for each ``j`` in ``idx``; with ``offset`` (n,), the
        facility-location gains ``sum_i max(0, offset_i - d(j, i))``."""
        if self.full is not None:
            if offset is None and len(idx) == self.n and self.row_sums is not None:
                return self.row_sums.index_select(0, idx)  # summed while building
            out = []
            for part in idx.split(self.chunk):
                rows = self.full.index_select(0, part)
                out.append(rows.sum(1) if offset is None
                           else (offset[None, :] - rows).clamp_(min=0).sum(1))
            return torch.cat(out)
        out = []
        for part in idx.split(self.sum_rows):
            a, a_sq = self.points[part], self.sq.index_select(0, part)
            acc = a_sq.new_zeros(len(part))
            for b, b_sq, lo in self.columns(len(part)):
                block = pairwise_distances(a, b, metric=self.metric, a_sq=a_sq, b_sq=b_sq)
                if offset is not None:
                    block = block.neg_().add_(offset[lo:lo + len(b_sq)]).clamp_(min=0)
                acc += block.sum(1)
            out.append(acc)
        return torch.cat(out)

    def reduce_rows(self, fn) -> Tensor:
        """Apply ``fn`` to every (chunk, n) block of rows and concatenate the (chunk,) results."""
        idx = torch.arange(self.n, device=self.points.device)
        return torch.cat([fn(self.rows(part)) for part in idx.split(self.chunk)])


def facility_location(points: Tensor | GradientProxy, k: int, *, metric: str = "euclidean",
                      optimizer: str = "auto", epsilon: float = 0.01, batch_size: int = 16,
                      memory_mb: float = 2048.0, stochastic_above: int = 100_000,
                      generator: torch.Generator | None = None) -> FacilityLocationResult:
    """Pick ``k`` medoids of ``points`` by greedy facility-location maximisation.

    Args:
        points: (n, d) vectors or a :class:`~epic.selection.GradientProxy`.
        k: number of medoids, 1 <= k <= n.
        metric: ``"euclidean"`` or ``"cosine"``.
        optimizer: ``"lazy"`` (exact greedy), ``"stochastic"``, or ``"auto"`` (stochastic when
            ``n > stochastic_above``).
        epsilon: stochastic greedy's accuracy parameter.
        batch_size: candidates re-evaluated together in one lazy step; on the precomputed
            matrix, at most ``min(batch_size, 8)`` best candidates are taken at once when the
            points they would take over are disjoint (the same picks, in fewer steps).
        memory_mb: bound on the distance block held at once; the full (n, n) matrix is
            precomputed only when it takes at most half of it.
        stochastic_above: the ``"auto"`` threshold.
        generator: random source for ``"stochastic"`` (seed it for reproducible picks).

    Returns:
        A :class:`FacilityLocationResult`.
    """
    pts = as_proxy(points)
    n = len(pts)
    check_int("k", k, minimum=1)
    if k > n:
        raise EpicError(f"k must be <= the number of points ({n}), got {k}")
    if optimizer not in OPTIMIZERS:
        raise EpicError(f"unknown value {optimizer!r} for optimizer; "
                        f"valid values are {list(OPTIMIZERS)}")
    if optimizer == "auto":
        optimizer = "stochastic" if n > stochastic_above else "lazy"
    if pts.features is None and metric == "euclidean":  # less cancellation, same distances
        pts = GradientProxy._trusted(pts.vectors - pts.vectors.mean(0), None)
    key = order = None
    if optimizer == "lazy" and metric == "euclidean" and _fits(n, memory_mb):
        # the exact greedy below reads windows of columns: sort the points along a line
        key, order = _line(pts).sort(stable=True)
        pts = pts[order]
    dist = _Distances(pts, metric, memory_mb)
    device = pts.device

    assignment = torch.zeros(n, dtype=torch.long, device=device)
    medoids: list[int] = []
    gains: list[float] = []

    # First medoid: the point with the smallest total distance (argmin returns the first tie).
    everyone = torch.arange(n, device=device)
    col_sums = dist.sums(everyone)
    first = int(torch.argmin(col_sums))
    min_dist = dist.row(first).clone()
    min_dist[first] = 0.0
    medoids.append(first)
    gains.append(-float(col_sums[first]))

    def take(t: int, j: int, gain: float) -> None:
        row = dist.row(j)
        assignment.masked_fill_(row < min_dist, t)
        assignment[j] = t
        torch.minimum(min_dist, row, out=min_dist)
        min_dist[j] = 0.0
        medoids.append(j)
        gains.append(gain)

    def exact_gains(cand: Tensor) -> Tensor:
        return dist.sums(cand, min_dist)

    if optimizer == "lazy" and dist.full is not None:
        # bounds the rounding of a distance computed as sqrt(|a|^2 + |b|^2 - 2 a.b): that of
        # the sum is at most ~(d + 2) eps 4 max|x|^2 (a dozen terms), its square root ~7x this
        slack = 8 * math.sqrt(torch.finfo(dist.sq.dtype).eps) * float(dist.sq.max().sqrt())
        _exact_greedy(dist, k, min_dist, assignment, medoids, gains, key=key, slack=slack,
                      batch=min(batch_size, _TAKE_MAX))
    elif optimizer == "lazy":
        # bound[j] >= the current gain of j (stale gains only shrink); -inf marks medoids.
        bound = dist.sums(everyone, min_dist)
        bound[first] = -math.inf
        for t in range(1, k):
            left = n - t
            m = min(batch_size, left)
            while True:
                # Re-evaluate the m best bounds; the (m+1)-th bounds everything not evaluated.
                vals, cand = torch.topk(bound, min(m + 1, left))
                cand = cand[:m]
                g = exact_gains(cand)
                bound.index_copy_(0, cand, g)
                best = int(torch.argmax(g))
                if m == left or bool(g[best] >= vals[m]):
                    break
            j = int(cand[best])
            take(t, j, float(g[best]))
            bound[j] = -math.inf
    else:
        size = min(n, max(1, math.ceil(n / k * math.log(1.0 / epsilon))))
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        free = torch.ones(n, dtype=torch.bool)
        free[first] = False
        for t in range(1, k):
            pool = free.nonzero().squeeze(1)
            pick = torch.randperm(len(pool), generator=gen)[: min(size, len(pool))]
            cand = pool[pick].sort().values
            g = exact_gains(cand.to(device))
            best = int(torch.argmax(g))
            j = int(cand[best])
            take(t, j, float(g[best]))
            free[j] = False

    dist.release()
    medoids_t = torch.tensor(medoids, dtype=torch.long, device=device)
    if order is not None:  # back to the input's order
        medoids_t = order[medoids_t]
        assignment = torch.empty_like(assignment).index_copy_(0, order, assignment)
        min_dist = torch.empty_like(min_dist).index_copy_(0, order, min_dist)
    gains_t = torch.tensor(gains, dtype=torch.float32, device=device)
    sizes = torch.bincount(assignment, minlength=k)
    return FacilityLocationResult(medoids_t, gains_t, assignment, sizes, min_dist)


def _exact_greedy(dist: _Distances, k: int, min_dist: Tensor, assignment: Tensor,
                  medoids: list[int], gains: list[float], *, key: Tensor | None, slack: float,
                  batch: int) -> None:
    """Greedy steps 2..k on the precomputed matrix, keeping every candidate's gain exact.

    When medoid ``j`` is added, only the points ``A = {i : d(i, j) < m_i}`` it takes over
    change their nearest distance, from ``old_i`` to ``new_i = d(i, j)``; candidate ``c`` then
    loses ``sum_{i in A} max(0, min(old_i - d(i, c), old_i - new_i))``. Summed over the run,
    ``|A|`` is a few times ``n`` (each point changes medoid a few times), so keeping all gains
    exact reads a few ``(n, n)`` matrices' worth of rows, where lazy re-evaluation reads tens of
    them (stale bounds of near-equal candidates need many rounds). Gains accumulate in float64.

    Two savings on top:

    * ``key`` (ascending, or None): a 1-Lipschitz image of the points on a line,
      ``|key_i - key_c| <= d(i, c)``. Point ``i`` only changes the gain of candidates with
      ``|key_c - key_i| < old_i``, so each block of rows of ``A`` reads only the columns of a
      window of ``key`` (widened by ``slack`` for the rounding of the distances).
    * The ``batch`` best candidates are taken at once while the sets ``A`` they would take over
      are disjoint: adding one then leaves the others' gains unchanged (the points that would
      change them are in their own sets), and every other gain only shrinks, so greedy would
      pick them next, in this order.
    """
    full, n = dist.full, dist.n
    gain = torch.empty(n, dtype=torch.float64, device=full.device)
    buf = full.new_empty(min(dist.block_rows, n), n)
    for lo in range(0, n, dist.block_rows):  # gain_c = sum_i max(0, m_i - d(c, i))
        hi = min(lo + dist.block_rows, n)
        gain[lo:hi] = torch.sub(min_dist, full[lo:hi], out=buf[:hi - lo]).clamp_(min=0).sum(1)
    gain[medoids[0]] = -math.inf
    widen = torch.tensor([-slack, slack], dtype=full.dtype, device=full.device)
    t = 1
    while t < k:
        vals, top = gain.topk(min(batch, k - t))
        rows = full.index_select(0, top)
        took = rows < min_dist  # (q, n): the points each candidate would take over
        union = took.any(0).nonzero().squeeze(1)
        took = took.index_select(1, union)  # (q, u), u usually far below n
        q = len(top)
        if q > 1:  # keep the candidates before the first whose set meets an earlier one's
            sets = took.to(full.dtype)
            meets = torch.mm(sets, sets.T).tril_(-1).amax(1) > 0  # (q,) exact counts < 2^24
            q = int(torch.cat([meets[1:], meets.new_ones(1)]).int().argmax()) + 1
            vals, top, rows, took = vals[:q], top[:q], rows[:q], took[:q]
        at, owner = took.T.nonzero().unbind(1)  # sorted by point, i.e. by key
        point = union.index_select(0, at)
        new = rows.reshape(-1).index_select(0, owner * n + point)
        old = min_dist.index_select(0, point)
        step = _STEP_ROWS
        blocks = len(point) // step + (len(point) % step > 0)
        windows = [(0, n)] * blocks
        if key is not None:  # each block of rows can only change a window of candidates
            kp = key.index_select(0, point)
            pad = blocks * step - len(point)
            lows = torch.nn.functional.pad(kp - old, (0, pad), value=math.inf)
            highs = torch.nn.functional.pad(kp + old, (0, pad), value=-math.inf)
            ends = torch.stack([lows.view(blocks, step).amin(1), highs.view(blocks, step).amax(1)])
            ends = torch.searchsorted(key, ends.add_(widen[:, None]), right=True)
            windows = ends.T.tolist()
        # strict=False: an empty point set splits into one empty block but has no window
        for part, o, w, (a, b) in zip(point.split(step), old.unsqueeze(1).split(step),
                                      new.unsqueeze(1).split(step), windows, strict=False):
            block = full.narrow(1, a, b - a).index_select(0, part)  # d(i, c) = d(c, i)
            block = torch.sub(o, torch.maximum(block, w, out=block), out=block).clamp_(min=0)
            gain.narrow(0, a, b - a).sub_(block.sum(0))
        min_dist.index_copy_(0, point, new)
        assignment.index_copy_(0, point, owner + t)
        assignment.index_copy_(0, top, torch.arange(t, t + q, device=top.device))
        gain.index_fill_(0, top, -math.inf)
        medoids.extend(top.tolist())
        gains.extend(vals.tolist())
        t += q


def objective(points: Tensor | GradientProxy, medoids: Tensor, *, metric: str = "euclidean",
              c0: float | None = None, memory_mb: float = 2048.0) -> float:
    """``F(S) = sum_i max_{j in S} (c0 - d(i, j))`` for the medoid indices ``medoids``.

    ``c0`` defaults to the largest pairwise distance, which makes every term non-negative.
    """
    pts = as_proxy(points)
    dist = _Distances(pts, metric, memory_mb)
    if c0 is None:
        c0 = float(dist.reduce_rows(lambda rows: rows.max(1).values).max())
    parts = medoids.to(pts.device).split(dist.chunk)
    nearest = torch.stack([dist.rows(part).min(0).values for part in parts]).min(0).values
    dist.release()
    return float((c0 - nearest).sum())
