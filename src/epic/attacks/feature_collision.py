r"""Feature Collision, the "Poison Frogs" attack (Shafahi et al., "Poison Frogs! Targeted
Clean-Label Poisoning Attacks on Neural Networks", NeurIPS 2018).

Each poison ``x`` starts at a base ``b`` and moves until its penultimate features collide with
the target's while it stays close to the base in pixel space:

.. math::

    \min_x \; \sum_{j=1}^{m} \lVert \phi_j(x) - \phi_j(t) \rVert^2 + \beta \lVert x - b \rVert^2

solved by forward-backward splitting: a gradient step on the feature term,
``x <- x - lr * grad``, then the proximal step of the pixel term,
``x <- (x + lr * beta * b) / (1 + lr * beta)``, then (as in the poisoning benchmark of
Schwarzschild et al.) a projection into the eps ball around the base and the ``[0, 1]`` box.
This update is the paper's; it is the exact proximal step of ``(beta / 2) * ||x - b||^2`` (the
paper writes the objective with ``beta``, its update matches ``beta / 2``), and since that term
and the box are separable per pixel, the proximal step followed by the clip is the proximal
operator of the pixel term plus the constraint: the iteration is proximal gradient descent on
``sum_j ||phi_j(x) - phi_j(t)||^2 + (beta / 2) * ||x - b||^2`` over the eps box, the objective
monitored below. The poisons collide with the same target
independently; they are optimised as one batch (the loss is a sum over poisons, so one backward
pass gives every per-poison gradient).

Step size: the feature loss is not normalised, so its gradient scales with the surrogate's
features (about 30 per pixel for epic's small convnet on digits). To make ``lr`` safe for any
scale, a step that would raise a poison's objective is rejected and that poison's step size is
halved (vectorised over the batch; the iteration count is unchanged). ``lr`` is thus the
largest step tried, and the objective never increases.

``beta`` defaults to the paper's rule ``beta = 0.25 * (D / dim_b)^2``: ``D`` is the size of the
penultimate feature vector (2048 for the paper's InceptionV3, averaged over an ensemble) and
``dim_b = C * H * W`` the image dimensionality. With the watermark opacity ``gamma > 0`` (the
paper uses 0.3 for end-to-end training) the starting point and the ``b`` of the proximal step
become ``(1 - gamma) * b + gamma * t``; the eps constraint still holds around the original base.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._validation import check_int, check_number
from ..models.features import feature_dim, forward_with_features
from .base import Attack, Crafted, Crafting, project, register_attack

__all__ = ["FeatureCollision", "collision_loss", "default_beta"]


def default_beta(feature_dim: float, image_dim: int) -> float:
    """The paper's pixel-term weight ``0.25 * (feature_dim / image_dim)^2``.

    Args:
        feature_dim: Size ``D`` of the penultimate features (2048 in the paper).
        image_dim: ``C * H * W`` of the images.

    Returns:
        ``beta``; e.g. about 0.0069 for a 512-feature ResNet on 3x32x32 CIFAR images.
    """
    return 0.25 * (feature_dim / image_dim) ** 2


def collision_loss(models: list[nn.Module], poisons: Tensor, target_feats: list[Tensor]) -> Tensor:
    """Per-poison feature-collision loss, summed over surrogates.

    Args:
        models: Surrogates (eval mode).
        poisons: ``(P, C, H, W)`` images in ``[0, 1]``.
        target_feats: Per surrogate, the target's penultimate features ``(1, D_j)``.

    Returns:
        ``(P,)``: ``sum_j ||phi_j(x_i) - phi_j(t)||^2`` for each poison ``x_i``.
    """
    total = poisons.new_zeros(poisons.shape[0])
    for model, target in zip(models, target_feats, strict=True):
        _, feats = forward_with_features(model, poisons)
        total = total + (feats - target).pow(2).sum(dim=1)
    return total


@register_attack("feature-collision")
class FeatureCollision(Attack):
    """Feature Collision (Poison Frogs): each poison's features collide with the target's.

    Args:
        steps: Number of forward-backward iterations, >= 1; default 1000.
        lr: Initial step size of the gradient (forward) step in ``[0, 1]`` pixel units, > 0;
            default 0.01. The paper's 0.01 was tuned for its own pixel and feature scale; here
            a too-large value only costs a few halvings (see the module docstring), a too-small
            one slows convergence.
        beta: Weight of the pixel term, >= 0 (the update is the proximal step of
            ``(beta / 2) * ||x - b||^2``, as in the paper); ``None`` (default) uses
            :func:`default_beta`, ``0.25 * (D / (C * H * W))^2``.
        watermark: Opacity ``gamma`` in ``[0, 1)`` of the target blended into each base before
            optimising; default 0 (the paper uses 0.3 for end-to-end training).

    Raises:
        EpicError: A hyperparameter out of range.

    Example::

        attack = create_attack("feature-collision", steps=1000, watermark=0.3)
        poisons = attack.craft(surrogate, train, target, ThreatModel(eps=16))
    """

    name = "feature-collision"

    def __init__(self, *, steps: int = 1000, lr: float = 0.01, beta: float | None = None,
                 watermark: float = 0.0) -> None:
        self.steps = check_int("steps", steps, minimum=1)
        self.lr = check_number("lr", lr, minimum=0, low_open=True)
        self.beta = None if beta is None else check_number("beta", beta, minimum=0)
        self.watermark = check_number("watermark", watermark, minimum=0, maximum=1, high_open=True)

    def _craft(self, job: Crafting) -> Crafted:
        """Run forward-backward splitting on all poisons at once.

        Deterministic given the job (its generator is not used). ``result`` has
        ``initial_loss`` and ``final_loss`` (the feature loss averaged over poisons, at the
        start and at the returned poisons), ``steps`` and the ``beta`` used.
        """
        models, base, target_x, progress = job.models, job.base, job.target_x, job.progress
        eps = job.threat.eps / 255
        beta = self.beta
        if beta is None:
            dim = sum(feature_dim(m) for m in models) / len(models)
            beta = default_beta(dim, math.prod(base.shape[1:]))
        with torch.no_grad():
            target_feats = [forward_with_features(m, target_x)[1].detach() for m in models]
            anchor = torch.lerp(base, target_x.expand_as(base), self.watermark)
            x = _project(anchor.clone(), base, eps)
        feat, objective, grad = _evaluate(models, x, target_feats, anchor, beta)
        initial = float(feat.mean())
        step_size = torch.full((len(base),), self.lr, device=base.device, dtype=base.dtype)
        every = max(1, self.steps // 100)
        bar = tqdm(range(self.steps), desc=self.name, leave=False, disable=not progress)
        for step in bar:
            lr = _per_poison(step_size)
            with torch.no_grad():
                candidate = x - lr * grad                                       # forward step
                candidate = (candidate + lr * beta * anchor) / (1 + lr * beta)  # proximal step
                candidate = _project(candidate, base, eps)
            new_feat, new_objective, new_grad = _evaluate(models, candidate, target_feats,
                                                          anchor, beta)
            with torch.no_grad():  # keep a poison's step only if its objective did not rise
                accept = new_objective <= objective
                x = torch.where(_per_poison(accept), candidate, x)
                grad = torch.where(_per_poison(accept), new_grad, grad)
                feat = torch.where(accept, new_feat, feat)
                objective = torch.where(accept, new_objective, objective)
                step_size = torch.where(accept, step_size, step_size / 2)
            if progress and step % every == 0:
                bar.set_postfix(loss=f"{float(feat.mean()):.4f}")
        bar.close()
        return Crafted(x, {"initial_loss": initial, "final_loss": float(feat.mean()),
                           "steps": self.steps, "beta": beta})


def _evaluate(models: list[nn.Module], x: Tensor, target_feats: list[Tensor], anchor: Tensor,
              beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """At ``x``: per-poison feature loss ``(P,)``, objective ``(P,)`` and feature gradient."""
    x = x.detach().requires_grad_(True)
    feat = collision_loss(models, x, target_feats)
    (grad,) = torch.autograd.grad(feat.sum(), x)
    with torch.no_grad():
        objective = feat + 0.5 * beta * (x - anchor).pow(2).flatten(1).sum(1)
    return feat.detach(), objective, grad


def _per_poison(v: Tensor) -> Tensor:
    """A ``(P,)`` tensor viewed as ``(P, 1, 1, 1)`` to broadcast over images."""
    return v.view(-1, 1, 1, 1)


def _project(x: Tensor, base: Tensor, eps: float) -> Tensor:
    """``x`` moved into the eps ball around ``base`` and the ``[0, 1]`` box."""
    return base + project(x - base, base, eps)

