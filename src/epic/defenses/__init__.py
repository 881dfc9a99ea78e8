"""Defenses: training callbacks found through a registry (``create_defense(name, **kw)``).

Filters (:class:`FilterDefense`) score the training set once and drop what they flag; EPIC
selects repeatedly during training; training-time defenses change the step itself.
"""

from . import epic as _epic  # noqa: F401  (registers "epic")
from .base import (
    DEFENSES,
    DefenseCallback,
    NoDefense,
    create_defense,
    drop_record,
    list_defenses,
    register_defense,
)
from .epic import EpicDefense
from .filter import FilterDefense, FilterResult

__all__ = ["DEFENSES", "DefenseCallback", "EpicDefense", "FilterDefense", "FilterResult",
           "NoDefense", "create_defense", "drop_record", "list_defenses", "register_defense"]
