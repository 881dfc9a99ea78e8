"""One training run from a flat config: data, poisons, model, defense, trainer, results.

Writes into ``out``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per
epoch and per selection round), ``summary.json`` and ``checkpoint.pt``; every file is written
atomically, and a run that is interrupted resumes from its checkpoint when started again with
the same config.

Under ``torchrun`` (several processes) every process trains (see :class:`~epic.training.Trainer`)
and rank 0 alone writes the files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__
from .. import _distributed as dist
from .._device import seed_everything
from .._errors import EpicError
from .._io import write_json, write_yaml
from .._validation import check_int
from ..attacks import attack_summary
from ..data import (
    ImageTensors,
    PoisonSet,
    StreamingImages,
    dataset_info,
    load_split,
    splice_poisons,
)
from ..defenses import DefenseCallback, DefenseSpec, NoDefense
from ..models import create_model, load_model, read_model_spec, save_model
from ..training import TrainConfig, Trainer

__all__ = ["RunConfig", "build_model", "execute_run", "load_splits", "model_spec", "parse_slice",
           "prepare_data", "pretrain", "resolved_train_config", "run_training"]


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; ``None`` fields take the dataset's or library defaults.

    A run is data + model + a :class:`~epic.training.TrainConfig` + a
    :class:`~epic.defenses.DefenseSpec` (+ poisons). For YAML, ``train`` may also be a mapping
    of training options and ``defense`` a name or a ``{name, options}`` mapping; both are
    converted on construction (an unknown key or name is one error line). :meth:`to_dict`
    gives plain data back, and ``RunConfig(**cfg.to_dict())`` rebuilds ``cfg``.

    Args:
        dataset: registered dataset name (``epic list datasets``).
        data_root: folder holding the dataset files (ignored by ``digits``).
        model: registered model name (``epic list models``).
        width: base width for ResNet/VGG families (smaller is faster on CPU).
        defense: the defense and its options (``epic list defenses``); ``None`` trains
            undefended. A defense taking a ``seed`` gets the run's unless its options set one.
        poisons: a poison file (``.npz``) or poisoning-benchmark folder, or ``None``. Its
            indices refer to the training split after ``train_slice``.
        eps: the poisons' L-inf bound out of 255, checked against them; needed when their
            file does not record it (a poisoning-benchmark folder), else taken from the file.
        train_slice: ``"START:STOP"``: use only these training examples (e.g. the first
            2,500 images as a fine-tuning set), before the poisons are spliced in.
        checkpoint: a model file from ``epic pretrain``; it fixes the architecture (``model``
            and ``width`` are then taken from it). Needed by the transfer and fine-tune
            scenarios (``train.scenario``).
        train_size: train on a seeded subset of this many examples (the poisons always kept).
        out: output folder.
        download: fetch the dataset's official files when they are absent.
        stream: read the training and test images from their files as they are needed
            (``tinyimagenet``, ``imagefolder``) instead of loading them into memory; the
            trainer's ``num_workers`` DataLoader workers decode them.
        image_size: resize and center-crop the images of a file-based dataset to this size.
        train: the training hyperparameters; ``augment=None`` means the dataset's default.
    """

    dataset: str = "digits"
    data_root: str | None = None
    model: str = "convnet"
    width: int | None = None
    defense: DefenseSpec | None = None
    poisons: str | None = None
    eps: float | None = None
    train_slice: str | None = None
    checkpoint: str | None = None
    train_size: int | None = None
    out: str = "runs/train"
    download: bool = False
    stream: bool = False
    image_size: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            object.__setattr__(self, "train", TrainConfig.from_dict(self.train))
        if self.defense is not None:
            object.__setattr__(self, "defense", DefenseSpec.parse(self.defense))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Rebuild from :meth:`to_dict`'s data or a run's ``config.yaml`` (its ``versions``
        and ``runtime`` are ignored; a file written before :class:`DefenseSpec` existed is
        read too)."""
        data = _upgraded(data)
        data.pop("versions", None)
        data.pop("runtime", None)
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise EpicError(f"unknown run option(s) {unknown}; valid options are {known}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML and JSON: ``train`` a dict, ``defense`` ``{name, options}``
        or None."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["train"] = self.train.to_dict()
        data["defense"] = None if self.defense is None else self.defense.to_dict()
        return data


def _upgraded(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with the layout of configs written before :class:`DefenseSpec` (a defense
    name plus ``defense_options``) turned into the current one."""
    data = dict(data)
    if "defense_options" in data:
        options = data.pop("defense_options") or {}
        if isinstance(data.get("defense"), str):
            data["defense"] = {"name": data["defense"], "options": options}
    return data


def parse_slice(text: str, n: int) -> torch.Tensor:
    """Indices of ``"START:STOP"`` (either side may be empty) within ``range(n)``."""
    start, stop = slice_bounds(text, n)
    return torch.arange(start, n if stop is None else stop)


def slice_bounds(text: str, n: int | None) -> tuple[int, int | None]:
    """``(START, STOP)`` of ``"START:STOP"`` within ``n`` examples. With ``n`` ``None`` (not
    known yet) only the form and the order are checked, and an empty STOP gives ``None``."""
    try:
        start_s, stop_s = str(text).split(":")
        start, stop = int(start_s or 0), int(stop_s) if stop_s else n
    except ValueError:
        raise EpicError(f"train_slice must look like START:STOP (e.g. 0:2500), got {text!r}") \
            from None
    if start < 0 or (stop is not None and stop < 0):
        raise EpicError(f"train_slice {text!r} has a negative bound; give 0 <= START < STOP")
    if not stop_s and n is not None and start >= n:
        raise EpicError(f"train_slice {text!r} is outside the {n} training examples; give "
                        f"START < {n}")
    if stop is not None and start >= stop:
        raise EpicError(f"train_slice {text!r} selects nothing: START must be < STOP "
                        "(e.g. 0:2500)")
    if n is not None and stop is not None and stop > n:
        raise EpicError(f"train_slice {text!r} is outside the {n} training examples; give "
                        f"STOP <= {n}")
    return start, stop


def load_splits(dataset: str, data_root: str | None, train_slice: str | None = None, *,
                download: bool = False, stream: bool = False, image_size: int | None = None
                ) -> tuple[Any, Any]:
    """The training split (restricted to ``train_slice``) and the test split: ImageTensors,
    or StreamingImages with ``stream`` (see :func:`epic.data.load_split`)."""
    train = load_split(dataset, data_root, train=True, download=download, stream=stream,
                       image_size=image_size)
    test = load_split(dataset, data_root, train=False, download=download, stream=stream,
                      image_size=image_size)
    if train_slice is not None:
        train = train.subset(parse_slice(train_slice, len(train)))
    return train, test


def _subset_indices(n: int, size: int, keep: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded sorted subset of ``range(n)`` of ``size`` that contains every index in ``keep``."""
    if size > n:
        raise EpicError(f"train_size {size} is more than the {n} training examples; leave it "
                        "out to train on all of them")
    if size == n:
        return torch.arange(n)
    if size < len(keep):
        raise EpicError(f"train_size {size} is smaller than the {len(keep)} poisons; "
                        "raise --train-size")
    free = torch.ones(n, dtype=torch.bool)
    free[keep] = False
    others = free.nonzero().squeeze(1)
    pick = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))
    chosen = torch.cat([keep, others[pick[: size - len(keep)]]])
    return chosen.sort().values


def prepare_data(cfg: RunConfig, seed: int = 0) -> dict[str, Any]:
    """Load the splits, splice in the poisons and take the training subset.

    Returns:
        A dict with ``train`` (ImageTensors, or StreamingImages with ``cfg.stream``), ``test``,
        ``poison_mask`` (or None), ``poisons`` (or None) and ``indices`` (positions of the
        training subset in the full split).
    """
    train, test = load_splits(cfg.dataset, cfg.data_root, cfg.train_slice, download=cfg.download,
                              stream=cfg.stream, image_size=cfg.image_size)
    poisons = None
    poison_mask = torch.zeros(len(train), dtype=torch.bool)
    if cfg.poisons is not None:
        poisons = PoisonSet.load(cfg.poisons)
        train, poison_mask = splice_poisons(train, poisons, eps=cfg.eps)
    indices = torch.arange(len(train))
    if cfg.train_size is not None:
        check_int("train_size", cfg.train_size, minimum=1)
        indices = _subset_indices(len(train), cfg.train_size,
                                  poison_mask.nonzero().squeeze(1), seed)
        train = train.subset(indices)
        poison_mask = poison_mask[indices]
    return {"train": train, "test": test, "poisons": poisons,
            "poison_mask": poison_mask if poisons is not None else None, "indices": indices}


def resolved_train_config(cfg: RunConfig) -> TrainConfig:
    """``cfg.train`` with ``augment=None`` replaced by the dataset's default augmentation."""
    if cfg.train.augment is not None:
        return cfg.train
    return replace(cfg.train, augment=dataset_info(cfg.dataset).augmentation)


def _check_resumable(out: Path, resolved: dict[str, Any]) -> None:
    """Refuse to mix a new config into a folder that holds another run's checkpoint."""
    saved = out / "config.yaml"
    if not (out / "checkpoint.pt").exists() or not saved.exists():
        return
    with open(saved) as f:
        previous = _upgraded(yaml.safe_load(f) or {})
    previous.pop("versions", None)
    previous.pop("runtime", None)  # a run may resume on another device
    current = json.loads(json.dumps({k: v for k, v in resolved.items()
                                     if k not in ("versions", "runtime")}))
    if previous != current:
        raise EpicError(f"{out} holds a run with a different config; use a new --out or "
                        "delete that folder to start over")


def build_model(cfg: RunConfig, train: ImageTensors | StreamingImages) -> torch.nn.Module:
    """The run's model: from ``cfg.checkpoint`` if given (a new head when the classes
    differ), else freshly initialised with the dataset's normalisation inside."""
    if cfg.checkpoint is not None:
        spec, _ = read_model_spec(cfg.checkpoint)
        overrides = {}
        if spec.get("num_classes") != train.num_classes:
            overrides["num_classes"] = train.num_classes
        if spec.get("in_channels") != train.image_shape[0]:
            raise EpicError(f"checkpoint {cfg.checkpoint} expects {spec.get('in_channels')} "
                            f"channels but {cfg.dataset} has {train.image_shape[0]}")
        return load_model(cfg.checkpoint, **overrides)
    spec = model_spec(cfg, train)
    return create_model(spec.pop("name"), **spec)


def model_spec(cfg: RunConfig, train: ImageTensors | StreamingImages) -> dict[str, Any]:
    """The ``create_model`` arguments of the run's model (what :func:`save_model` stores)."""
    if cfg.checkpoint is not None:
        spec, _ = read_model_spec(cfg.checkpoint)
        return {**spec, "num_classes": train.num_classes}
    info = dataset_info(cfg.dataset)
    channels = int(train.image_shape[0])
    spec: dict[str, Any] = {
        "name": cfg.model, "num_classes": train.num_classes, "in_channels": channels,
        "mean": list(info.mean if len(info.mean) == channels else (0.5,) * channels),
        "std": list(info.std if len(info.std) == channels else (0.5,) * channels)}
    if cfg.width is not None:
        spec["width"] = cfg.width
    if cfg.model == "mlp":
        spec["image_size"] = [int(train.image_shape[1]), int(train.image_shape[2])]
    return spec


def run_training(cfg: RunConfig, *, resume: bool = True) -> dict[str, Any]:
    """Train once as ``cfg`` says and write the results into ``cfg.out``.

    Returns:
        The summary: clean test accuracy, the target's prediction and attack success (when
        poisons are given), poisons dropped out of total, clean examples dropped, seconds.
    """
    return execute_run(cfg, resume=resume)[0]


def pretrain(cfg: RunConfig, path: str | Path, *, resume: bool = True) -> dict[str, Any]:
    """Train a clean surrogate (``cfg.defense`` is ignored) and save it to ``path``.

    The run's files (config, metrics, checkpoint for resuming) go to ``cfg.out``; the model
    file holds the weights and the ``create_model`` spec, so :func:`load_model` rebuilds it.
    """
    cfg = replace(cfg, defense=None, poisons=None)
    summary, trainer, spec = execute_run(cfg, resume=resume)
    if dist.is_main():
        save_model(path, trainer.model, spec, metadata={"summary": summary, "run": cfg.to_dict()})
    dist.barrier()
    return summary


def execute_run(cfg: RunConfig, *,
                resume: bool = True) -> tuple[dict[str, Any], Trainer, dict[str, Any]]:
    """:func:`run_training` that also returns the trainer and the model spec."""
    t_start = time.perf_counter()
    dist.init_from_env()  # under torchrun; nothing in a single process
    main = dist.is_main()
    train_cfg = resolved_train_config(cfg)
    if train_cfg.pretrained and cfg.checkpoint is None:
        raise EpicError(f"scenario '{train_cfg.scenario}' starts from a pretrained model; pass "
                        "--checkpoint (a file from `epic pretrain`)")
    out = Path(cfg.out)
    resolved = {**cfg.to_dict(), "train": train_cfg.to_dict(),
                "versions": {"epic": __version__, "torch": torch.__version__}}
    if resume:
        _check_resumable(out, resolved)
    # undefended, or the defense whose draws follow the run's seed
    defense: DefenseCallback = (NoDefense() if cfg.defense is None
                                else cfg.defense.create(seed=train_cfg.seed))
    defense.check_config(train_cfg)  # before anything is written
    if cfg.stream and defense.needs_images:
        raise EpicError(f"defense '{defense.name}' needs every training image in memory; drop "
                        f"--stream or choose another defense")
    data = prepare_data(cfg, seed=train_cfg.seed)
    train, test, poisons = data["train"], data["test"], data["poisons"]
    if not cfg.stream:  # a data-level defense (e.g. JPEG) changes the images up front
        train = ImageTensors(defense.prepare_images(train.images), train.labels, train.classes)
    seed_everything(train_cfg.seed)  # the model's initialisation is part of the run's seed
    model = build_model(cfg, train)
    spec = model_spec(cfg, train)
    trainer = Trainer(model, train, config=train_cfg, test=test,
                      target=None if poisons is None else poisons.target_image,
                      poison_mask=data["poison_mask"], callbacks=[defense], out_dir=out)
    if main:  # what "auto" and None became on this machine (not compared on a resume)
        resolved["runtime"] = {"device": trainer.device.type,
                               "eval_batch_size": trainer.eval_batch_size,
                               "world_size": trainer.world}
        write_yaml(out / "config.yaml", resolved)
    if not resume and main:
        (out / "checkpoint.pt").unlink(missing_ok=True)

    history = trainer.fit(resume=resume)

    last = history[-1]
    summary: dict[str, Any] = {
        "dataset": cfg.dataset, "model": spec["name"], "defense": defense.name,
        "epochs": train_cfg.epochs, "train_examples": len(train),
        "clean_test_acc": last.get("test_acc"),
    }
    dropped = ~trainer.active
    if poisons is not None:
        mask = data["poison_mask"]
        summary.update({
            "target_index": poisons.target_index, "target_label": poisons.target_label,
            "adv_label": poisons.adv_label, "target_pred": last.get("target_pred"),
            "attack_success": bool(last.get("target_pred") == poisons.adv_label),
            **attack_summary(trainer.model, poisons, test),
            "poisons_total": int(mask.sum()),
            "poisons_dropped": int((mask & dropped).sum()),
            "clean_dropped": int((~mask & dropped).sum()),
        })
    else:
        summary.update({"poisons_total": 0, "poisons_dropped": 0,
                        "clean_dropped": int(dropped.sum())})
    summary["defense_summary"] = defense.summary()
    summary["wall_seconds"] = time.perf_counter() - t_start
    summary["train_seconds"] = sum(h["seconds"] for h in history)
    if main:
        write_json(out / "summary.json", summary)
    dist.barrier()  # the files are complete when any process returns
    return summary, trainer, spec
