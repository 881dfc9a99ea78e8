"""Shared fixtures and helpers: small real data (scikit-learn digits ships with a dependency),
tiny seeded models, and a callback that interrupts training to test resuming."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from epic.data import load_split
from epic.training import Callback, TrainConfig, Trainer

DIGITS = dict(num_classes=10, in_channels=1, mean=(0.3,), std=(0.38,))


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


def small_model(seed: int = 0, **options: Any) -> torch.nn.Module:
    """A tiny ConvNet, seeded; for 8x8 grayscale digits unless ``options`` (keyword arguments
    of ``create_model``) say otherwise. An option set to ``None`` restores the model's own
    default (``create_model`` drops it), e.g. ``mean=None, std=None``."""
    from epic.models import create_model

    torch.manual_seed(seed)
    return create_model("convnet", **{**DIGITS, **options})


def tiny_model(seed: int = 0, **options: Any) -> torch.nn.Module:
    """:func:`small_model`, narrow (channels 8 and 16, hidden 32): per-example gradients of
    the default width are slow on a CPU."""
    return small_model(seed, **{"channels": (8, 16), "hidden": 32, **options})


class Interrupt(Callback):
    """Stops training at the start of epoch ``at``, as Ctrl-C would (a KeyboardInterrupt)."""

    def __init__(self, at: int = 2) -> None:
        self.at = at

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.at:
            raise KeyboardInterrupt


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def straight_and_resumed(train, cfg: TrainConfig, make_callbacks, tmp_path, *,
                         model=small_model, at: int = 2) -> tuple[Trainer, Trainer]:
    """Train ``model()`` straight through, and again interrupted at epoch ``at`` and resumed
    from the checkpoint into ``model(99)`` (the checkpoint, not the seed, must decide);
    ``make_callbacks()`` gives each run fresh callbacks. Checks that the resumed run finished
    with the straight run's weights, and returns both trainers."""
    straight = Trainer(model(), train, config=cfg, callbacks=make_callbacks(),
                       out_dir=tmp_path / "a")
    straight.fit()
    first = Trainer(model(), train, config=cfg, callbacks=[*make_callbacks(), Interrupt(at)],
                    out_dir=tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    first.close()
    assert first.epoch == at
    resumed = Trainer(model(99), train, config=cfg,
                      callbacks=[*make_callbacks(), Callback()], out_dir=tmp_path / "b")
    resumed.fit()
    assert resumed.epoch == cfg.epochs
    assert_same_weights(straight.model, resumed.model)
    return straight, resumed
