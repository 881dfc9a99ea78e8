"""What the diagnostics read from an ``epic bench`` folder: its config, the victims' training
split and the surrogate of one bench seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from epic.evaluation import BenchConfig, load_bench_config
from epic.evaluation.bench import default_data_root, surrogate_paths
from epic.evaluation.run import load_splits
from epic.models import load_model


@dataclass(frozen=True)
class Bench:
    """A bench folder's config, training split (after ``train_slice``), test split and first
    surrogate (in eval mode, from the config's ``checkpoint`` or the folder's
    ``surrogates/``)."""

    folder: Path
    config: BenchConfig
    seed: int
    train: Any
    test: Any
    surrogate: nn.Module


def open_bench(folder: str | Path, seed: int | None = None) -> Bench:
    """Read the bench folder ``folder`` for bench seed ``seed`` (default: the config's first)."""
    folder = Path(folder)
    cfg = load_bench_config(folder / "config.yaml")
    seed = cfg.seeds[0] if seed is None else seed
    train, test = load_splits(cfg.dataset, cfg.data_root or default_data_root(cfg.dataset),
                              cfg.train_slice)
    surrogate = load_model(surrogate_paths(cfg, folder, seed)[0]).eval()
    return Bench(folder, cfg, seed, train, test, surrogate)
