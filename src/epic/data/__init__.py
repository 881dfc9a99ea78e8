"""Datasets, poison sets and poisoned training splits.

Importing this package registers the built-in datasets (``list_datasets()``): cifar10,
cifar100, mnist, fashion-mnist, digits (the embedded default), tinyimagenet and imagefolder.
"""

from ._tensors import ImageTensors
from ._unpickle import RestrictedUnpickler, restricted_load
from .augment import augment_batch, random_crop, random_flip
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
from .poisoned import PoisonedDataset, splice_poisons
from .poisons import PoisonSet
from .streaming import StreamingImages, read_image

__all__ = [
    "augment_batch",
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
