"""Random drop: a control that removes a seeded random set of training examples.

A filter's gain over training on everything mixes two effects, removing poisons and training
on less data; dropping as many examples at random separates the second.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._errors import EpicError
from .._validation import check_fraction, check_int, check_tensor
from .base import register_defense
from .filter import FilterDefense, FilterResult

__all__ = ["RandomDrop"]


@register_defense("random-drop")
class RandomDrop(FilterDefense):
    """Drop ``count`` (or ``fraction`` of the) examples chosen uniformly at random.

    The scores are uniform random values from a generator seeded with ``seed``; the dropped
    examples are those with the ``count`` highest. Needs no features.

    Args:
        count: number of examples to drop (at most N).
        fraction: fraction of the examples to drop, in [0, 1], rounded to a count. Give
            exactly one of ``count`` and ``fraction``.
        seed: seeds the random scores.
        epoch: see :class:`FilterDefense`.
    """

    name = "random-drop"
    needs_features = False

    def __init__(self, *, count: int | None = None, fraction: float | None = None,
                 seed: int = 0, epoch: int | None = None) -> None:
        super().__init__(epoch=epoch)
        if (count is None) == (fraction is None):
            raise EpicError("random-drop needs exactly one of count and fraction, got "
                            f"count={count!r}, fraction={fraction!r}")
        self.count = None if count is None else check_int("count", count, minimum=0)
        self.fraction = (None if fraction is None
                         else check_fraction("fraction", fraction, low_open=False))
        self.seed = check_int("seed", seed, minimum=0)

    def filter(self, features: Tensor | None, labels: Tensor, logits: Tensor) -> FilterResult:
        labels = check_tensor("labels", labels, ndim=1, integer=True)
        n = labels.shape[0]
        count = self.count if self.count is not None else round(self.fraction * n)
        count = min(count, n)
        scores = torch.rand(n, generator=torch.Generator().manual_seed(self.seed))
        keep = torch.ones(n, dtype=torch.bool)
        keep[scores.topk(count).indices] = False
        return FilterResult(keep=keep.to(labels.device), scores=scores.to(labels.device))
