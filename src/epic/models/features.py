"""Penultimate features of any classifier, read with a forward hook on its final linear layer.

Nothing in a model's code has to change: :func:`find_classifier` picks the last ``nn.Linear``
in ``model.named_modules()`` order (or a named one), and :func:`capture_features` records that
layer's input during ``forward``. This works through :class:`~epic.models.normalize.Normalized`
and under ``torch.no_grad``.

Example::

    logits, feats = forward_with_features(model, images)   # feats: (N, D)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .._errors import EpicError
from .normalize import Normalized

__all__ = [
    "FeatureCapture",
    "StemCapture",
    "StemReached",
    "capture_features",
    "capture_stem_stats",
    "feature_dim",
    "find_classifier",
    "find_stem",
    "forward_with_features",
]


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_classifier(model: nn.Module, name: str | None = None) -> nn.Linear:
    """The linear layer whose input is the penultimate feature vector.

    Args:
        model: Any classifier.
        name: Dotted submodule name, e.g. ``"fc"``; default: the last ``nn.Linear`` in
            ``model.named_modules()`` order. For a :class:`Normalized` wrapper both ``"fc"``
            and ``"net.fc"`` work.

    Returns:
        The ``nn.Linear`` module.

    Raises:
        EpicError: If the model has no linear layer, or ``name`` is missing or not linear; the
            message lists the model's linear layers.
    """
    linears = _linear_names(model)
    if name is None:
        if not linears:
            raise EpicError(f"{type(model).__name__} has no nn.Linear layer; pass a model whose "
                            "classifier is an nn.Linear")
        return model.get_submodule(linears[-1])
    candidates = [name]
    if isinstance(model, Normalized):
        candidates.append(f"net.{name}")
    for candidate in candidates:
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return module
        raise EpicError(f"layer '{name}' is a {type(module).__name__}, not nn.Linear; choose "
                        f"from: {', '.join(linears) or '(none)'}")
    raise EpicError(f"no layer named '{name}' in {type(model).__name__}; choose from: "
                    f"{', '.join(linears) or '(none)'}")


class FeatureCapture:
    """What :func:`capture_features` yields: the hooked layer and the latest features.

    Attributes:
        layer: The hooked ``nn.Linear``.
        features: Input of ``layer`` in the most recent forward pass, ``(N, D)``; ``None``
            until the model has run.
    """

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.features: torch.Tensor | None = None


@contextmanager
def capture_features(model: nn.Module, layer: str | None = None, *,
                     detach: bool = False) -> Iterator[FeatureCapture]:
    """Record the penultimate features of every forward pass run inside the ``with`` block.

    The hook is removed on exit, also when the block raises. Each forward pass overwrites
    ``capture.features``.

    Args:
        model: Any classifier.
        layer: Name of the classifier layer (see :func:`find_classifier`); default the last
            ``nn.Linear``.
        detach: Store detached features (no autograd graph); by default they keep their graph
            so that losses on features can be backpropagated.

    Yields:
        A :class:`FeatureCapture`; read ``.features`` after calling ``model``.

    Raises:
        EpicError: If the classifier layer cannot be found.
    """
    linear = find_classifier(model, layer)
    capture = FeatureCapture(linear)

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        capture.features = args[0].detach() if detach else args[0]

    handle = linear.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()


def forward_with_features(model: nn.Module, x: torch.Tensor,
                          layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` once and return its logits and penultimate features.

    Args:
        model: Any classifier.
        x: Inputs, e.g. images ``(N, C, H, W)``.
        layer: Name of the classifier layer; default the last ``nn.Linear``.

    Returns:
        ``(logits, features)``, shapes ``(N, K)`` and ``(N, D)``; both keep their autograd
        graph when gradients are enabled.

    Raises:
        EpicError: If the classifier layer cannot be found or was not called by ``forward``.
    """
    with capture_features(model, layer) as capture:
        logits = model(x)
    if capture.features is None:
        raise EpicError(f"the classifier layer {layer or '(last nn.Linear)'} was not called in "
                        "forward; pass layer= with the name of the layer that is")
    return logits, capture.features


def feature_dim(model: nn.Module, layer: str | None = None) -> int:
    """Size ``D`` of the penultimate feature vector (``in_features`` of the classifier)."""
    return find_classifier(model, layer).in_features


def find_stem(model: nn.Module) -> nn.Module | None:
    """The module whose output is the first convolution's response: the first
    ``nn.BatchNorm2d`` when it directly follows the first ``nn.Conv2d`` in
    ``model.modules()`` order, else that convolution; ``None`` for a model without one."""
    mods = list(model.modules())
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            return nxt if isinstance(nxt, nn.BatchNorm2d) else m
    return None


class StemReached(Exception):
    """Raised by :func:`capture_stem_stats` with ``stop=True`` once the statistics are
    recorded, to skip the rest of the forward pass."""


class StemCapture:
    """What :func:`capture_stem_stats` yields: the per-example statistics of every forward
    pass run inside the block, in call order (``rows``: a list of ``(B, 2C)`` tensors)."""

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module
        self.rows: list[torch.Tensor] = []

    def stats(self) -> torch.Tensor | None:
        """``(N, 2C)`` float32 statistics of all recorded examples, or ``None``."""
        return torch.cat(self.rows) if self.rows else None


@contextmanager
def capture_stem_stats(model: nn.Module, *, stop: bool = False) -> Iterator[StemCapture]:
    """Record, for every example of every forward pass inside the block, the mean and the
    standard deviation over positions of each channel of the rectified first-convolution
    response (:func:`find_stem`): the image's low-level texture as the model sees it.

    With ``stop=True`` the hook raises :class:`StemReached` right after recording, so a pass
    that only needs these statistics costs one convolution. A model without a convolution
    records nothing. The hook is removed on exit.
    """
    stem = find_stem(model)
    capture = StemCapture(stem)
    if stem is None:
        yield capture
        return

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        with torch.no_grad():
            a = output.detach().float().clamp(min=0).flatten(2)
            capture.rows.append(torch.cat([a.mean(2), a.std(2)], 1))
        if stop:
            raise StemReached

    handle = stem.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()
