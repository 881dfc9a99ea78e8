"""The attack interface, its registry, and the plumbing every attack shares.

An attack takes a trained surrogate (or an ensemble), the clean training set, a
:class:`Target` and a :class:`ThreatModel`, and returns a :class:`~epic.data.PoisonSet`:
new uint8 images for a few chosen training indices. It never mutates its inputs. Every
attack works in pixel space [0, 1] (epic's models normalise inside), keeps each perturbation in
the eps ball and the [0, 1] box after every step, is seeded, batched and shows progress.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from .._device import resolve_device
from .._errors import EpicError
from .._registry import Registry
from .._validation import check_int, check_number
from ..data import ImageTensors, PoisonSet

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackSpec",
    "Crafted",
    "Crafting",
    "Target",
    "ThreatModel",
    "attack_summary",
    "create_attack",
    "list_attacks",
    "project",
    "register_attack",
    "select_bases",
    "to_poison_set",
]

ATTACKS: Registry[Attack] = Registry("attack")


def register_attack(name: str | None = None):
    """Decorator recording an attack class under ``name``."""
    return ATTACKS.register(name)


def create_attack(name: str, **kwargs: Any) -> Attack:
    """Build an attack by name; ``None`` keyword arguments are dropped so defaults apply."""
    return ATTACKS.create(name, **kwargs)


def list_attacks(pattern: str = "*") -> list[str]:
    """Registered attack names matching a shell-style pattern."""
    return ATTACKS.names(pattern)


def attack_summary(model: nn.Module, poisons: PoisonSet, test: Any) -> dict[str, Any]:
    """:meth:`Attack.score` of the attack that made ``poisons`` (named in their metadata);
    empty for an unknown or unregistered attack (e.g. a poisoning-benchmark folder)."""
    name = poisons.metadata.get("attack")
    if not isinstance(name, str) or name not in ATTACKS:
        return {}
    factory = ATTACKS.get(name)
    return factory.score(model, poisons, test) if hasattr(factory, "score") else {}


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker may do.

    Args:
        budget: number of poisons as a fraction of the training set, in (0, 1] (1% = 0.01).
        eps: L-infinity bound of each perturbation in pixel units out of 255, in (0, 255].
        poison_class: class the poisons are drawn from; ``None`` means the adversarial class
            (clean-label poisoning, the literature's default).
        num_poisons: exact number of poisons; overrides ``budget`` when set.
    """

    budget: float = 0.01
    eps: float = 16.0
    poison_class: int | None = None
    num_poisons: int | None = None

    def __post_init__(self) -> None:
        # type first (a string from YAML is one error line), then range
        if not 0 < check_number("budget", self.budget) <= 1:
            raise EpicError(f"budget must be a fraction in (0, 1], got {self.budget}")
        if not 0 < check_number("eps", self.eps) <= 255:
            raise EpicError(f"eps must be in (0, 255] pixel units (e.g. 8 or 16), got {self.eps}")
        if self.num_poisons is not None:
            check_int("num_poisons", self.num_poisons, minimum=1)
        if self.poison_class is not None:
            check_int("poison_class", self.poison_class, minimum=0)

    def count(self, n_train: int) -> int:
        """Number of poisons for a training set of ``n_train`` examples (at least 1)."""
        if self.num_poisons is not None:
            return self.num_poisons
        return max(1, int(round(self.budget * n_train)))


_THREAT_KEYS = tuple(f.name for f in fields(ThreatModel))


@dataclass(frozen=True)
class AttackSpec:
    """An attack as a run describes it: a registered name, the threat model and the attack's
    options (its hyperparameters).

    The name is checked against the registry at once (one error line listing the valid
    names); the options are checked against the attack's signature by :meth:`create`.

    Args:
        name: a registered attack name (``epic list attacks``).
        threat: what the attacker may do (budget, eps, ...); default :class:`ThreatModel`'s.
        options: keyword arguments of the attack, e.g. ``{"steps": 250}`` (copied); ``None``
            values keep the defaults.
    """

    name: str
    threat: ThreatModel = field(default_factory=ThreatModel)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise EpicError(f"attack name must be a string, got {self.name!r}")
        ATTACKS.get(self.name)  # an unknown name lists the registered ones
        if not isinstance(self.threat, ThreatModel):
            raise EpicError(f"threat of attack '{self.name}' must be a ThreatModel, "
                            f"got {self.threat!r}")
        if not isinstance(self.options, Mapping):
            raise EpicError(f"options of attack '{self.name}' must be a mapping of option "
                            f"names to values, got {self.options!r}")
        object.__setattr__(self, "options", dict(self.options))

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | AttackSpec) -> AttackSpec:
        """A spec from a name, a spec, or a flat mapping as YAML gives it:
        ``{name, budget, eps, num_poisons, poison_class, options}`` (all but ``name``
        optional; ``None`` keeps a default). :meth:`to_dict` gives the same layout."""
        if isinstance(value, AttackSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        valid = {"name", "options", *_THREAT_KEYS}
        if not isinstance(value, Mapping) or "name" not in value:
            raise EpicError(f"an attack is a name or a mapping {{name: ..., eps: ..., "
                            f"options: {{...}}}}, got {value!r}")
        unknown = sorted(str(k) for k in value if k not in valid)
        if unknown:
            raise EpicError(f"unknown key(s) {unknown} of attack {value['name']!r}; valid keys "
                            f"are {sorted(valid)}")
        threat = {k: value[k] for k in _THREAT_KEYS if value.get(k) is not None}
        return cls(value["name"], ThreatModel(**threat), value.get("options") or {})

    def create(self) -> Attack:
        """Build the attack with :attr:`options`."""
        return create_attack(self.name, **self.options)

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "budget", "eps", "poison_class", "num_poisons", "options"}``, plain data
        for YAML and JSON; :meth:`parse` reads it."""
        threat = {k: getattr(self.threat, k) for k in _THREAT_KEYS}
        return {"name": self.name, **threat, "options": copy.deepcopy(dict(self.options))}


@dataclass(frozen=True)
class Target:
    """The test image the attacker wants misclassified as ``adv_label``.

    Args:
        image: (C, H, W) uint8 image.
        label: its true class.
        adv_label: the class the attacker wants; must differ from ``label``.
        index: its index in the test split, -1 if unknown.
    """

    image: Tensor
    label: int
    adv_label: int
    index: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.image, Tensor) or self.image.dtype != torch.uint8 \
                or self.image.ndim != 3:
            raise EpicError("target image must be a uint8 (C, H, W) tensor")
        if int(self.adv_label) == int(self.label):
            raise EpicError(f"adversarial label {self.adv_label} equals the target's true label; "
                            "choose another --adv-class")

    @classmethod
    def from_split(cls, test: ImageTensors, index: int, adv_label: int) -> Target:
        """The target at ``index`` of a test split."""
        if not 0 <= index < len(test):
            raise EpicError(f"target index {index} out of range for a test split of "
                            f"{len(test)} images")
        if not 0 <= adv_label < test.num_classes:
            raise EpicError(f"adversarial class {adv_label} is not in [0, {test.num_classes})")
        return cls(test.images[index], int(test.labels[index]), int(adv_label), int(index))


def select_bases(train: ImageTensors, klass: int, count: int, *,
                 generator: torch.Generator) -> Tensor:
    """A seeded random choice of ``count`` training indices of class ``klass`` (sorted)."""
    pool = (train.labels == klass).nonzero().squeeze(1)
    if count > len(pool):
        raise EpicError(f"{count} poisons requested but class {klass} has only {len(pool)} "
                        "training images; lower the budget")
    pick = torch.randperm(len(pool), generator=generator)[:count]
    return pool[pick].sort().values


def project(delta: Tensor, base: Tensor, eps: float) -> Tensor:
    """Clip ``delta`` (in [0, 1] units) to the eps ball and ``base + delta`` to [0, 1], in place."""
    with torch.no_grad():
        delta.clamp_(-eps, eps)
        delta.copy_((base + delta).clamp_(0, 1) - base)
    return delta


def to_poison_set(train: ImageTensors, indices: Tensor, poisoned: Tensor, target: Target,
                  threat: ThreatModel, metadata: dict[str, Any]) -> PoisonSet:
    """Quantise float poisons in [0, 1] to uint8 (staying inside eps) and wrap them."""
    base = train.images[indices.cpu()].to(torch.int16)
    quantised = (poisoned.detach().cpu().float() * 255).round().to(torch.int16)
    e = int(threat.eps)  # rounding keeps |q - base| <= eps when eps is a whole pixel value
    quantised = torch.minimum(torch.maximum(quantised, base - e), base + e).clamp_(0, 255)
    return PoisonSet(base_indices=indices.cpu(), images=quantised.to(torch.uint8),
                     labels=train.labels[indices.cpu()], target_image=target.image.cpu(),
                     target_label=target.label, adv_label=target.adv_label, eps=threat.eps,
                     target_index=target.index, metadata=metadata)


def as_ensemble(models: nn.Module | Sequence[nn.Module], device: torch.device) -> list[nn.Module]:
    """Copies of the surrogates in eval mode on ``device``, parameters frozen (inputs untouched)."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models:
        raise EpicError("an attack needs at least one surrogate model")
    return [copy.deepcopy(m).to(device).eval().requires_grad_(False) for m in models]


@dataclass(frozen=True)
class Crafting:
    """One crafting job as :meth:`Attack.craft` sets it up for :meth:`Attack._craft`.

    Attributes:
        models: Frozen copies of the surrogates, in eval mode on ``device``.
        train: The clean training split the bases come from.
        indices: Sorted CPU training indices of the base images.
        base: ``(P, C, H, W)`` base images in ``[0, 1]`` on ``device``.
        target_x: ``(1, C, H, W)`` target image in ``[0, 1]`` on ``device``.
        target: The target.
        threat: Budget and eps (out of 255).
        poison_class: The class the bases come from (``target.adv_label`` unless the threat
            names another).
        seed: The seed ``generator`` started from.
        generator: Seeded CPU generator; it has drawn the bases, the attack draws the rest.
        device: Where the surrogates and images live.
        progress: Show a tqdm bar.
    """

    models: list[nn.Module]
    train: ImageTensors
    indices: Tensor
    base: Tensor
    target_x: Tensor
    target: Target
    threat: ThreatModel
    poison_class: int
    seed: int
    generator: torch.Generator
    device: torch.device
    progress: bool


@dataclass(frozen=True)
class Crafted:
    """What :meth:`Attack._craft` returns.

    Attributes:
        poisons: ``(P, C, H, W)`` poisoned images in ``[0, 1]`` within eps of the bases.
        result: JSON-serialisable facts about the run (final loss, steps taken, ...), stored
            under the poisons' ``metadata["result"]``.
        extra: Further JSON-serialisable metadata fields an attack's evaluation reads back
            (e.g. the sleeper agent's trigger), stored at the top level of ``metadata``.
    """

    poisons: Tensor
    result: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class Attack(abc.ABC):
    """Base class: subclasses set ``name`` and implement :meth:`_craft`.

    Hyperparameters go to ``__init__`` (so ``create_attack(name, steps=...)`` works); the
    shared arguments go to :meth:`craft`, which sets up a :class:`Crafting` job (device,
    surrogate copies, seeded bases) and turns the :class:`Crafted` result into poisons.
    """

    name: str = "attack"

    def craft(self, models: nn.Module | Sequence[nn.Module], train: ImageTensors,
              target: Target, threat: ThreatModel, *, seed: int = 0, device: str = "auto",
              progress: bool = True) -> PoisonSet:
        """Craft poisons against ``target`` on ``train`` with the surrogate(s) ``models``.

        Returns:
            A :class:`~epic.data.PoisonSet` whose perturbations are inside ``threat.eps``.
        """
        job = self._job(models, train, target, threat, seed=seed, device=device,
                        progress=progress)
        return self._poison_set(job, self._craft(job))

    def _job(self, models: nn.Module | Sequence[nn.Module], train: ImageTensors,
             target: Target, threat: ThreatModel, *, seed: int, device: str,
             progress: bool) -> Crafting:
        """The crafting job of :meth:`craft`'s arguments: surrogate copies on the device and
        the seeded choice of bases."""
        dev = resolve_device(device)
        ensemble = as_ensemble(models, dev)
        generator = torch.Generator().manual_seed(seed)
        klass = target.adv_label if threat.poison_class is None else threat.poison_class
        indices = select_bases(train, klass, threat.count(len(train)), generator=generator)
        return Crafting(models=ensemble, train=train, indices=indices,
                        base=train.images[indices].to(dev).float().div_(255),
                        target_x=target.image.to(dev).float().div_(255)[None], target=target,
                        threat=threat, poison_class=int(klass), seed=seed,
                        generator=generator, device=dev, progress=progress)

    def _poison_set(self, job: Crafting, crafted: Crafted) -> PoisonSet:
        """The quantised poisons of ``crafted``, with the job's metadata."""
        metadata = {"attack": self.name, "seed": job.seed, "num_surrogates": len(job.models),
                    "poison_class": job.poison_class,
                    "hyperparameters": self.hyperparameters(), "result": crafted.result,
                    **crafted.extra}
        return to_poison_set(job.train, job.indices, crafted.poisons, job.target, job.threat,
                             metadata)

    @classmethod
    def score(cls, model: nn.Module, poisons: PoisonSet, test: Any) -> dict[str, Any]:
        """Fields of a run's summary that measure this attack beyond the target's prediction
        (e.g. a backdoor's success over patched test images); ``test`` is the clean test
        split. Default: none."""
        return {}

    def hyperparameters(self) -> dict[str, Any]:
        """The attack's settings, recorded in the poisons' metadata."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @abc.abstractmethod
    def _craft(self, job: Crafting) -> Crafted:
        """The poisons of ``job`` in ``[0, 1]`` within eps of ``job.base``, with the facts
        about the run."""
