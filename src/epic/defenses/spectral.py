"""Spectral signatures: drop the examples that stand out most along each class's top direction.

Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018. Poisons shift the
mean of their class in feature space, so they project strongly onto the top singular vector
of the class's centred features; the paper removes 1.5 times the expected number of poisons
(an upper bound on their total, since the defender does not know which class holds them) with
the largest projections from every class.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._errors import EpicError
from .._validation import check_fraction, check_labels, check_tensor
from .base import register_defense
from .filter import FilterDefense, FilterResult

__all__ = ["SpectralSignatures"]


@register_defense("spectral-signatures")
class SpectralSignatures(FilterDefense):
    """Per class, score each example by its squared projection onto the top singular vector
    of the class's centred penultimate features, and drop the highest scores.

    Every class drops ``round(removal * expected_poison_fraction * N)`` of its examples, N the
    whole training set (the expected poisons may all be in any one class), at most half the
    class; classes with fewer than two examples are kept.

    Args:
        expected_poison_fraction: the fraction of poisons the defender expects (the attack
            budget, e.g. 0.01), in (0, 1].
        removal: how many times the expected number of poisons to drop (1.5 in the paper).
        epoch, retrain: see :class:`FilterDefense`.
    """

    name = "spectral-signatures"

    def __init__(self, *, expected_poison_fraction: float = 0.01, removal: float = 1.5,
                 epoch: int | None = None, retrain: bool | None = None) -> None:
        super().__init__(epoch=epoch, retrain=retrain)
        self.expected_poison_fraction = check_fraction("expected_poison_fraction",
                                                       expected_poison_fraction)
        if isinstance(removal, bool) or not isinstance(removal, (int, float)) \
                or not removal > 0:
            raise EpicError(f"removal must be a number > 0 (1.5 in the paper), got {removal!r}")
        self.removal = float(removal)

    def filter(self, features: Tensor | None, labels: Tensor, logits: Tensor) -> FilterResult:
        features = check_tensor("features", features, ndim=2, floating=True)
        n = features.shape[0]
        labels = check_labels(labels, n).to(features.device)
        keep = torch.ones(n, dtype=torch.bool, device=features.device)
        scores = torch.zeros(n, device=features.device)
        for c in labels.unique():
            idx = (labels == c).nonzero().squeeze(1)
            if len(idx) < 2:
                continue
            x = features.index_select(0, idx).float()
            x = x - x.mean(0)
            top = torch.linalg.svd(x, full_matrices=False).Vh[0]
            score = (x @ top).square()
            scores[idx] = score
            drop = min(round(self.removal * self.expected_poison_fraction * n), len(idx) // 2)
            if drop:
                keep[idx[score.topk(drop).indices]] = False
        return FilterResult(keep=keep, scores=scores)
