"""The seam between the training loop and the callbacks (defenses) it calls.

Plumbing shared by `training` (which calls the hooks) and `defenses` (which implement them),
so that neither imports the other. A callback sees the trainer only through
:class:`TrainerView`, receives what a hook needs as its arguments, and never assigns to the
trainer: objects it changes (the trained module, the optimizer, the training images) are
returned from a hook, wrapped (the way Opacus' ``make_private`` does), and the trainer puts
them in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = ["BatchEnd", "Callback", "TrainerView", "TrainingParts"]


class TrainerView(Protocol):
    """What a callback may use of the trainer.

    Attributes:
        config: the run's :class:`~epic.training.TrainConfig` (read only).
        device: where the model and the training data live.
        labels: (N,) int64 training labels on the device (poisons included).
        active: (N,) bool CPU mask of the examples trained on.
        poison_mask: (N,) bool CPU mask of the poisons, for scoring only, or ``None``.
        images: the uint8 (N, C, H, W) training images on the device, or ``None`` when they
            are streamed from files.
        memory_format: the memory format of the model's inputs.
        eval_batch_size: the batch size of inference passes (the config's, resolved).
        model: the network being trained (read only; e.g. to optimise inputs against it).

    Methods: ``predict`` (eval-mode logits and features, shared out between ranks),
    ``inputs`` (the model-ready batches of training images, for a pass of the defense's
    own), ``train_copy`` (a copy of the model trained to the end on the run's data and
    recipe, for a defense that needs a trained model's view before this run trains) and
    ``set_active`` (train on a subset from the next batch on).
    """

    config: Any
    device: torch.device
    labels: Tensor
    active: Tensor
    poison_mask: Tensor | None
    images: Tensor | None
    memory_format: torch.memory_format
    eval_batch_size: int
    model: nn.Module

    def predict(self, indices: Tensor | None = None, *, images: Tensor | None = None,
                features: bool = False, layer: str | None = None,
                precision: str | None = None) -> tuple[Tensor, Tensor | None]: ...

    def inputs(self, indices: Tensor | None = None) -> Iterator[Tensor]: ...

    def train_copy(self) -> TrainerView: ...

    def set_active(self, mask: Tensor) -> None: ...

    def log_event(self, kind: str, **fields: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TrainingParts:
    """What a training step uses, as :meth:`Callback.configure_training` receives and returns it.

    Attributes:
        model: the whole network; its ``state_dict`` is what checkpoints hold.
        module: what the batch loop calls (``model``, or the linear head in transfer).
        optimizer: steps ``module``'s parameters.
    """

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass(frozen=True)
class BatchEnd:
    """One finished optimiser step, as :meth:`Callback.on_batch_end` receives it.

    Attributes:
        epoch: the 0-based epoch.
        step: the step within the epoch.
        indices: (B,) training-set indices of this process's examples, on the device.
        logits: (B, K) their float32 logits from the training step (augmented, train mode).
        loss: the step's mean loss.
    """

    epoch: int
    step: int
    indices: Tensor
    logits: Tensor
    loss: float


class Callback:
    """Base class with no-op hooks; subclasses override what they need (Lightning style).

    The trainer calls the hooks by name, in list order. State that must survive a resume goes
    through :meth:`state_dict` / :meth:`load_state_dict` (plain containers and tensors only),
    saved under :attr:`state_key`.

    Attributes:
        needs_images: the callback works on the training images held in memory (it cannot
            run on a streamed split).
    """

    needs_images: bool = False

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint (its name, else its class)."""
        return str(getattr(self, "name", "") or type(self).__name__)

    def on_train_start(self, trainer: TrainerView) -> None:
        """Called once before training (before a checkpoint is restored on resume)."""

    def configure_training(self, trainer: TrainerView, parts: TrainingParts) -> TrainingParts:
        """Return the model, module and optimizer to train with, wrapped if the callback
        changes the step (e.g. per-example clipping). Called after :meth:`on_train_start`
        and before a checkpoint is restored into them. Default: unchanged."""
        return parts

    def release_training(self, trainer: TrainerView, parts: TrainingParts) -> TrainingParts:
        """Undo :meth:`configure_training` after the last epoch. Default: unchanged."""
        return parts

    def on_epoch_start(self, trainer: TrainerView, epoch: int) -> None:
        """Called at the start of every epoch, before its batches."""

    def training_images(self, trainer: TrainerView, epoch: int) -> Tensor | None:
        """Return new uint8 (N, C, H, W) training images to train on from this epoch on
        (the trainer recomputes its feature cache in transfer), or ``None`` to keep them.
        Called after :meth:`on_epoch_start`."""
        return None

    def transform_batch(self, trainer: TrainerView, indices: Tensor, inputs: Tensor) -> Tensor:
        """Return the training inputs of the batch of training-set ``indices`` (after
        augmentation; cached features in transfer). Default: unchanged."""
        return inputs

    def on_batch_end(self, trainer: TrainerView, batch: BatchEnd) -> None:
        """Called after every optimiser step."""

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, Any]) -> None:
        """Called after an epoch's evaluation; ``metrics`` may be extended in place."""

    def on_train_end(self, trainer: TrainerView) -> None:
        """Called once after the last epoch."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
