"""The hooks a trainer calls, by name and in list order (Lightning style).

Plumbing shared by `training` (which calls the hooks) and `defenses` (which implement them),
so that neither imports the other.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Callback"]


class Callback:
    """Base class with no-op hooks; subclasses override what they need.

    Every hook gets the trainer first. State that must survive a resume goes through
    :meth:`state_dict` / :meth:`load_state_dict` (plain containers and tensors only).
    """

    state_key: str = ""

    def on_train_start(self, trainer: Any) -> None:
        """Called once before training, and before a checkpoint and the callbacks' own state
        are restored on resume (so a callback may swap layers or the optimizer here)."""

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        """Called at the start of every epoch, before its batches."""

    def transform_batch(self, trainer: Any, indices: Any, inputs: Any) -> Any:
        """Return the training inputs of the batch of training-set ``indices`` (after
        augmentation; cached features in transfer). Default: unchanged."""
        return inputs

    def on_batch_end(self, trainer: Any, epoch: int, step: int, loss: float) -> None:
        """Called after every optimiser step."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        """Called after an epoch's evaluation; ``metrics`` may be extended in place."""

    def on_train_end(self, trainer: Any) -> None:
        """Called once after the last epoch."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
