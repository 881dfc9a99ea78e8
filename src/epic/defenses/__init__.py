"""Defenses: training callbacks found through a registry (``create_defense(name, **kw)``).

Filters (:class:`FilterDefense`) score the training set once and drop what they flag; EPIC
selects repeatedly during training; training-time defenses change the step itself.
"""

from . import activation_clustering as _activation_clustering  # noqa: F401
from . import deep_knn as _deep_knn  # noqa: F401  (registers "deep-knn")
from . import dp_sgd as _dp_sgd  # noqa: F401  (registers "dp-sgd")
from . import epic as _epic  # noqa: F401  (registers "epic")
from . import epic_plus as _epic_plus  # noqa: F401  (registers "epic-plus")
from . import friendly_noise as _friendly_noise  # noqa: F401  (registers "friendly-noise")
from . import jpeg as _jpeg  # noqa: F401  (registers "jpeg")
from . import random_drop as _random_drop  # noqa: F401  (registers "random-drop")
from . import spectral as _spectral  # noqa: F401  (registers "spectral-signatures")
from .activation_clustering import ActivationClustering
from .base import (
    DEFENSES,
    DefenseCallback,
    DefenseSpec,
    NoDefense,
    create_defense,
    drop_record,
    list_defenses,
    register_defense,
)
from .deep_knn import DeepKNN
from .dp_sgd import DPSGD
from .epic import EpicDefense
from .epic_plus import EpicPlus
from .filter import FilterDefense, FilterResult
from .friendly_noise import FriendlyNoise
from .jpeg import JpegCompression, jpeg_compress
from .random_drop import RandomDrop
from .spectral import SpectralSignatures

__all__ = ["ActivationClustering", "DEFENSES", "DPSGD", "DeepKNN", "DefenseCallback", "DefenseSpec",
           "EpicDefense", "EpicPlus",
           "FilterDefense", "FilterResult", "FriendlyNoise", "JpegCompression", "NoDefense",
           "RandomDrop", "SpectralSignatures", "create_defense", "drop_record", "jpeg_compress",
           "list_defenses", "register_defense"]
