"""Sleeper Agent (Souri et al., NeurIPS 2022): a hidden-trigger backdoor, ``sleeper-agent``.

The poisons are clean-label images of the target class with small perturbations; the trigger
never appears in the training set. The perturbations are crafted by gradient matching (see
:mod:`epic.attacks.gradient_matching`), with the target gradient replaced by the gradient of
``CE(f(apply_trigger(x_s)), adv_label)`` averaged over a batch of source-class training images
``x_s``: a model trained on the poisons learns to send patched source images to ``adv_label``.

Optionally the surrogate is retrained on the current poisoned training set a few times during
crafting (``retrain_rounds``, evenly spaced) through a user callback, which keeps this module
independent of :mod:`epic.training`.

The :class:`~epic.attacks.Target` gives ``label`` = the source class and ``adv_label`` = the
class patched source images should be sent to; its image (a source-class image) is only
recorded. The trigger is stored in the poisons' metadata (``"trigger"``, read it back with
:func:`trigger_from_metadata`) for evaluation with :func:`backdoor_success`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import EpicError
from .._validation import check_choice, check_int
from ..data import ImageTensors, PoisonSet
from .base import Crafted, Crafting, Target, ThreatModel, register_attack
from .gradient_matching import (
    GradientMatching,
    Refresh,
    Retrain,
    craft_matching,
    parameter_gradients,
    retrained,
)

__all__ = [
    "PLACEMENTS",
    "TRIGGER_PATTERNS",
    "SleeperAgent",
    "apply_trigger",
    "backdoor_success",
    "make_trigger",
    "trigger_from_metadata",
]

PLACEMENTS = ("random", "fixed")
TRIGGER_PATTERNS = ("binary", "uniform")


# --------------------------------------------------------------------------- the trigger

def make_trigger(size: int, channels: int, generator: torch.Generator, *,
                 pattern: str = "binary") -> Tensor:
    """A seeded random square patch.

    Args:
        size: Side of the patch in pixels.
        channels: Image channels.
        generator: Seeded CPU generator.
        pattern: ``'binary'`` (each pixel 0 or 1, default) or ``'uniform'`` (in [0, 1]).

    Returns:
        ``(channels, size, size)`` float32 patch in [0, 1], on the CPU.

    Raises:
        EpicError: A non-positive size or channel count, or an unknown pattern.
    """
    check_int("size", size, minimum=1)
    check_int("channels", channels, minimum=1)
    check_choice("pattern", pattern, TRIGGER_PATTERNS)
    if pattern == "binary":
        return torch.randint(0, 2, (channels, size, size), generator=generator).float()
    return torch.rand((channels, size, size), generator=generator)


def apply_trigger(images: Tensor, trigger: Tensor, *, generator: torch.Generator | None = None,
                  placement: str = "fixed") -> Tensor:
    """Paste ``trigger`` onto every image (vectorised; differentiable w.r.t. both).

    Args:
        images: ``(N, C, H, W)`` float images in [0, 1].
        trigger: ``(C, s, s)`` float patch with ``s <= min(H, W)``.
        generator: CPU generator for the random placements; ``None`` uses torch's global RNG.
        placement: ``'fixed'`` (bottom-right corner, default) or ``'random'`` (a uniformly
            random position per image, patch fully inside).

    Returns:
        ``(N, C, H, W)`` new images; ``images`` is not modified.

    Raises:
        EpicError: Non-float images, a trigger of the wrong shape, or an unknown placement.
    """
    check_choice("placement", placement, PLACEMENTS)
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise EpicError("images must be a float (N, C, H, W) tensor in [0, 1]; convert uint8 "
                        "images with x.float() / 255")
    n, c, h, w = images.shape
    if not isinstance(trigger, Tensor) or trigger.ndim != 3 or trigger.shape[0] != c \
            or trigger.shape[1] != trigger.shape[2] or trigger.shape[1] > min(h, w):
        got = tuple(trigger.shape) if isinstance(trigger, Tensor) else type(trigger).__name__
        raise EpicError(f"trigger must be a square ({c}, s, s) patch with s <= {min(h, w)} for "
                        f"images of shape {(c, h, w)}, got {got}")
    s = trigger.shape[1]
    dev = images.device
    if placement == "fixed":
        ys = torch.full((n,), h - s, dtype=torch.long, device=dev)
        xs = torch.full((n,), w - s, dtype=torch.long, device=dev)
    else:
        ys = torch.randint(0, h - s + 1, (n,), generator=generator).to(dev)
        xs = torch.randint(0, w - s + 1, (n,), generator=generator).to(dev)
    dy = torch.arange(h, device=dev)[None, :] - ys[:, None]  # (N, H): row inside the patch
    dx = torch.arange(w, device=dev)[None, :] - xs[:, None]  # (N, W)
    inside = (((dy >= 0) & (dy < s))[:, :, None] & ((dx >= 0) & (dx < s))[:, None, :])
    rows = dy.clamp(0, s - 1)[:, :, None]  # (N, H, 1)
    cols = dx.clamp(0, s - 1)[:, None, :]  # (N, 1, W)
    canvas = trigger.to(device=dev, dtype=images.dtype)[:, rows, cols]  # (C, N, H, W)
    return torch.where(inside[:, None], canvas.transpose(0, 1), images)


@torch.no_grad()
def backdoor_success(model: nn.Module, images: Tensor, trigger: Tensor, adv_label: int, *,
                     placement: str = "random", batch_size: int = 512,
                     generator: torch.Generator | None = None) -> float:
    """Fraction of patched images that ``model`` classifies as ``adv_label``.

    The model runs in eval mode without gradients on its own device; its train/eval mode is
    restored afterwards.

    Args:
        model: A classifier taking images in [0, 1].
        images: ``(N, C, H, W)`` uint8 images, normally held-out images of the source class.
        trigger: ``(C, s, s)`` float patch in [0, 1].
        adv_label: The class the backdoor should trigger.
        placement: ``'random'`` (default, as crafted by default) or ``'fixed'``.
        batch_size: Images per forward pass.
        generator: CPU generator for random placements (``None``: torch's global RNG).

    Returns:
        The success rate in [0, 1].

    Raises:
        EpicError: Images that are not uint8 (N, C, H, W), none at all, or a bad batch size.
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise EpicError("images must be a uint8 (N, C, H, W) tensor of source-class images")
    if images.shape[0] == 0:
        raise EpicError("backdoor_success needs at least one source-class image")
    check_int("batch_size", batch_size, minimum=1)
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    was_training = model.training
    model.eval()
    try:
        hits = 0
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device).float().div_(255)
            x = apply_trigger(x, trigger, generator=generator, placement=placement)
            hits += int((model(x).argmax(1) == int(adv_label)).sum())
    finally:
        model.train(was_training)
    return hits / images.shape[0]


def trigger_from_metadata(poisons: PoisonSet) -> Tensor:
    """The ``(C, s, s)`` trigger a sleeper-agent run recorded in ``poisons.metadata``.

    Raises:
        EpicError: The poisons were not made by ``sleeper-agent``.
    """
    trigger = poisons.metadata.get("trigger")
    if trigger is None:
        raise EpicError("these poisons record no trigger; they were not crafted by sleeper-agent")
    return torch.tensor(trigger, dtype=torch.float32)


def _rounded(values: Any, digits: int = 4) -> Any:
    if isinstance(values, list):
        return [_rounded(v, digits) for v in values]
    return round(float(values), digits)


# --------------------------------------------------------------------------- the attack

@register_attack("sleeper-agent")
class SleeperAgent(GradientMatching):
    """Hidden-trigger backdoor crafted by gradient matching (Souri et al., 2022).

    Args:
        steps: Signed-Adam steps per restart (paper: 250).
        tau: Learning rate in units of eps, decayed by 0.1 at 3/8, 5/8, 7/8 of the steps.
        restarts: Random restarts; the lowest final alignment loss wins.
        augment: Differentiable random crop of the poisons while crafting; match the
            victim's training (``epic craft`` and ``epic bench`` set it from the augmentation).
        flip: Also random flips; ``False`` for digits and MNIST.
        batch_size: Poisons (and source images) per forward pass.
        patch_size: Side of the trigger; ``None`` picks ``max(2, H // 8)``.
        placement: ``'random'`` (default, a random position per source image) or ``'fixed'``
            (bottom-right).
        pattern: Trigger pixels, ``'binary'`` (default) or ``'uniform'``.
        source_batch: Source-class training images whose patched gradient is the target
            gradient (all of them if the class has fewer).
        retrain_rounds: Times the surrogate is retrained during crafting, at evenly spaced
            steps; needs ``retrain``. Default 0.
        retrain: ``retrain(poisoned_train) -> model`` trains a fresh surrogate on the current
            poisoned training split; called once per surrogate of the ensemble and round.
            May also be passed to :meth:`craft`.

    Raises:
        EpicError: A bad hyperparameter.
    """

    name = "sleeper-agent"

    def __init__(self, *, steps: int = 250, tau: float = 0.1, restarts: int = 1,
                 augment: bool = True, flip: bool = True, batch_size: int = 512,
                 patch_size: int | None = None, placement: str = "random",
                 pattern: str = "binary", source_batch: int = 128, retrain_rounds: int = 0,
                 retrain: Retrain | None = None) -> None:
        super().__init__(steps=steps, tau=tau, restarts=restarts, augment=augment, flip=flip,
                         batch_size=batch_size, retrain_rounds=retrain_rounds, retrain=retrain)
        if patch_size is not None:
            check_int("patch_size", patch_size, minimum=1)
        check_choice("placement", placement, PLACEMENTS)
        check_choice("pattern", pattern, TRIGGER_PATTERNS)
        check_int("source_batch", source_batch, minimum=1)
        self.patch_size = patch_size
        self.placement = placement
        self.pattern = pattern
        self.source_batch = source_batch

    @classmethod
    def score(cls, model: nn.Module, poisons: PoisonSet, test: Any) -> dict[str, Any]:
        """A hidden-trigger backdoor's success is measured on every patched source-class test
        image, not on one target; ``attack_success`` is then a majority of them."""
        source = int(poisons.metadata["source_class"])
        pick = test.labels == source
        sources = test.read(pick) if hasattr(test, "read") else test.images[pick]
        rate = backdoor_success(model, sources, trigger_from_metadata(poisons),
                                poisons.adv_label,
                                placement=poisons.metadata.get("placement", "random"),
                                generator=torch.Generator().manual_seed(0))
        return {"backdoor_success": rate, "attack_success": rate > 0.5}

    def craft(self, models: nn.Module | Sequence[nn.Module], train: ImageTensors,
              target: Target, threat: ThreatModel, *, seed: int = 0, device: str = "auto",
              progress: bool = True, retrain: Retrain | None = None) -> PoisonSet:
        """Craft sleeper-agent poisons for the source class ``target.label``.

        Args:
            models: Surrogate(s) trained on the clean ``train``.
            train: The clean training split; the poisons and the source images come from it.
            target: ``label`` is the source class, ``adv_label`` the backdoor's class.
            threat: Budget and eps; poisons come from ``adv_label`` unless ``poison_class``.
            seed: Seeds the bases, trigger, source images, placements and perturbations.
            device: ``'auto'``, ``'cpu'``, ``'cuda'``...
            progress: Show a tqdm bar.
            retrain: Overrides the ``retrain`` callback given to ``__init__``.

        Returns:
            The poisons; ``metadata`` holds ``trigger`` (nested lists, 4 decimals),
            ``source_class``, ``placement``, ``patch_size`` and ``source_indices`` (the
            training images whose patched gradient was matched; leave them out when measuring
            the backdoor).

        Raises:
            EpicError: ``retrain_rounds > 0`` without a callback, a source class without
                training images, a patch larger than the images, or too few poison bases.
        """
        _, h, w = train.image_shape
        size = self._patch_side(h)
        if size > min(h, w):
            raise EpicError(f"patch_size={size} does not fit {h}x{w} images; choose at most "
                            f"{min(h, w)}")
        if not bool((train.labels == int(target.label)).any()):
            raise EpicError(f"source class {target.label} has no training images; choose "
                            f"another target class")
        return super().craft(models, train, target, threat, seed=seed, device=device,
                             progress=progress, retrain=retrain)

    def _patch_side(self, height: int) -> int:
        """The trigger's side for images ``height`` pixels high."""
        return self.patch_size if self.patch_size is not None else max(2, height // 8)

    def _craft(self, job: Crafting, retrain: Retrain | None = None) -> Crafted:
        """Match the patched source images' gradient (retraining as in
        :meth:`GradientMatching._craft`); the trigger and sources go to ``extra``."""
        train, generator = job.train, job.generator
        size = self._patch_side(train.image_shape[1])
        source = int(job.target.label)
        pool = (train.labels == source).nonzero().squeeze(1)
        trigger = make_trigger(size, train.image_shape[0], generator, pattern=self.pattern)
        pick = pool[torch.randperm(len(pool), generator=generator)[:self.source_batch]].sort()[0]
        sources = train.images[pick].to(job.device).float().div_(255)
        sources = apply_trigger(sources, trigger, generator=generator, placement=self.placement)
        adv = int(job.target.adv_label)

        def source_gradients(surrogates: list[nn.Module]) -> list[list[Tensor]]:
            return [parameter_gradients(m, sources, adv, batch_size=self.batch_size)
                    for m in surrogates]

        refresh: Refresh | None = None
        if retrain is not None:
            def refresh(poisoned: Tensor) -> tuple[list[nn.Module], list[list[Tensor]]]:
                fresh = retrained(retrain, job, poisoned)
                return fresh, source_gradients(fresh)

        labels = train.labels[job.indices].to(job.device)
        poisons, info = craft_matching(
            job.models, job.base, labels, source_gradients(job.models),
            eps=job.threat.eps / 255, generator=generator, progress=job.progress,
            desc=self.name, refresh=refresh, refresh_at=self.retrain_steps() if refresh else (),
            **self.matching_options())
        return Crafted(poisons, info, {"source_class": source, "placement": self.placement,
                                       "patch_size": size, "source_indices": pick.tolist(),
                                       "trigger": _rounded(trigger.tolist())})
