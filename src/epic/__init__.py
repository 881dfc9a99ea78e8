"""epic: train image classifiers that resist targeted data poisoning.

The defense is EPIC (Yang, Liu and Mirzasoleiman, ICML 2022): during training, per class,
effective poisons are isolated medoids in gradient space, and they are dropped.
"""

from ._errors import EpicError
from .attacks import AttackSpec
from .defenses import DefenseSpec
from .selection import EPIC, GradientProxy, SelectionResult, SelectionSchedule, gradient_proxy

__version__ = "0.1.0"

__all__ = [
    "EPIC",
    "AttackSpec",
    "DefenseSpec",
    "EpicError",
    "GradientProxy",
    "SelectionResult",
    "SelectionSchedule",
    "gradient_proxy",
    "__version__",
]
