"""EPIC-plus: EPIC's idea (poisons are isolated in gradient space) without its clean losses.

The paper's EPIC drops every facility-location medoid left alone in its cluster. On real data
that fires on ordinary hard examples too: 5-30% of the clean training set in our runs, and it
misses bullseye and feature-collision poisons whose logit gradients sit among confused clean
images. EPIC-plus keeps the schedule and the per-class view and changes three things:

* **the proxy** is the full last-layer gradient ``(softmax(z) - onehot(y)) ⊗ [h, 1]``, where
  poisons crafted in feature space (bullseye, feature collision) stand apart from the clean
  images that merely share their logit gradient;
* **isolation is a number, ranked across classes**: the distance to the ``k``-th nearest
  example of the same class (:func:`~epic.selection.knn_isolation`); a round flags the
  ``fraction`` most isolated examples of the whole training set;
* **only persistent isolation drops**: an example goes once it has been flagged in at least
  ``patience`` rounds and in at least half of the rounds so far, and never more than
  ``fraction`` of the training set in all (the most often flagged first). Poisons stay
  isolated round after round; most clean examples that a round flags are not flagged again,
  so the clean losses stay under the cap.

It works with any schedule, constant learning rate included (rounds then run to the end).
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_fraction, check_int
from ..selection import GradientProxy, knn_isolation
from .base import register_defense
from .epic import EpicDefense

__all__ = ["EpicPlus"]


@register_defense("epic-plus")
class EpicPlus(EpicDefense):
    """Drop the examples that stay among the most isolated of their class in gradient space.

    Args:
        fraction: share of the training set flagged per round, and the most ever dropped
            (default 0.03).
        k: the neighbour whose distance measures isolation (default 50: above the number of
            poisons an attack usually plants per target, which otherwise are each other's
            nearest neighbours; docs/defenses.md).
        patience: rounds an example must have been flagged in (and in at least half of the
            rounds so far) before it is dropped (default 3).
        warmup, interval, until: the round schedule, as for ``epic`` (default: every epoch
            from epoch 1 until the last learning-rate decay, or to the end without one).
        proxy: ``"last-layer"`` (default) or ``"logits"``.
        proxy_pass: ``"separate"`` (default) or ``"training"`` (logit proxy only).
        seed: unused (the rule is deterministic); accepted so runs can pass their seed.
    """

    name = "epic-plus"

    def __init__(self, *, fraction: float = 0.03, k: int = 50, patience: int = 3,
                 warmup: int = 1, interval: int = 1, until: int | None = None,
                 proxy: str = "last-layer", proxy_pass: str = "separate", seed: int = 0,
                 record_proxies: bool = False) -> None:
        super().__init__(warmup=warmup, interval=interval, until=until, proxy=proxy,
                         proxy_pass=proxy_pass, seed=seed, record_proxies=record_proxies)
        self.fraction = check_fraction("fraction", fraction)
        self.k = check_int("k", k, minimum=1)
        self.patience = check_int("patience", patience, minimum=1)
        self.votes: torch.Tensor | None = None  # rounds each example was flagged in
        self.voted = 0  # rounds so far

    def _decide(self, trainer: Any, proxies: GradientProxy, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        n = len(labels)
        scores = knn_isolation(proxies, labels, k=self.k).cpu()
        budget = int(self.fraction * n)
        flagged = torch.zeros(n, dtype=torch.bool)
        if budget:
            top = scores.topk(budget).indices
            flagged[top[scores[top] > 0]] = True  # a fitted class's zero gradients never count
        if self.votes is None or len(self.votes) != n:
            self.votes, self.voted = torch.zeros(n, dtype=torch.long), 0
        self.votes += flagged
        self.voted += 1
        out = ~trainer.active
        room = budget - int(out.sum())
        ready = ((self.votes >= self.patience) & (2 * self.votes >= self.voted)
                 & ~out).nonzero().squeeze(1)
        if room < len(ready):  # the cap: the most often flagged (then most isolated) first
            order = self.votes[ready].double() + scores[ready].double() / (
                1 + float(scores.max()))
            ready = ready[order.topk(max(room, 0)).indices]
        drop = torch.cat([out.nonzero().squeeze(1), ready]).sort().values
        return drop, {"flagged_now": int(flagged.sum())}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "votes": self.votes, "voted": self.voted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.votes = None if state.get("votes") is None else state["votes"].cpu()
        self.voted = int(state.get("voted", 0))
