"""Shared fixtures: small real data (scikit-learn digits ships with a dependency)."""

from __future__ import annotations

import pytest
import torch

from epic.data import load_split


@pytest.fixture(scope="session")
def digits():
    return load_split("digits", None, train=True), load_split("digits", None, train=False)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The tests' models and tensors are tiny: intra-op threads only add overhead there, and
    on a busy 2-core machine they stall (tens of times slower). Benchmarks use every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed: int = 0) -> torch.nn.Module:
    """A tiny ConvNet for 8x8 grayscale digits, seeded."""
    from epic.models import create_model

    torch.manual_seed(seed)
    return create_model("convnet", num_classes=10, in_channels=1, mean=(0.3,), std=(0.38,))
