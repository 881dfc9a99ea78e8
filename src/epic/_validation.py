"""Input checks that run first and fail with one line: argument, expected, got."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ._errors import EpicError

__all__ = [
    "check_choice",
    "check_file",
    "check_fraction",
    "check_int",
    "check_labels",
    "check_qualities",
    "check_tensor",
]


def check_tensor(name: str, value: Any, *, ndim: int | tuple[int, ...] | None = None,
                 floating: bool = False, integer: bool = False) -> torch.Tensor:
    """Require a tensor of the given rank (and dtype family)."""
    if not isinstance(value, torch.Tensor):
        raise EpicError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and value.ndim not in dims:
        want = " or ".join(str(d) for d in dims)
        raise EpicError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise EpicError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise EpicError(f"{name} must be an integer tensor, got {value.dtype}")
    if floating and value.numel() and not _all_finite(value):
        raise EpicError(f"{name} contains NaN or infinite values; check the model's outputs")
    return value


def _all_finite(value: torch.Tensor, block: int = 1 << 22) -> bool:
    """``torch.isfinite(value).all()`` over blocks of about ``block`` elements along dim 0:
    ``isfinite`` on the whole tensor would briefly need 1.75x its memory (a 5 GB matrix of
    1.28M proxies, for instance)."""
    if value.ndim == 0 or value.numel() <= block:
        return bool(torch.isfinite(value).all())
    rows = max(1, block // max(1, value[0].numel()))
    return all(bool(torch.isfinite(part).all()) for part in value.split(rows))


def check_labels(labels: Any, n: int, num_classes: int | None = None) -> torch.Tensor:
    """Require (n,) integer labels in [0, num_classes)."""
    labels = check_tensor("labels", labels, ndim=1, integer=True)
    if labels.shape[0] != n:
        raise EpicError(f"labels must have length {n} to match the inputs, got {labels.shape[0]}")
    if n and labels.min() < 0:
        raise EpicError(f"labels must be >= 0, got {int(labels.min())}")
    if n and num_classes is not None and labels.max() >= num_classes:
        raise EpicError(
            f"labels must be < num_classes={num_classes}, got {int(labels.max())}")
    return labels


def check_number(name: str, value: Any, *, minimum: float | None = None,
                 maximum: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> float:
    """Require a finite real number (not a bool, a string, NaN or inf), optionally within
    bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EpicError(f"{name} must be a finite number, got {value!r}")
    low_bad = minimum is not None and (value <= minimum if low_open else value < minimum)
    high_bad = maximum is not None and (value >= maximum if high_open else value > maximum)
    if low_bad or high_bad:
        lo = "" if minimum is None else f"{'>' if low_open else '>='} {minimum:g}"
        hi = "" if maximum is None else f"{'<' if high_open else '<='} {maximum:g}"
        raise EpicError(f"{name} must be {' and '.join(p for p in (lo, hi) if p)}, "
                        f"got {value!r}")
    return float(value)


def check_fraction(name: str, value: float, *, low_open: bool = True) -> float:
    """Require ``value`` in (0, 1] (or [0, 1] with ``low_open=False``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EpicError(f"{name} must be a number, got {value!r}")
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise EpicError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """Require an int, optionally within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise EpicError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise EpicError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise EpicError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_qualities(name: str, value: Any) -> tuple[int, ...]:
    """JPEG qualities: an int (0: none) or a non-empty list of ints in 1-100, as a sorted
    tuple without repeats (``()`` for 0)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise EpicError(f"{name} must be a quality (1-100, 0 for off) or a non-empty "
                            f"list of them, got {value!r}")
        return tuple(sorted({check_int(name, q, minimum=1, maximum=100) for q in value}))
    quality = check_int(name, value, minimum=0, maximum=100)
    return (quality,) if quality else ()


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Require one of ``choices``; the message lists them."""
    choices = list(choices)
    if value not in choices:
        raise EpicError(f"unknown value {value!r} for {name}; valid values are {choices}")
    return value


def check_file(path: str | Path, what: str, expected: str, *, create: str | None = None) -> Path:
    """``path`` as a :class:`Path` if it is a file; else one line saying it is a folder or
    missing, and what to give (``expected``) or how to make it (``create``)."""
    path = Path(path)
    if path.is_dir():
        raise EpicError(f"{what} {path} is a folder; give {expected}")
    if not path.is_file():
        raise EpicError(f"{what} {path} does not exist; " + (create or f"give {expected}"))
    return path
