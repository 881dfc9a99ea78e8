"""Device selection and seeding, the same on CPU and CUDA."""

from __future__ import annotations

import random

import numpy as np
import torch

from ._errors import EpicError

__all__ = ["resolve_device", "seed_everything", "PRECISIONS"]

# Explicit inference precisions (Trainer.predict, EPIC's proxy pass); None there means "as the
# training runs".
PRECISIONS = ("float32", "bfloat16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; an unavailable device is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EpicError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EpicError(f"device '{device}' requested but CUDA is not available; use --device cpu")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded with ``seed`` for sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
