"""The defense interface and its registry.

A training-time defense is a :class:`DefenseCallback`: the trainer calls its hooks by name and
owns the loop; the defense decides which examples stay active (filters) or changes the step.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .._callback import Callback
from .._registry import Registry

__all__ = ["DEFENSES", "DefenseCallback", "DropDefense", "NoDefense", "create_defense",
           "drop_record", "list_defenses", "register_defense"]

DEFENSES: Registry[DefenseCallback] = Registry("defense")


def register_defense(name: str | None = None):
    """Decorator recording a defense factory (class or function) under ``name``."""
    return DEFENSES.register(name)


def create_defense(name: str, **kwargs: Any) -> DefenseCallback:
    """Build a defense by name; ``None`` keyword arguments are dropped so defaults apply."""
    return DEFENSES.create(name, **kwargs)


def list_defenses(pattern: str = "*") -> list[str]:
    """Registered defense names matching a shell-style pattern."""
    return DEFENSES.names(pattern)


class DefenseCallback(Callback):
    """Base class of defenses: no-op hooks, plus a summary for the run's results.

    A defense declares what it needs (``needs_images``: the training images in memory) and
    sees the trainer through :class:`~epic._callback.TrainerView`.
    """

    name: str = "defense"

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return the uint8 (N, C, H, W) training images to train on, before the trainer is
        built (a data-level defense such as JPEG compression). Default: unchanged."""
        return images

    def summary(self) -> dict[str, Any]:
        """What the defense did, for ``summary.json`` (e.g. examples dropped)."""
        return {}


@register_defense("none")
class NoDefense(DefenseCallback):
    """Undefended training (the baseline every defense is compared with)."""

    name = "none"


def drop_record(trainer: Any, keep: torch.Tensor, **fields: Any) -> dict[str, Any]:
    """A round's log record: ``fields`` plus examples kept and dropped so far and, when the
    trainer knows the poisons (for scoring only), how many poisons and clean examples are out."""
    record: dict[str, Any] = {**fields, "kept": int(keep.sum()),
                              "dropped_total": int((~keep).sum())}
    if trainer.poison_mask is not None:
        poison = trainer.poison_mask
        record["poisons_dropped"] = int((poison & ~keep).sum())
        record["poisons_total"] = int(poison.sum())
        record["clean_dropped"] = int((~poison & ~keep).sum())
    return record


class DropDefense(DefenseCallback):
    """Base class of defenses that drop training examples (EPIC, the filters): the records of
    their rounds, the dropped set, the summary and the state a resume restores."""

    event: str = "selection"  # the kind of the rounds' events in the run's log

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self.dropped = torch.empty(0, dtype=torch.long)

    def _drop(self, trainer: Any, keep: torch.Tensor, *, epoch: int, started: float,
              log: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Train on ``keep`` from now on and record the round that began at ``started``
        (``time.perf_counter()``) at the start of ``epoch``; returns the record."""
        before = trainer.active
        trainer.set_active(keep)  # distributed: rank 0's mask, broadcast to every rank
        keep = trainer.active
        self.dropped = (~keep).nonzero().squeeze(1)
        record = drop_record(trainer, keep, epoch=epoch + 1, **fields,
                             dropped_this_round=int((before & ~keep).sum()))
        record["seconds"] = time.perf_counter() - started
        self.rounds.append(record)
        trainer.log_event(self.event, **(log or {}), **record)
        return record

    def summary(self) -> dict[str, Any]:
        return {"rounds": len(self.rounds), "dropped": int(self.dropped.numel()),
                "selection_seconds": sum(r["seconds"] for r in self.rounds)}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = list(state["rounds"])
        self.dropped = state["dropped"].cpu()
