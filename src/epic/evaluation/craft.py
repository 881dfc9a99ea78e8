"""Craft poisons for one or many targets and write them as poison files.

Layout of ``out``: one sub-folder per target, ``trial-000/poisons.npz`` (plus the benchmark
folder format on request), and ``targets.json`` listing each target, its adversarial class and
file. A trial that already has its poison file is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import inspect
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._device import seed_everything
from .._errors import EpicError
from .._io import write_json
from .._validation import check_choice
from ..attacks import ATTACKS, AttackSpec, Target
from ..attacks.gradient_matching import Retrain
from ..data import ImageTensors, PoisonSet, dataset_info
from ..models import create_model, load_model, read_model_spec
from ..training import AUGMENTATIONS, Trainer
from .run import RunConfig, load_splits, resolved_train_config

__all__ = ["CraftConfig", "craft_poisons", "craft_seed", "choose_targets", "retrainer"]


@dataclass
class CraftConfig:
    """What to attack, with what, and where to write the poisons.

    Args:
        attack: the attack, its threat model and hyperparameters; a registered name (the
            default threat model) or a mapping is turned into an :class:`AttackSpec`.
        dataset, data_root, train_slice: the victim's training split (as in ``epic train``);
            ``download`` fetches the official files when they are absent.
        checkpoints: surrogate model files from ``epic pretrain`` (several = an ensemble).
        targets: explicit ``(test index, adversarial class)`` pairs; else ``num_targets``
            random ones drawn with ``seed`` (a test image and a class other than its own).
        formats: poison file formats to write: ``epic`` and/or ``benchmark``.
        augmentation: the victim's training augmentation (a ``TrainConfig.augment`` value;
            ``None``: the dataset's default). An attack that augments while
            crafting (``augment``, ``flip``) does as the victim does unless its options say
            otherwise: poisons crafted on crops the victim never sees are weaker.
    """

    attack: AttackSpec
    checkpoints: list[str]
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    train_slice: str | None = None
    targets: list[tuple[int, int]] = field(default_factory=list)
    num_targets: int = 1
    formats: tuple[str, ...] = ("epic",)
    seed: int = 0
    device: str = "auto"
    out: str = "runs/poisons"
    progress: bool = True
    augmentation: str | None = None

    def __post_init__(self) -> None:
        if self.augmentation is not None:
            check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        augmentation = self.augmentation or dataset_info(self.dataset).augmentation
        self.attack = _crafting_augmentation(AttackSpec.parse(self.attack), augmentation)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``targets.json`` (the attack as :meth:`AttackSpec.to_dict`)."""
        return {**copy.deepcopy(self.__dict__), "attack": self.attack.to_dict()}


def _crafting_augmentation(spec: AttackSpec, augmentation: str) -> AttackSpec:
    """``spec`` with the ``augment`` and ``flip`` options it leaves out set to follow
    ``augmentation`` (for attacks that take them); options given explicitly are kept."""
    params = inspect.signature(ATTACKS.get(spec.name)).parameters
    options = dict(spec.options)
    if "augment" in params:
        options.setdefault("augment", "crop" in augmentation)  # the attack flips only crops
    if "flip" in params:
        options.setdefault("flip", "flip" in augmentation)
    return spec if options == spec.options else replace(spec, options=options)


def choose_targets(test: ImageTensors, count: int, seed: int,
                   candidates: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """``count`` seeded (test index, adversarial class) pairs, the class never the true one."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(test)) if candidates is None else candidates
    if count > len(pool):
        raise EpicError(f"{count} targets requested from {len(pool)} candidates")
    picks = pool[torch.randperm(len(pool), generator=g)[:count]]
    shifts = torch.randint(1, test.num_classes, (count,), generator=g)
    return [(int(i), int((test.labels[i] + s) % test.num_classes))
            for i, s in zip(picks, shifts, strict=True)]


def retrainer(checkpoint: str | Path) -> Retrain:
    """A ``retrain`` callback (for an attack's ``retrain_rounds``) that trains a fresh
    surrogate the way ``checkpoint`` was trained: its architecture and the training recipe
    that ``epic pretrain`` records in the file, on the poisoned split it is given.

    Each model's seed comes from the split's pixels and the number of earlier calls on the
    same split (one per surrogate of an ensemble), so an interrupted crafting run recrafts a
    target identically, and the seeds stay apart from the small seeds of victims.

    Raises:
        EpicError: the file records no training recipe.
    """
    spec, metadata = read_model_spec(checkpoint)
    if not isinstance(metadata.get("run"), dict):
        raise EpicError(f"{checkpoint} records no training recipe to retrain surrogates with; "
                        "use a surrogate from `epic pretrain`, or set retrain_rounds=0")
    recipe = resolved_train_config(RunConfig.from_dict(metadata["run"]))
    calls: collections.Counter[str] = collections.Counter()

    def retrain(split: ImageTensors) -> torch.nn.Module:
        key = hashlib.sha256(split.images.numpy().tobytes()).hexdigest()
        seed = 10**7 + int(key[:6], 16) + 7919 * calls[key]
        calls[key] += 1
        seed_everything(seed)  # the initialisation too, as in a run
        kwargs = dict(spec)
        model = create_model(kwargs.pop("name"), **kwargs)
        Trainer(model, split, config=replace(recipe, seed=seed, progress=False)).fit()
        return model.eval()

    return retrain


def craft_seed(seed: int, trial: int) -> int:
    """The crafting seed of target ``trial`` of a run seeded ``seed``: distinct for every
    (seed, trial) pair with fewer than 10,000 trials (``seed + trial`` gave seed 0's trial 1
    and seed 1's trial 0 the same bases); ``trial`` itself for seed 0."""
    return 10_000 * seed + trial


def _check_reused(poisons: PoisonSet, path: Path, index: int, adv: int,
                  train_slice: str | None) -> None:
    """A resumed run reuses ``path`` only if it holds poisons for this target and split."""
    stored = (poisons.target_index, poisons.adv_label)
    if stored != (index, adv):
        raise EpicError(f"{path} holds poisons for test image {stored[0]} (class {stored[1]}), "
                        f"this run wants {index} (class {adv}); give a new --out, or delete "
                        "that folder to craft it again")
    was = poisons.metadata.get("train_slice")
    if "train_slice" in poisons.metadata and was != train_slice:
        raise EpicError(f"{path} was crafted on train_slice {was!r}, this run uses "
                        f"{train_slice!r}; give a new --out, or delete that folder")


def craft_poisons(cfg: CraftConfig, *, retrain: Retrain | None = None) -> list[dict[str, Any]]:
    """Craft every target's poisons; return one record per trial (also in targets.json).

    An attack with ``retrain_rounds`` retrains its surrogates with ``retrain``, by default
    :func:`retrainer` of the first checkpoint (its ``epic pretrain`` recipe).
    """
    if not cfg.checkpoints:
        raise EpicError("crafting needs a surrogate: pass --checkpoint (from `epic pretrain`)")
    attack, threat = cfg.attack.create(), cfg.attack.threat
    if retrain is None and cfg.attack.options.get("retrain_rounds"):
        retrain = retrainer(cfg.checkpoints[0])
    train, test = load_splits(cfg.dataset, cfg.data_root, cfg.train_slice,
                              download=cfg.download)
    models = [load_model(path) for path in cfg.checkpoints]
    pairs = list(cfg.targets) or choose_targets(test, cfg.num_targets, cfg.seed)
    out = Path(cfg.out)
    records: list[dict[str, Any]] = []
    for k, (index, adv) in enumerate(tqdm(pairs, desc=cfg.attack.name, disable=not cfg.progress)):
        trial = out / f"trial-{k:03d}"
        path = trial / "poisons.npz"
        record = {"trial": k, "target_index": index, "adv_label": adv, "file": str(path)}
        if path.exists():  # resumed: the trial's stored poisons must be for this target
            _check_reused(PoisonSet.load(path), path, index, adv, cfg.train_slice)
        else:
            target = Target.from_split(test, index, adv)
            t0 = time.perf_counter()
            extra = {"retrain": retrain} if retrain is not None else {}
            poisons = attack.craft(models, train, target, threat, seed=craft_seed(cfg.seed, k),
                                   device=cfg.device, progress=cfg.progress, **extra)
            poisons = replace(poisons, metadata={
                **poisons.metadata, "craft_seconds": time.perf_counter() - t0,
                "dataset": cfg.dataset, "train_slice": cfg.train_slice})
            for fmt in cfg.formats:
                poisons.save(path if fmt == "epic" else trial / "benchmark", format=fmt)
        record["target_label"] = int(test.labels[index])
        records.append(record)
        write_json(out / "targets.json", {"config": {**cfg.to_dict(), "targets": pairs},
                                          "trials": records})
    return records
