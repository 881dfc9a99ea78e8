"""Image classifiers by name, normalisation inside the model, and penultimate features.

``create_model("resnet18", num_classes=10, mean=..., std=...)`` builds a registered model;
importing this package registers every family below. ``forward_with_features`` returns the
logits and the input of the final linear layer without touching the model's code.
"""

from . import convnet, imagenet, resnet_cifar, resnet_small, vgg  # noqa: F401  (registration)
from ._factory import MODELS, create_model, list_models, register_model
from .checkpoint import load_model, read_model_spec, save_model
from .convnet import MLP, ConvNet
from .features import (
    FeatureCapture,
    StemCapture,
    StemReached,
    capture_features,
    capture_stem_stats,
    feature_dim,
    find_classifier,
    find_stem,
    forward_with_features,
)
from .normalize import Normalized
from .resnet_cifar import BasicBlock, ResNet
from .vgg import VGG

__all__ = [
    "MLP",
    "MODELS",
    "VGG",
    "BasicBlock",
    "ConvNet",
    "FeatureCapture",
    "Normalized",
    "ResNet",
    "StemCapture",
    "StemReached",
    "capture_features",
    "capture_stem_stats",
    "create_model",
    "feature_dim",
    "find_classifier",
    "find_stem",
    "forward_with_features",
    "list_models",
    "load_model",
    "read_model_spec",
    "save_model",
    "register_model",
]
