"""The defense interface and its registry.

A training-time defense is a :class:`DefenseCallback`: the trainer calls its hooks by name and
owns the loop; the defense decides which examples stay active (filters) or changes the step.
"""

from __future__ import annotations

from typing import Any

import torch

from .._callback import Callback
from .._registry import Registry

__all__ = ["DEFENSES", "DefenseCallback", "NoDefense", "create_defense", "drop_record",
           "list_defenses", "register_defense"]

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

    Attributes:
        needs_images: the defense works on the whole training set in memory (it cannot run
            on a streamed split).
    """

    name: str = "defense"
    needs_images: bool = False

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
