"""How isolated each example is among the examples of its class, in gradient space.

EPIC calls a point isolated when a facility-location medoid ends up alone in its cluster; that
test is binary and depends on the medoid budget, so it also fires on ordinary hard examples.
:func:`knn_isolation` measures the same idea as a number: the distance from an example to its
``k``-th nearest neighbour of the same class. Gradient proxies of one model share their units,
so the scores of different classes can be ranked together. (A per-class normalisation, by the
class's median, fails where a model fits most of a class exactly: the median is then zero.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._errors import EpicError
from .._validation import check_int, check_labels
from .proxy import GradientProxy, as_proxy, pairwise_distances

__all__ = ["knn_isolation"]


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
