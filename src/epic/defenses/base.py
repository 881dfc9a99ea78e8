"""The defense interface and its registry.

A training-time defense is a :class:`DefenseCallback`: the trainer calls its hooks by name and
owns the loop; the defense decides which examples stay active (filters) or changes the step.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._callback import Callback
from .._errors import EpicError
from .._registry import Registry

__all__ = ["DEFENSES", "DefenseCallback", "DefenseSpec", "DropDefense", "NoDefense",
           "create_defense", "drop_record", "list_defenses", "register_defense"]

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


@dataclass(frozen=True)
class DefenseSpec:
    """A defense as a run describes it: a registered name and its options.

    The name is checked against the registry at once (one error line listing the valid
    names); the options are checked against the defense's signature by :meth:`create`.

    Args:
        name: a registered defense name (``epic list defenses``).
        options: keyword arguments of the defense (copied); ``None`` values keep the defaults.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise EpicError(f"defense name must be a string, got {self.name!r}")
        DEFENSES.get(self.name)  # an unknown name lists the registered ones
        if not isinstance(self.options, Mapping):
            raise EpicError(f"options of defense '{self.name}' must be a mapping of option "
                            f"names to values, got {self.options!r}")
        object.__setattr__(self, "options", dict(self.options))

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | DefenseSpec) -> DefenseSpec:
        """A spec from a name, a ``{name, options}`` mapping (as YAML gives) or a spec."""
        if isinstance(value, DefenseSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping) and "name" in value and set(value) <= {"name", "options"}:
            return cls(value["name"], value.get("options") or {})
        raise EpicError(f"a defense is a name or a mapping {{name: ..., options: {{...}}}}, "
                        f"got {value!r}")

    def create(self, **defaults: Any) -> DefenseCallback:
        """Build the defense. ``defaults`` (e.g. the run's ``seed``) go to a defense whose
        factory takes them, unless :attr:`options` sets them."""
        factory = DEFENSES.get(self.name)
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        taken = {k: v for k, v in defaults.items() if k in params}
        return DEFENSES.create(self.name, **{**taken, **self.options})

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "options": {...}}``, plain data for YAML and JSON."""
        return {"name": self.name, "options": copy.deepcopy(dict(self.options))}


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

    def check_config(self, config: Any) -> None:
        """Raise :class:`~epic.EpicError` if the defense's options cannot run with the
        training config ``config`` (a :class:`~epic.training.TrainConfig`), e.g. an option
        of a choice the scenario makes; ``epic bench`` calls it before any work. Default:
        every config."""

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
