"""Filters: defenses that look at the training set once, score every example and drop some.

A filter's core is a pure function of tensors (:meth:`FilterDefense.filter`: penultimate
features, labels and logits in, a :class:`FilterResult` out), like cleanlab's issue masks. As a
training callback it runs once, at the start of epoch ``epoch``, on the examples still active,
and training continues on what it keeps. With a pretrained model (transfer and fine-tune: the
features are already meaningful) that is epoch 0, on the model's features. From scratch a
feature filter follows the reference protocol of the poisoning benchmarks' code (Geiping et
al.): a model is first trained on the whole poisoned set with the run's recipe, the filter
reads its features, and the run then trains from scratch on what it keeps (``retrain``; twice
the training time). ``retrain=False`` filters mid-training instead, at the first
learning-rate decay by default (the features of a partly trained model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._errors import EpicError
from .base import DropDefense

__all__ = ["FilterDefense", "FilterResult"]


@dataclass(frozen=True)
class FilterResult:
    """What a filter decided over N examples.

    Attributes:
        keep: (N,) bool mask, False for the flagged examples.
        scores: (N,) float suspicion score, higher is more suspicious (comparable within a
            class; ``-inf`` where a filter has no opinion).
    """

    keep: Tensor
    scores: Tensor

    @property
    def dropped(self) -> Tensor:
        """Indices of the flagged examples, ascending."""
        return (~self.keep).nonzero().squeeze(1)

    @property
    def num_dropped(self) -> int:
        return int((~self.keep).sum())


class FilterDefense(DropDefense):
    """Base class of one-shot filters. Subclasses implement :meth:`filter`.

    Args:
        epoch: the (0-based) epoch at whose start the filter runs; ``None`` picks 0 with a
            pretrained model or with ``retrain``, else the first learning-rate decay.
        retrain: read the features of a copy of the model first trained to the end on the
            whole set (:meth:`~epic.training.Trainer.train_copy`), then train the run from
            its start on what the filter keeps. ``None`` (default): when training from
            scratch, the filter needs features and no ``epoch`` is given.
    """

    name = "filter"
    event = "filter"
    needs_features = True

    def __init__(self, *, epoch: int | None = None, retrain: bool | None = None) -> None:
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)
                                  or epoch < 0):
            raise EpicError(f"epoch must be an integer >= 0, got {epoch!r}")
        if retrain is not None and not isinstance(retrain, bool):
            raise EpicError(f"retrain must be true or false, got {retrain!r}")
        if retrain and epoch not in (None, 0):
            raise EpicError(f"retrain filters before the run trains (epoch 0), got epoch={epoch}")
        super().__init__()
        self.epoch = epoch
        self.retrain = retrain
        self._retrain = bool(retrain)
        self.at: int | None = epoch
        self.scores: Tensor | None = None

    def filter(self, features: Tensor | None, labels: Tensor, logits: Tensor) -> FilterResult:
        """Score and flag N examples: features (N, D) (``None`` unless :attr:`needs_features`),
        labels (N,), logits (N, C), all on one device."""
        raise NotImplementedError

    def on_train_start(self, trainer: Any) -> None:
        self._retrain = self.retrain if self.retrain is not None else (
            self.needs_features and self.epoch is None and not trainer.config.pretrained)
        if self.epoch is not None:
            self.at = self.epoch
        elif trainer.config.pretrained or self._retrain:
            self.at = 0
        else:
            decays = trainer.config.milestone_epochs()
            self.at = decays[0] if decays else trainer.config.epochs // 2

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if epoch != self.at:
            return
        t0 = time.perf_counter()
        idx = trainer.active.nonzero().squeeze(1)
        source = trainer.train_copy() if self._retrain else trainer
        logits, feats = source.predict(idx, features=self.needs_features)
        labels = trainer.labels.index_select(0, idx.to(trainer.labels.device))
        result = self.filter(feats, labels, logits)
        if result.keep.shape != (len(idx),):
            raise EpicError(f"{self.name} returned a mask of shape {tuple(result.keep.shape)} "
                            f"for {len(idx)} examples")
        keep = torch.zeros_like(trainer.active)
        keep[idx[result.keep.cpu()]] = True
        scores = torch.full((len(trainer.active),), float("nan"))
        scores[idx] = result.scores.float().cpu()
        self.scores = scores
        self._drop(trainer, keep, epoch=epoch, started=t0, log={"defense": self.name},
                   pool=len(idx), retrained=self._retrain)
