"""How isolated each example is among the examples of its class.

EPIC calls a point isolated when a facility-location medoid ends up alone in its cluster; that
test is binary and depends on the medoid budget, so it also fires on ordinary hard examples.
:func:`knn_isolation` measures the same idea as a number: the distance from an example to its
``k``-th nearest neighbour of the same class. Gradient proxies of one model share their units,
so the scores of different classes can be ranked together. (A per-class normalisation, by the
class's median, fails where a model fits most of a class exactly: the median is then zero.)

:func:`group_isolation` looks for a small *group* apart from its class, the shape that
feature-space attacks (bullseye polytope, feature collision) leave among penultimate features:
a poison's nearest same-class neighbours are the other poisons, its ``k``-th is far, or it sits
among examples of another class.

:func:`neighbourhood_loss` ranks a spot of its class the model does not fit: the mean loss over
an example and its nearest same-class neighbours. Losses are not shared units across classes (a
model fits some classes far worse), so its ``relative`` option scales each class by its median,
floored at a hundredth of the whole set's for the zero-median case above.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .._errors import EpicError
from .._validation import check_int, check_labels, check_number
from .proxy import GradientProxy, as_proxy, pairwise_distances

__all__ = ["group_isolation", "knn_isolation", "neighbourhood_loss", "percentile_rank",
           "reference_loss", "small_classes"]


def knn_isolation(proxies: Tensor | GradientProxy, labels: Tensor, *, k: int = 10,
                  block: int = 1024) -> Tensor:
    """(N,) isolation score of every example within its class.

    Args:
        proxies: (N, d) per-example gradient proxies, or a :class:`GradientProxy`.
        labels: (N,) integer class labels.
        k: which neighbour's distance counts (capped at the class size minus one).
        block: rows of the (block, n_c) distance block held at once.

    Returns:
        Float32 distances ``d_k(i)`` to the ``k``-th nearest same-class example (0 in
        classes with a single example).
    """
    pts = as_proxy(proxies)
    n = len(pts)
    if n == 0:
        raise EpicError("proxies are empty: there are no examples to score")
    check_int("k", k, minimum=1)
    labels = check_labels(labels, n, None).to(pts.device)
    scores = torch.zeros(n, device=pts.device)
    sq = pts.sq_norms()
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        kk = min(k, len(idx) - 1)
        if kk < 1:
            continue
        members, members_sq = pts[idx], sq.index_select(0, idx)
        dk = []
        for lo in range(0, len(idx), block):
            rows = torch.arange(lo, min(lo + block, len(idx)), device=pts.device)
            d = pairwise_distances(members[rows], members, a_sq=members_sq[rows],
                                   b_sq=members_sq)
            d[torch.arange(len(rows), device=d.device), rows] = float("inf")  # not itself
            dk.append(d.topk(kk, dim=1, largest=False).values[:, -1])
        scores[idx] = torch.cat(dk)
    return scores


def group_isolation(points: Tensor, labels: Tensor, *, k: int = 30, near: int = 5,
                    spread: int = 0, block: int = 1024) -> Tensor:
    """(N,) how much each example sits in a small group apart from its class, in [0, 1].

    Two ratios of neighbour distances, each ranked over all examples (so they share a scale):
    ``d_k / d_near``, the distance to the ``k``-th nearest same-class example over that to the
    ``near``-th (large for a tight group of fewer than ``k`` points far from the rest of its
    class), and ``d_k / a_k``, over the distance to the ``k``-th nearest example of any class
    (large for a point among other classes). The score is the larger of the two percentile
    ranks. Targeted poisons are a few examples crafted towards one target, so they tend to be
    both each other's nearest neighbours and far from the clean examples of their label.

    Args:
        points: (N, D) vectors, e.g. penultimate features.
        labels: (N,) integer class labels.
        k: the far neighbour; above the number of poisons an attack plants per target.
            Classes of at most ``2 * k`` examples are not scored (0): a group apart from its
            class needs a class several times its size, and a rare class would otherwise be
            flagged as a whole.
        near: the near neighbour, 1 <= near < k.
        spread: when > 0, an example also takes the median score of its ``spread`` nearest
            same-class examples if that is higher (``spread <= k``): the poisons of one
            target are one group, so one the ratios miss is surrounded by ones they catch,
            while an isolated clean example's neighbours score low.
        block: rows of the (block, N) distance block held at once.

    Returns:
        Float32 scores; 0 in classes of at most ``2 * k`` examples.
    """
    x = _checked_points(points)
    n = len(x)
    check_int("k", k, minimum=2)
    check_int("near", near, minimum=1)
    if near >= k:
        raise EpicError(f"near must be < k ({k}), got {near}")
    check_int("spread", spread, minimum=0)
    if spread > k:
        raise EpicError(f"spread must be <= k ({k}), got {spread}")
    labels = check_labels(labels, n, None).to(points.device)
    alone = small_classes(labels, k)  # not scored
    kk = torch.where(alone, 0, k)
    nn_ = kk.clamp(max=near)
    top = int(min(k, n - 1))
    if top < 1:
        return torch.zeros(n, device=points.device)
    own, own_idx, anyc = [], [], []
    for rows, d in _distance_blocks(x, block, itself=float("inf")):  # not its own neighbour
        anyc.append(d.topk(top, dim=1, largest=False).values)
        d.masked_fill_(labels[rows, None] != labels[None, :], float("inf"))
        near_own = d.topk(top, dim=1, largest=False)
        own.append(near_own.values)
        own_idx.append(near_own.indices[:, :spread])
    own_t, any_t = torch.cat(own), torch.cat(anyc)
    at = lambda t, j: t.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(1)  # noqa: E731
    dk, dn, ak = at(own_t, kk), at(own_t, nn_), at(any_t, kk)
    tiny = torch.finfo(torch.float32).tiny
    group = dk / dn.clamp(min=tiny)
    foreign = dk / ak.clamp(min=tiny)
    score = torch.zeros(n, device=points.device)
    if not alone.all():  # ranked among the scored examples only
        scored = ~alone
        score[scored] = torch.maximum(percentile_rank(group[scored]),
                                      percentile_rank(foreign[scored]))
    if spread:
        nbr = torch.cat(own_idx)  # (N, spread); past the class size the entries are others
        valid = torch.arange(nbr.shape[1], device=nbr.device)[None, :] < kk.clamp(
            max=spread)[:, None]
        around = score[nbr].masked_fill(~valid, float("nan")).nanmedian(1).values
        score = torch.maximum(score, around.nan_to_num(0.0))
    return score


def neighbourhood_loss(points: Tensor, losses: Tensor, labels: Tensor, *, k: int = 10,
                       relative: float = 0.0, block: int = 1024) -> Tensor:
    """(N,) mean of ``losses`` over each example and its ``k - 1`` nearest same-class examples.

    A spot of its class that the model does not fit. Gradient-matching poisons act through
    their gradients, which grow with their loss: under the model they were crafted on, a
    handful of high-loss poisons carries almost all of the attack, and they sit among the
    other poisons, which also have high losses. A hard clean example has a high loss too, but
    its neighbours are ordinary ones, so its neighbourhood's mean stays low.

    Args:
        points: (N, D) vectors, e.g. penultimate features.
        losses: (N,) per-example losses under the current model (e.g. cross-entropy).
        labels: (N,) integer class labels.
        k: neighbourhood size, the example itself included. Classes of at most ``2 * k``
            examples are not scored (0), as in :func:`group_isolation`.
        relative: each class's means are divided by their median (at least a hundredth of
            the whole set's) to this power (0: the plain mean; 1: against the class's typical
            neighbourhood). A model fits some classes far worse than others, and one ranking
            over all classes otherwise fills its top with the worst-fitted class's clean
            examples.
        block: rows of the (block, N) distance block held at once.

    Returns:
        Float32 scores; 0 in classes of at most ``2 * k`` examples.
    """
    x = _checked_points(points)
    n = len(x)
    check_int("k", k, minimum=1)
    relative = check_number("relative", relative, minimum=0)
    if not isinstance(losses, Tensor) or losses.shape != (n,) or not losses.is_floating_point():
        raise EpicError(f"losses must be a ({n},) floating-point tensor, one per example")
    labels = check_labels(labels, n, None).to(points.device)
    loss = losses.float().to(points.device)
    alone = small_classes(labels, k)
    score = torch.zeros(n, device=points.device)
    for rows, d in _distance_blocks(x, block, itself=-1.0):  # itself first
        d.masked_fill_(labels[rows, None] != labels[None, :], float("inf"))
        near = d.topk(min(k, n), dim=1, largest=False).indices
        score[rows] = loss[near].mean(1)
    score.masked_fill_(alone, 0.0)
    if relative and not alone.all():
        # a class the model fits perfectly has median 0: its scale is floored at a hundredth
        # of the whole set's, so its few non-zero scores are not inflated without bound
        floor = (score[~alone].median() / 100).clamp(min=1e-12)
        for c in labels[~alone].unique():
            own = labels == c
            score[own] /= torch.maximum(score[own].median(), floor) ** relative
    return score


def reference_loss(points: Tensor, labels: Tensor, *, k: int = 200, reg: float = 1.0,
                   steps: int = 100, block: int = 1024) -> Tensor:
    """(N,) cross-entropy of each example's label under a linear classifier fit on the
    examples whose ``k`` nearest neighbours mostly carry their label.

    Feature-space poisons (bullseye polytope) sit among the examples of the target's class
    with their own label: a classifier of the clean examples reads them as that class. But
    a classifier fit on the whole set learns them too (a few points in a direction no clean
    example takes), and one fit on the other folds still holds the other poisons. The
    examples that Deep k-NN would keep (label = the plurality of their ``k`` nearest) leave
    most poisons out, so a classifier fit on them is close to one of the clean set; each
    example is then scored under it, and the poisons' losses are high.

    Args:
        points: (N, D) vectors, e.g. penultimate features (standardised here).
        labels: (N,) integer class labels.
        k: the neighbours that vote; many more than one target's poisons, which are each
            other's nearest neighbours. Capped below the smallest class's size, so that
            every class can win its own examples' vote (with more voters than a class has
            examples, the others outvote it); a class of one example leaves no voters, and
            then every example trains the classifier.
        reg: L2 penalty on the weights (not the bias) against the summed cross-entropy, as
            scikit-learn's ``LogisticRegression(C=1 / reg)``.
        steps: L-BFGS iterations of the full-batch fit.
        block: rows of the (block, N) distance block held at once.

    Returns:
        Float32 losses, one per example.
    """
    x = _checked_points(points)
    n = len(x)
    check_int("k", k, minimum=1)
    check_int("steps", steps, minimum=1)
    reg = check_number("reg", reg, minimum=0)
    labels = check_labels(labels, n, None).to(x.device)
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
    classes = int(labels.max()) + 1
    sizes = torch.bincount(labels, minlength=classes)
    top = min(k, int(sizes[sizes > 0].min()) - 1)
    trusted = torch.ones(n, dtype=torch.bool, device=x.device)
    if top >= 1:
        for rows, d in _distance_blocks(x, block, itself=float("inf")):
            near = labels[d.topk(top, dim=1, largest=False).indices]  # (rows, top)
            votes = torch.zeros(len(rows), classes, device=x.device).scatter_add_(
                1, near, torch.ones_like(near, dtype=torch.float32))
            trusted[rows] = votes.argmax(1) == labels[rows]
    if not trusted.any():
        trusted[:] = True
    xs, ys = x[trusted], labels[trusted]
    weight = torch.zeros(x.shape[1], classes, device=x.device, requires_grad=True)
    bias = torch.zeros(classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ weight + bias, ys, reduction="sum") \
            + 0.5 * reg * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(x @ weight + bias, labels, reduction="none")


def _checked_points(points: Tensor) -> Tensor:
    """``points`` as float32 after the checks every score makes: (N, D), floating, N > 0."""
    if not isinstance(points, Tensor) or points.ndim != 2 or not points.is_floating_point():
        raise EpicError("points must be an (N, D) floating-point tensor")
    if len(points) == 0:
        raise EpicError("points are empty: there are no examples to score")
    return points.float()


def _distance_blocks(x: Tensor, block: int, *, itself: float) -> Iterator[tuple[Tensor, Tensor]]:
    """``(rows, d)`` for each block of ``block`` rows of ``x``: their indices and their (rows,
    N) Euclidean distances to every row, an example's distance to itself set to ``itself``
    (``inf``: not its own neighbour; below 0: its own first)."""
    sq = x.pow(2).sum(1)
    for lo in range(0, len(x), block):
        rows = torch.arange(lo, min(lo + block, len(x)), device=x.device)
        d = pairwise_distances(x[rows], x, a_sq=sq[rows], b_sq=sq)
        d[torch.arange(len(rows), device=d.device), rows] = itself
        yield rows, d


def small_classes(labels: Tensor, k: int) -> Tensor:
    """(N,) mask of the examples whose class has at most ``2 * k`` examples: too few to hold
    a group apart from the rest of it. A ``k``-th neighbour there measures the class's own
    extent, and a rare class the model has not learned sits among other classes as a whole,
    so the isolation scores leave such classes unscored."""
    return torch.bincount(labels)[labels] <= 2 * k


def percentile_rank(x: Tensor) -> Tensor:
    """(N,) rank of each value among all, scaled to (0, 1] (ties broken by position)."""
    ranks = torch.empty_like(x)
    ranks[x.argsort(stable=True)] = torch.arange(1, len(x) + 1, device=x.device,
                                                 dtype=x.dtype)
    return ranks / len(x)
