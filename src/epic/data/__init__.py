"""Datasets, poison sets and poisoned training splits.

The built-in datasets (``list_datasets()``): cifar10, cifar100, mnist, fashion-mnist, digits
(the embedded default), tinyimagenet and imagefolder. They are registered when a dataset name
of this package is first used, which imports torchvision.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._tensors import ImageTensors
from ._unpickle import RestrictedUnpickler, restricted_load
from .augment import augment_batch, random_crop, random_flip
from .codec import jpeg_compress
from .poisoned import PoisonedDataset, splice_poisons
from .poisons import PoisonSet
from .streaming import StreamingImages, read_image

if TYPE_CHECKING:
    from .datasets import (
        CIFAR10,
        CIFAR100,
        MNIST,
        DatasetInfo,
        Digits,
        FashionMNIST,
        ImageFolder,
        TinyImageNet,
        dataset_info,
        list_datasets,
        load_split,
        register_dataset,
    )

# The dataset classes subclass torchvision's, and importing torchvision takes seconds (it
# loads torch._dynamo); they load on first use, so `epic --help` and `import epic` do not wait.
_DATASET_NAMES = ("CIFAR10", "CIFAR100", "MNIST", "DatasetInfo", "Digits", "FashionMNIST",
                  "ImageFolder", "TinyImageNet", "dataset_info", "list_datasets", "load_split",
                  "register_dataset")


def __getattr__(name: str) -> Any:
    if name in _DATASET_NAMES:
        return getattr(importlib.import_module(".datasets", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_DATASET_NAMES))

__all__ = [
    "augment_batch",
    "jpeg_compress",
    "random_crop",
    "random_flip",
    "CIFAR10",
    "CIFAR100",
    "MNIST",
    "DatasetInfo",
    "Digits",
    "FashionMNIST",
    "ImageFolder",
    "ImageTensors",
    "PoisonSet",
    "PoisonedDataset",
    "RestrictedUnpickler",
    "StreamingImages",
    "TinyImageNet",
    "dataset_info",
    "list_datasets",
    "load_split",
    "read_image",
    "register_dataset",
    "restricted_load",
    "splice_poisons",
]
