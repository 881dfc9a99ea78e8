r"""Bullseye Polytope (Aghakhani et al., "Bullseye Polytope: A Scalable Clean-Label Poisoning
Attack with Improved Transferability", EuroS&P 2021).

All poisons are optimised together so that the *centroid* of their penultimate features lands on
the target's feature vector, in every surrogate at once:

.. math::

    L(\delta) = \frac{1}{m} \sum_{j=1}^{m}
        \frac{\lVert \phi_j(x_t) - \frac{1}{k} \sum_{i=1}^{k} \phi_j(b_i + \delta_i)
        \rVert^2}{\lVert \phi_j(x_t) \rVert^2}

where :math:`\phi_j` is the input of surrogate :math:`j`'s final linear layer (see
:mod:`epic.models.features`), :math:`b_i` the base images and :math:`k` the number of poisons.
The equal coefficients :math:`1/k` are the paper's "Bullseye" variant (the target sits at the
centre of the poisons' polytope), not the learned convex coefficients of the earlier Convex
Polytope attack. The perturbations are optimised with Adam in pixel space ``[0, 1]`` and
projected into the eps ball and the ``[0, 1]`` box after every step.

``jpeg=Q`` is the adaptive attacker of compression-based defenses (the ``jpeg`` defense,
EPIC-plus's ``squeeze``): every step also scores the poisons' JPEG copy at quality ``Q``, the
real codec's output with the gradient of a differentiable model of it (BPDA, Athalye et al.
2018; :func:`~epic.data.codec.jpeg_straight_through`), so that the centroid lands on the
target with and without compression and a copy's features move less. ``jpeg=[Q1, Q2, ...]``
scores a copy at each quality: the attacker of a defender who compresses at several.

The surrogates are frozen feature extractors (eval mode, no parameter gradients), which is the
transfer-learning threat model of the paper; the same objective is used when the victim later
fine-tunes or trains end to end.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._validation import check_int, check_number, check_qualities
from ..data.codec import jpeg_straight_through
from ..models.features import forward_with_features
from .base import Attack, Crafted, Crafting, project, register_attack

__all__ = ["BullseyePolytope", "bullseye_loss"]


def bullseye_loss(models: list[nn.Module], poisons: Tensor, target_feats: list[Tensor]) -> Tensor:
    """The Bullseye objective: distance of the poisons' feature centroid to the target's.

    Args:
        models: Surrogates (eval mode).
        poisons: ``(P, C, H, W)`` poisoned images in ``[0, 1]``.
        target_feats: Per surrogate, the target's penultimate features ``(1, D_j)``.

    Returns:
        A scalar: the mean over surrogates of
        ``||phi(x_t) - mean_i phi(x_i)||^2 / ||phi(x_t)||^2``, differentiable in ``poisons``.
    """
    total = poisons.new_zeros(())
    for model, target in zip(models, target_feats, strict=True):
        _, feats = forward_with_features(model, poisons)
        centroid = feats.mean(dim=0, keepdim=True)
        total = total + (target - centroid).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
    return total / len(models)


@register_attack("bullseye-polytope")
class BullseyePolytope(Attack):
    """Bullseye Polytope: put the target's features at the centroid of the poisons' features.

    Args:
        steps: Maximum number of Adam steps (the paper runs more; 1500 is a usual budget), >= 1.
        lr: Adam learning rate on the perturbation in ``[0, 1]`` pixel units, > 0; default 0.04,
            the paper's value.
        tol: Stop early once the objective falls below ``tol`` (>= 0; 0 never stops early).
        jpeg: JPEG quality (1-100) of the copy the objective also scores (the mean of the
            two losses; twice the surrogate passes per step; needs ``kornia``), or a list of
            qualities (a copy at each, all losses averaged); 0 (default) off.

    Raises:
        EpicError: A hyperparameter out of range.

    Example::

        attack = create_attack("bullseye-polytope", steps=1500)
        poisons = attack.craft(surrogate, train, target, ThreatModel(eps=16))
    """

    name = "bullseye-polytope"

    def __init__(self, *, steps: int = 1500, lr: float = 0.04, tol: float = 0.0,
                 jpeg: int | list[int] = 0) -> None:
        self.steps = check_int("steps", steps, minimum=1)
        self.lr = check_number("lr", lr, minimum=0, low_open=True)
        self.tol = check_number("tol", tol, minimum=0)
        # kornia is looked for when crafting: a config naming this attack loads without it
        self._qualities = check_qualities("jpeg", jpeg)
        self.jpeg = list(self._qualities) if isinstance(jpeg, (list, tuple)) else jpeg

    def _loss(self, models: list[nn.Module], poisons: Tensor, target_feats: list[Tensor]
              ) -> Tensor:
        """The Bullseye objective; with ``jpeg``, its mean with those of the JPEG copies."""
        loss = bullseye_loss(models, poisons, target_feats)
        for quality in self._qualities:
            copy = jpeg_straight_through(poisons, quality)
            loss = loss + bullseye_loss(models, copy, target_feats)
        return loss / (1 + len(self._qualities))

    def _craft(self, job: Crafting) -> Crafted:
        """Optimise all poisons jointly; see the module docstring for the objective.

        Deterministic given the job (its generator is not used). ``result`` has
        ``initial_loss``, ``final_loss`` (the objective: with ``jpeg``, the mean with the JPEG
        copies'), ``steps``, and with ``jpeg`` ``final_plain_loss`` (the Bullseye loss alone).
        """
        models, base, target_x, progress = job.models, job.base, job.target_x, job.progress
        eps = job.threat.eps / 255
        with torch.no_grad():
            target_feats = [forward_with_features(m, target_x)[1].detach() for m in models]
        delta = torch.zeros_like(base, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=self.lr)
        every = max(1, self.steps // 100)
        initial = math.nan
        taken = 0
        bar = tqdm(range(self.steps), desc=self.name, leave=False, disable=not progress)
        for step in bar:
            loss = self._loss(models, base + delta, target_feats)
            if step == 0:
                initial = float(loss.detach())
            if self.tol > 0 and float(loss.detach()) < self.tol:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            project(delta, base, eps)
            taken += 1
            if progress and step % every == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        bar.close()
        poisons = (base + delta).detach()
        result = {"initial_loss": initial, "steps": taken}
        with torch.no_grad():
            result["final_loss"] = float(self._loss(models, poisons, target_feats))
            if self.jpeg:
                result["final_plain_loss"] = float(bullseye_loss(models, poisons, target_feats))
        return Crafted(poisons, result)

