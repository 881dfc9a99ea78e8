"""Deep k-NN: drop examples whose nearest neighbours in feature space carry another label.

Peri, Gupta, Huang, Fowl, Zhu, Feizi, Goldstein and Dickerson, "Deep k-NN Defense against
Clean-label Data Poisoning Attacks", ECCV 2020 Workshops (arXiv:1909.13374). A clean-label
poison keeps its base-class label but is pushed into the target class's region of feature
space, so the plurality label of its neighbours there disagrees with its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_int, check_labels, check_tensor
from .base import register_defense
from .filter import FilterDefense, FilterResult

__all__ = ["DeepKNN"]

_BLOCK_ELEMENTS = 1 << 24  # distance entries per block (64 MiB of float32), any N


@register_defense("deep-knn")
class DeepKNN(FilterDefense):
    """Drop every example whose label is not a plurality label of its k nearest neighbours.

    Neighbours are found by Euclidean distance between penultimate features, the example
    itself excluded. An example whose own label ties for the plurality is kept. The score is
    the fraction of its neighbours with a different label.

    Args:
        k: neighbours per example, capped at N - 1. The paper's ablations tie k to the number
            of poisons (about 1 to 2 times it works best); 50 suits budgets of a few dozen
            poisons, as in its CIFAR-10 experiments.
        epoch, retrain: see :class:`FilterDefense`.
    """

    name = "deep-knn"

    def __init__(self, *, k: int = 50, epoch: int | None = None,
                 retrain: bool | None = None) -> None:
        super().__init__(epoch=epoch, retrain=retrain)
        self.k = check_int("k", k, minimum=1)

    def filter(self, features: Tensor | None, labels: Tensor, logits: Tensor) -> FilterResult:
        features = check_tensor("features", features, ndim=2, floating=True)
        n = features.shape[0]
        labels = check_labels(labels, n).to(features.device)
        k = min(self.k, n - 1)
        if k < 1:
            return FilterResult(torch.ones(n, dtype=torch.bool, device=features.device),
                                torch.zeros(n, device=features.device))
        num_classes = max(int(labels.max()) + 1, logits.shape[-1] if logits.ndim == 2 else 0)
        feats = features.float()
        own = torch.empty(n, device=feats.device)
        top = torch.empty(n, device=feats.device)
        rows = max(1, _BLOCK_ELEMENTS // n)
        for start in range(0, n, rows):  # blocks of rows keep memory at O(rows * N)
            stop = min(start + rows, n)
            dist = torch.cdist(feats[start:stop], feats)
            block = torch.arange(stop - start, device=feats.device)
            dist[block, block + start] = float("inf")  # not its own neighbour
            neighbours = dist.topk(k, dim=1, largest=False).indices
            votes = torch.zeros(stop - start, num_classes, device=feats.device)
            votes.scatter_add_(1, labels[neighbours], torch.ones(neighbours.shape,
                                                                  device=feats.device))
            own[start:stop] = votes.gather(1, labels[start:stop, None]).squeeze(1)
            top[start:stop] = votes.max(1).values
        return FilterResult(keep=own >= top, scores=1.0 - own / k)
