"""The EPIC selection core: pure tensors in and out, on any device.

Imports only torch (and epic's plumbing): never the trainer, data or models.
"""

from .epic import EPIC, SelectionResult
from .facility import FacilityLocationResult, facility_location, objective
from .isolation import (
    group_isolation,
    knn_isolation,
    neighbourhood_loss,
    percentile_rank,
    reference_loss,
    small_classes,
)
from .proxy import GradientProxy, gradient_proxy, pairwise_distances
from .schedule import SelectionSchedule

__all__ = [
    "EPIC",
    "FacilityLocationResult",
    "GradientProxy",
    "SelectionResult",
    "SelectionSchedule",
    "facility_location",
    "gradient_proxy",
    "group_isolation",
    "knn_isolation",
    "neighbourhood_loss",
    "objective",
    "pairwise_distances",
    "percentile_rank",
    "reference_loss",
    "small_classes",
]
