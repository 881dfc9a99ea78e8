"""Gradient matching ("Witches' Brew", Geiping et al., ICLR 2021): ``gradient-matching``.

The poisons are perturbed so that the gradient of the training loss on them, taken over the
surrogate's parameters, points the same way as the gradient of the *adversarial* loss on the
target (the target image with the attacker's label). Training on the poisons then moves the
model towards classifying the target as ``adv_label``.

For surrogate :math:`f_\\theta`, target :math:`x_t` with adversarial label :math:`y_{adv}`, and
poisons :math:`x_i + \\delta_i` with labels :math:`y_i`, the loss minimised over
:math:`\\delta` (with :math:`\\|\\delta_i\\|_\\infty \\le \\varepsilon`) is

.. math::
    1 - \\cos\\Big(\\nabla_\\theta \\mathrm{CE}(f(x_t), y_{adv}),\\;
    \\nabla_\\theta \\tfrac{1}{P}\\textstyle\\sum_i \\mathrm{CE}(f(A(x_i + \\delta_i)), y_i)\\Big)

where :math:`A` is a random differentiable augmentation (crop and flip), redrawn every step.
With an ensemble, the loss is averaged over the surrogates, each with its own target gradient.

Units: ``delta`` lives in pixel units [0, 1] (``eps / 255``). The optimiser is "signed Adam":
Adam on ``delta`` with the gradient replaced by its sign, learning rate ``tau * eps / 255``
(so ``tau`` is a step in units of eps), decayed by 0.1 at 3/8, 5/8 and 7/8 of the steps. After
every step ``delta`` is projected back into the eps ball and the [0, 1] box.

Surrogates are used in eval mode (BatchNorm on running statistics), as in the paper's code.
Their parameters stay frozen: gradients are taken through :func:`torch.func.functional_call`
on grad-enabled aliases of the parameters, so the models are never modified.

The shared pieces (:func:`parameter_gradients`, :func:`cosine_loss`, :func:`alignment_loss`,
:func:`craft_matching`) are reused by :mod:`epic.attacks.sleeper_agent`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .._errors import EpicError
from .._validation import check_int
from ..data import ImageTensors, PoisonedDataset, PoisonSet
from ..data.augment import random_crop, random_flip
from .base import (
    Attack,
    Crafted,
    Crafting,
    Target,
    ThreatModel,
    as_ensemble,
    project,
    register_attack,
    to_poison_set,
)

__all__ = [
    "GradientMatching",
    "Retrain",
    "alignment_loss",
    "check_matching",
    "cosine_loss",
    "craft_matching",
    "crop_padding",
    "parameter_gradients",
    "retrained",
]

Gradients = list[Tensor]
"""One gradient tensor per parameter of a surrogate, in ``named_parameters()`` order."""

Refresh = Callable[[Tensor], tuple[list[nn.Module], list[Gradients]]]
"""Called with the current poisons ``(P, C, H, W)``; returns new surrogates and their target
gradients (used by the retraining rounds)."""

Retrain = Callable[[ImageTensors], nn.Module]
"""Trains a fresh surrogate on a (poisoned) training split and returns it."""

_MILESTONES = (3 / 8, 5 / 8, 7 / 8)


# --------------------------------------------------------------------------- gradients

def _leaves(model: nn.Module) -> dict[str, Tensor]:
    """Grad-enabled aliases of ``model``'s parameters (sharing storage; the model is untouched)."""
    return {name: p.detach().requires_grad_() for name, p in model.named_parameters()}


def _as_labels(labels: Tensor | int, n: int, device: torch.device) -> Tensor:
    if isinstance(labels, Tensor):
        return labels.to(device=device, dtype=torch.long)
    return torch.full((n,), int(labels), dtype=torch.long, device=device)


def parameter_gradients(model: nn.Module, images: Tensor, labels: Tensor | int, *,
                        create_graph: bool = False, batch_size: int | None = None) -> Gradients:
    """Gradient of the mean cross-entropy of ``model`` on a batch, over all its parameters.

    The model's parameters need not require grad (attacks freeze them): the gradient is taken
    with respect to grad-enabled aliases through :func:`torch.func.functional_call`. The model
    runs in whatever mode it is in (attacks put it in eval mode).

    Args:
        images: ``(N, C, H, W)`` float images in [0, 1], on the model's device.
        labels: ``(N,)`` int64 labels, or one int used for every image.
        create_graph: Keep the graph so the result can be differentiated again (e.g. with
            respect to ``images``); the whole batch then goes through in one pass.
        batch_size: Without ``create_graph``, sum the gradient over chunks of this many
            images (exactly the full-batch mean gradient, in bounded memory).

    Returns:
        One tensor per parameter (``model.named_parameters()`` order), each of that
        parameter's shape.
    """
    params = _leaves(model)
    inputs = list(params.values())
    labels = _as_labels(labels, images.shape[0], images.device)
    n = images.shape[0]
    with torch.enable_grad():
        if create_graph or batch_size is None or n <= batch_size:
            loss = F.cross_entropy(functional_call(model, params, (images,)), labels)
            return list(torch.autograd.grad(loss, inputs, create_graph=create_graph))
        total: Gradients | None = None
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            logits = functional_call(model, params, (images[sl],))
            loss = F.cross_entropy(logits, labels[sl], reduction="sum") / n
            part = torch.autograd.grad(loss, inputs)
            total = list(part) if total is None else [a + b for a, b in zip(total, part,
                                                                             strict=True)]
        assert total is not None  # n > batch_size >= 1
        return total


def cosine_loss(poison_grad: Gradients, target_grad: Gradients) -> Tensor:
    """``1 - cos`` between two flattened gradients: the gradient-matching alignment loss.

    Args:
        poison_grad: Per-parameter tensors (may carry a graph).
        target_grad: Per-parameter tensors of the same shapes.

    Returns:
        A scalar tensor in [0, 2]; 0 when the gradients point the same way.
    """
    if len(poison_grad) != len(target_grad):
        raise EpicError(f"gradients must have one tensor per parameter, got {len(poison_grad)} "
                        f"and {len(target_grad)}; use target gradients of the same surrogate")
    dot = sum((p * t).sum() for p, t in zip(poison_grad, target_grad, strict=True))
    p_sq = sum(p.pow(2).sum() for p in poison_grad)
    t_sq = sum(t.pow(2).sum() for t in target_grad)
    return 1 - dot / (p_sq * t_sq).clamp_min(1e-30).sqrt()


def alignment_loss(models: nn.Module | list[nn.Module], poisons: Tensor, labels: Tensor | int,
                   target_grads: Gradients | list[Gradients], *,
                   batch_size: int = 512) -> float:
    """The gradient-matching loss of finished poisons, without augmentation.

    Args:
        models: A surrogate or a list of them (an ensemble), in the mode to evaluate them in
            (attacks use eval mode).
        poisons: ``(P, C, H, W)`` float poisoned images in [0, 1], on the models' device.
        labels: ``(P,)`` int64 poison labels, or one int for all.
        target_grads: The target gradient of each surrogate (one :data:`Gradients` per model;
            a single one for a single model).
        batch_size: Poisons per forward pass.

    Returns:
        ``1 - cos(poison gradient, target gradient)`` averaged over the surrogates.
    """
    if isinstance(models, nn.Module):
        models, target_grads = [models], [target_grads]  # type: ignore[list-item]
    losses = [float(cosine_loss(parameter_gradients(m, poisons, labels, batch_size=batch_size),
                                t))
              for m, t in zip(models, target_grads, strict=True)]
    return sum(losses) / len(losses)


def crop_padding(height: int) -> int:
    """Random-crop padding for images of this height: 4 for 32x32, 1 for 8x8 (``H // 8``)."""
    return max(1, height // 8)


# --------------------------------------------------------------------------- crafting loop

def _matching_backward(models: list[nn.Module], base: Tensor, delta: Tensor, labels: Tensor,
                       target_grads: list[Gradients], augment: Callable[[Tensor], Tensor],
                       aug_gen: torch.Generator, batch_size: int) -> float:
    """Accumulate d(mean alignment loss)/d(delta) into ``delta.grad``; return the loss.

    One batch: the poison gradient is taken with ``create_graph`` and the cosine loss is
    backpropagated to ``delta``. More poisons than ``batch_size``: the exact full-batch
    gradient in two passes of bounded memory. Pass 1 sums the chunks' parameter gradients
    ``g`` (no graph) and gets ``v = d loss / d g``; pass 2 replays the same augmentations and
    backpropagates ``<g_chunk, v>`` through each chunk, which is the chain rule split by chunk.
    """
    n, m = base.shape[0], len(models)
    total = 0.0
    for model, tgrad in zip(models, target_grads, strict=True):
        params = _leaves(model)
        inputs = list(params.values())
        if n <= batch_size:
            logits = functional_call(model, params, (augment(base + delta),))
            grad = torch.autograd.grad(F.cross_entropy(logits, labels), inputs,
                                       create_graph=True)
            loss = cosine_loss(grad, tgrad)
            (loss / m).backward(inputs=[delta])
            total += float(loss.detach())
            continue
        state = aug_gen.get_state()
        chunks = [slice(s, s + batch_size) for s in range(0, n, batch_size)]
        grad_sum: Gradients | None = None
        for sl in chunks:
            logits = functional_call(model, params, (augment(base[sl] + delta[sl].detach()),))
            part = torch.autograd.grad(F.cross_entropy(logits, labels[sl], reduction="sum") / n,
                                       inputs)
            grad_sum = list(part) if grad_sum is None else [
                a + b for a, b in zip(grad_sum, part, strict=True)]
        assert grad_sum is not None
        leaf = [g.detach().requires_grad_() for g in grad_sum]
        loss = cosine_loss(leaf, tgrad)
        direction = torch.autograd.grad(loss, leaf)
        aug_gen.set_state(state)  # replay the same crops and flips
        for sl in chunks:
            logits = functional_call(model, params, (augment(base[sl] + delta[sl]),))
            part = torch.autograd.grad(F.cross_entropy(logits, labels[sl], reduction="sum") / n,
                                       inputs, create_graph=True)
            inner = sum((a * b).sum() for a, b in zip(part, direction, strict=True))
            (inner / m).backward(inputs=[delta])
        total += float(loss.detach())
    return total / m


def craft_matching(models: list[nn.Module], base: Tensor, labels: Tensor,
                   target_grads: list[Gradients], *, eps: float, steps: int = 250,
                   tau: float = 0.1, restarts: int = 1, augment: bool = True, flip: bool = True,
                   batch_size: int = 512, generator: torch.Generator, progress: bool = False,
                   desc: str = "gradient matching", refresh: Refresh | None = None,
                   refresh_at: Collection[int] = ()) -> tuple[Tensor, dict[str, Any]]:
    """Signed-Adam gradient matching: the optimisation shared by the gradient-matching attacks.

    Each restart draws ``delta`` uniformly in ``[-eps, eps]`` (projected into the box), runs
    ``steps`` signed-Adam steps on the augmented alignment loss, and is scored by the final
    un-augmented :func:`alignment_loss`; the restart with the lowest score is returned.

    Args:
        models: Surrogates in eval mode on the poisons' device.
        base: ``(P, C, H, W)`` float base images in [0, 1].
        labels: ``(P,)`` int64 poison labels on the same device.
        target_grads: One target gradient per surrogate.
        eps: L-inf bound in [0, 1] pixel units (``threat.eps / 255``).
        steps: Optimisation steps per restart.
        tau: Adam learning rate in units of eps (lr = ``tau * eps``).
        restarts: Independent restarts; the best one is kept.
        augment: Random crop (padding :func:`crop_padding`) each step, differentiably.
        flip: Also flip left-right (only with ``augment``); off for digits.
        batch_size: Poisons per forward pass; more poisons are chunked with the exact
            full-batch gradient.
        generator: Seeded CPU generator for the initialisation and the augmentation seed.
        progress: Show a tqdm bar.
        desc: The bar's label.
        refresh: Called before the steps in ``refresh_at`` with the current poisons; it returns
            new surrogates and target gradients to continue against. Each restart starts
            again from ``models``.
        refresh_at: Step indices (0-based) at which to call ``refresh``.

    Returns:
        ``(poisons, info)``: ``(P, C, H, W)`` poisoned images in [0, 1] within eps of ``base``,
        and ``{"final_loss", "initial_loss", "restarts", "steps", "best_restart"}`` (losses of
        the kept restart, at its random start and at its end).
    """
    padding = crop_padding(base.shape[2])
    aug_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    aug_gen = torch.Generator().manual_seed(aug_seed)

    def augment_fn(x: Tensor) -> Tensor:
        if augment:
            x = random_crop(x, padding, aug_gen)
            if flip:
                x = random_flip(x, aug_gen)
        return x

    milestones = [max(1, int(steps * f)) for f in _MILESTONES]
    refresh_steps = set(refresh_at) if refresh is not None else set()
    best: tuple[float, float, int, Tensor] | None = None
    bar = tqdm(total=steps * restarts, desc=desc, disable=not progress, leave=False)
    try:
        for restart in range(restarts):
            cur_models, cur_grads = models, target_grads
            delta = ((torch.rand(base.shape, generator=generator) * 2 - 1) * eps)
            delta = project(delta.to(device=base.device, dtype=base.dtype), base, eps)
            initial = alignment_loss(cur_models, base + delta, labels, cur_grads,
                                     batch_size=batch_size)
            delta.requires_grad_(True)
            optimizer = torch.optim.Adam([delta], lr=tau * eps)
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
            for step in range(steps):
                if step in refresh_steps:
                    assert refresh is not None
                    cur_models, cur_grads = refresh((base + delta).detach())
                optimizer.zero_grad(set_to_none=False)
                loss = _matching_backward(cur_models, base, delta, labels, cur_grads,
                                          augment_fn, aug_gen, batch_size)
                delta.grad.sign_()  # signed Adam: Adam sees only the gradient's sign
                optimizer.step()
                scheduler.step()
                project(delta, base, eps)
                bar.update(1)
                bar.set_postfix(restart=restart, loss=f"{loss:.4f}", refresh=False)
            final = alignment_loss(cur_models, base + delta.detach(), labels, cur_grads,
                                   batch_size=batch_size)
            if best is None or final < best[0]:
                best = (final, initial, restart, delta.detach().clone())
    finally:
        bar.close()
    assert best is not None  # restarts >= 1
    final, initial, restart, delta = best
    info = {"final_loss": final, "initial_loss": initial, "restarts": restarts, "steps": steps,
            "best_restart": restart}
    return (base + delta).clamp_(0, 1), info


# --------------------------------------------------------------------------- the attack

def check_matching(*, steps: Any, tau: Any, restarts: Any, augment: Any, flip: Any,
                   batch_size: Any) -> None:
    """Validate the signed-Adam hyperparameters (shared with the sleeper agent).

    Raises:
        EpicError: The first bad value, in one line.
    """
    check_int("steps", steps, minimum=1)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) \
            or tau <= 0:
        raise EpicError(f"tau must be a positive step size in units of eps (e.g. 0.1), got "
                        f"{tau!r}")
    check_int("restarts", restarts, minimum=1)
    for name, value in (("augment", augment), ("flip", flip)):
        if not isinstance(value, bool):
            raise EpicError(f"{name} must be True or False, got {value!r}")
    check_int("batch_size", batch_size, minimum=1)


@register_attack("gradient-matching")
class GradientMatching(Attack):
    """Witches' Brew: clean-label poisons whose training gradient matches the target's.

    Args:
        steps: Signed-Adam steps per restart (paper: 250).
        tau: Learning rate in units of eps (paper: 0.1), decayed by 0.1 at 3/8, 5/8, 7/8.
        restarts: Random restarts; the one with the lowest alignment loss is kept (paper: 8
            on ResNet-18; default 1).
        augment: Differentiable random crop while crafting (paper: on); match the victim's
            training (``epic craft`` and ``epic bench`` set it from the augmentation).
        flip: Also random left-right flips; ``False`` for digits and MNIST.
        batch_size: Poisons per forward pass; more are processed in chunks with the exact
            full-batch gradient.
        retrain_rounds: Times the surrogates are retrained on the current poisoned training
            split during crafting, at evenly spaced steps, after which the poisons are matched
            against the retrained models (Souri et al.'s model retraining, meant for victims
            trained from scratch on the poisons; on digits it did not raise the attack's
            success, docs/results.md); needs ``retrain``. Default 0.
        retrain: ``retrain(poisoned_train) -> model`` trains a fresh surrogate on the current
            poisoned training split; called once per surrogate of the ensemble and round.
            May also be passed to :meth:`craft` (``epic craft`` and ``epic bench`` pass one
            that trains like the first surrogate, :func:`epic.evaluation.craft.retrainer`).

    Raises:
        EpicError: A bad hyperparameter (e.g. ``steps=0`` or ``tau <= 0``).
    """

    name = "gradient-matching"

    def __init__(self, *, steps: int = 250, tau: float = 0.1, restarts: int = 1,
                 augment: bool = True, flip: bool = True, batch_size: int = 512,
                 retrain_rounds: int = 0, retrain: Retrain | None = None) -> None:
        check_matching(steps=steps, tau=tau, restarts=restarts, augment=augment, flip=flip,
                       batch_size=batch_size)
        check_int("retrain_rounds", retrain_rounds, minimum=0)
        if retrain_rounds >= steps:
            raise EpicError(f"retrain_rounds must be less than steps={steps} so that rounds fall "
                            f"between steps, got {retrain_rounds}")
        _check_retrain(retrain)
        self.steps = steps
        self.tau = float(tau)
        self.restarts = restarts
        self.augment = augment
        self.flip = flip
        self.batch_size = batch_size
        self.retrain_rounds = retrain_rounds
        self._retrain = retrain  # underscored: not a hyperparameter recorded in metadata

    def matching_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`craft_matching` this attack was configured with."""
        return {"steps": self.steps, "tau": self.tau, "restarts": self.restarts,
                "augment": self.augment, "flip": self.flip, "batch_size": self.batch_size}

    def retrain_steps(self) -> list[int]:
        """The (0-based) steps before which the surrogates are retrained, evenly spaced."""
        r = self.retrain_rounds
        return [k * self.steps // (r + 1) for k in range(1, r + 1)]

    def _retrainer(self, retrain: Retrain | None) -> Retrain | None:
        """The callback to use (``craft``'s over ``__init__``'s), checked against the rounds."""
        retrain = retrain if retrain is not None else self._retrain
        if self.retrain_rounds and retrain is None:
            raise EpicError(f"retrain_rounds={self.retrain_rounds} needs a retrain callback "
                            f"(poisoned ImageTensors -> trained model); pass retrain=... or set "
                            f"retrain_rounds=0")
        _check_retrain(retrain)
        return retrain if self.retrain_rounds else None

    def craft(self, models: nn.Module | Sequence[nn.Module], train: ImageTensors,
              target: Target, threat: ThreatModel, *, seed: int = 0, device: str = "auto",
              progress: bool = True, retrain: Retrain | None = None) -> PoisonSet:
        """Craft poisons against ``target`` (see :meth:`Attack.craft`); ``retrain`` overrides
        the callback given to ``__init__``.

        Raises:
            EpicError: ``retrain_rounds > 0`` without a callback.
        """
        job = self._job(models, train, target, threat, seed=seed, device=device,
                        progress=progress)
        return self._poison_set(job, self._craft(job, retrain=self._retrainer(retrain)))

    def _craft(self, job: Crafting, retrain: Retrain | None = None) -> Crafted:
        """Match the target's gradient; with ``retrain``, retrain the surrogates at
        :meth:`retrain_steps` and match the retrained ones' gradients from then on."""
        refresh: Refresh | None = None
        if retrain is not None:
            def refresh(poisoned: Tensor) -> tuple[list[nn.Module], list[Gradients]]:
                fresh = retrained(retrain, job, poisoned)
                return fresh, _target_gradients(fresh, job.target_x, job.target)

        labels = torch.full((len(job.base),), job.poison_class, dtype=torch.long,
                            device=job.device)
        poisons, info = craft_matching(
            job.models, job.base, labels, _target_gradients(job.models, job.target_x, job.target),
            eps=job.threat.eps / 255, generator=job.generator, progress=job.progress,
            desc=self.name, refresh=refresh, refresh_at=self.retrain_steps() if refresh else (),
            **self.matching_options())
        return Crafted(poisons, info)


def _target_gradients(models: list[nn.Module], target_x: Tensor, target: Target
                      ) -> list[Gradients]:
    """Each surrogate's gradient of the target's loss towards the adversarial label."""
    return [parameter_gradients(m, target_x, target.adv_label) for m in models]


def _check_retrain(retrain: Any) -> None:
    if retrain is not None and not callable(retrain):
        raise EpicError(f"retrain must be a function (poisoned ImageTensors -> model), got "
                        f"{type(retrain).__name__}")


def retrained(retrain: Retrain, job: Crafting, poisoned: Tensor) -> list[nn.Module]:
    """As many fresh surrogates as ``job`` has, from ``retrain`` on ``job.train`` with the
    poisons ``poisoned`` (float images in [0, 1]) in place of the bases, in eval mode on the
    job's device.

    Raises:
        EpicError: The callback returned something other than a module.
    """
    current = to_poison_set(job.train, job.indices, poisoned, job.target, job.threat, {})
    split = PoisonedDataset(job.train, current).to_tensors()
    fresh = []
    for _ in range(len(job.models)):
        model = retrain(split)
        if not isinstance(model, nn.Module):
            raise EpicError(f"the retrain callback must return an nn.Module, got "
                            f"{type(model).__name__}")
        fresh.append(model)
    return as_ensemble(fresh, job.device)
