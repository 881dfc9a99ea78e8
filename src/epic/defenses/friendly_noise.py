"""FRIENDS: friendly noise plus random noise on every training image.

Liu, Yang and Mirzasoleiman 2022, "Friendly Noise against Adversarial Noise: A Powerful Defense
against Data Poisoning Attacks". Poisons rely on small, precise perturbations in sharp regions of
the loss. FRIENDS adds to every training example (1) a *friendly* perturbation, optimised once to
be as large as possible while leaving the model's prediction unchanged, which moves examples
away from those sharp regions, and (2) fresh random noise at every step, which smooths them out.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import EpicError
from .._validation import check_choice, check_number
from .base import DefenseCallback, register_defense

__all__ = ["FriendlyNoise", "NOISES", "friendly_perturbation"]

NOISES = ("bernoulli", "uniform")


def friendly_perturbation(model: nn.Module, images: Tensor, *, eps: float = 16.0,
                          lam: float = 1.0, steps: int = 20, lr: float = 0.1,
                          batch_size: int = 512, generator: torch.Generator | None = None,
                          amp: bool = False,
                          memory_format: torch.memory_format = torch.contiguous_format,
                          ) -> tuple[Tensor, float]:
    """Per-example friendly perturbations of uint8 ``images`` for ``model`` (kept in eval mode).

    For each image x it minimises ``KL(softmax(f(x)) || softmax(f(x + delta))) -
    lam * mean((delta / eps)^2)`` over ``|delta| <= eps / 255`` (with ``x + delta`` clipped to
    [0, 1]), by ``steps`` Adam steps of size ``lr`` on ``delta / eps`` (the learning rate
    divides by 10 at half and three quarters of the steps), from uniform noise of half the
    budget. The size term is measured relative to the budget, so ``lam = 1`` trades one nat of
    KL for a perturbation that fills the budget. Gradients flow to ``delta`` only.

    Args:
        model: classifier taking images in [0, 1].
        images: uint8 (N, C, H, W) on the model's device.
        eps: budget in pixel levels (16 means 16/255).
        lam: weight of the size term.
        steps: optimisation steps per batch.
        lr: Adam step size, in units of the budget.
        batch_size: images optimised together.
        generator: seeds the initial noise (on the images' device).
        amp: bf16 autocast on CUDA.
        memory_format: memory format of the model's inputs.

    Returns:
        ``(delta, agreement)``: int8 (N, C, H, W) perturbation in pixel levels, already
        clipped so that ``images + delta`` stays in [0, 255]; and the fraction of images whose
        predicted class is the same on ``images + delta`` as on ``images``.
    """
    device = images.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    scale = eps / 255.0
    milestones = sorted({max(1, steps // 2), max(1, steps * 3 // 4)})
    delta = torch.empty(images.shape, dtype=torch.int8, device=device)
    agree = 0
    was_training = model.training
    model.eval()
    try:
        for part in torch.arange(len(images), device=device).split(batch_size):
            x = images.index_select(0, part).float().div_(255.0)
            x = x.contiguous(memory_format=memory_format)
            with torch.no_grad(), autocast:
                clean_logits = model(x).float()
            clean = F.log_softmax(clean_logits, 1)
            u = torch.rand(x.shape, generator=generator, device=device).sub_(0.5)
            u = u.contiguous(memory_format=memory_format).requires_grad_(True)
            opt = torch.optim.Adam([u], lr=lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
            for _ in range(steps):
                with autocast:
                    logits = model((x + u * scale).clamp(0.0, 1.0)).float()
                kl = (clean.exp() * (clean - F.log_softmax(logits, 1))).sum(1)
                size = u.square().flatten(1).mean(1)
                u.grad = torch.autograd.grad((kl - lam * size).sum(), [u])[0]
                opt.step()
                sched.step()
                with torch.no_grad():
                    u.clamp_(-1.0, 1.0)
            levels = (u.detach() * eps).round_().clamp_(-eps, eps).to(torch.int8)
            pixels = images.index_select(0, part).to(torch.int16)
            moved = (pixels + levels).clamp_(0, 255)
            delta[part] = (moved - pixels).to(torch.int8)
            with torch.no_grad(), autocast:
                x_new = moved.float().div_(255.0).contiguous(memory_format=memory_format)
                agree += int((model(x_new).argmax(1) == clean_logits.argmax(1)).sum())
    finally:
        model.train(was_training)
    return delta, agree / max(len(images), 1)


@register_defense("friendly-noise")
class FriendlyNoise(DefenseCallback):
    """FRIENDS: an optimised friendly perturbation per example plus fresh random noise.

    At the start of epoch ``epoch`` the current model computes, for every training example, a
    friendly perturbation (:func:`friendly_perturbation`: as large as possible within
    ``friendly_eps`` while keeping the model's output). From then on the training images *are*
    the perturbed images: ``training_images`` returns the clipped ``images + delta`` (uint8)
    to the trainer, so the random crop and flip apply to the perturbed image as in the
    authors' code, and :meth:`~epic.training.Trainer.predict` on training indices sees them
    too. On top of that, every batch gets fresh random noise through ``transform_batch``, from
    the first epoch on (the authors' code adds it in the data transform from the start):
    ``"bernoulli"`` adds
    ``+-noise_eps`` with random signs, ``"uniform"`` noise uniform in ``[-noise_eps,
    noise_eps]``; the result is clipped to [0, 1]. That noise comes after the crop and flip
    (for independent per-pixel noise only the crop's zero padding sees a difference).

    In transfer the model is frozen and trained on cached features, so per-batch image noise is
    not possible cheaply: at ``epoch`` the feature cache is recomputed once from the images with
    their friendly perturbation plus one draw of the random noise (rounded to whole pixel
    levels), and nothing happens per batch (a simplification of the paper). Note that in
    transfer at epoch 0 the head is freshly initialised, so "keeping the output" keeps a random
    projection of the features; pass ``epoch=1`` or later to use a trained head.

    Defaults: the authors' code clamps the friendly perturbation at 16/255 and weighs its size
    by 1, and the paper uses random noise of 16/255; they optimise with SGD (lr 100, momentum)
    on ``mean(delta^2)`` in raw pixel units for 30 steps by default. Here the size term is
    measured relative to the budget and optimised with Adam, hence ``friendly_lr=0.1`` (a tenth
    of the budget per step) and 20 steps; these are this implementation's choices.

    The perturbation is stored as int8 pixel levels on the device (N x C x H x W bytes, 150 MB
    for CIFAR-10) and saved with the checkpoint, so a resumed run re-applies the same one; the
    random-noise generator's state is saved too.

    Args:
        epoch: the (0-based) epoch at whose start the friendly perturbation is computed;
            ``None`` picks 0 with a pretrained model and, from scratch, an eighth of the
            epochs (at least 1), as the authors' scripts start it at epoch 5 of 40.
        friendly_eps: L-infinity budget of the friendly perturbation in pixel levels (/255).
        friendly_lambda: weight of its size against the KL divergence.
        friendly_steps: optimisation steps per batch.
        friendly_lr: Adam step size in units of the budget.
        noise: random noise, ``"bernoulli"`` or ``"uniform"``.
        noise_eps: its amplitude in pixel levels (/255); 0 adds none.
    """

    name = "friendly-noise"
    needs_images = True

    def __init__(self, *, epoch: int | None = None, friendly_eps: float = 16.0,
                 friendly_lambda: float = 1.0, friendly_steps: int = 20,
                 friendly_lr: float = 0.1, noise: str = "bernoulli",
                 noise_eps: float = 16.0) -> None:
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)
                                  or epoch < 0):
            raise EpicError(f"epoch must be an integer >= 0 or None, got {epoch!r}")
        if (isinstance(friendly_steps, bool) or not isinstance(friendly_steps, int)
                or friendly_steps < 1):
            raise EpicError(f"friendly_steps must be an integer >= 1, got {friendly_steps!r}")
        self.epoch = epoch
        self.friendly_eps = check_number("friendly_eps", friendly_eps, minimum=0, maximum=127,
                                         low_open=True)
        self.friendly_lambda = check_number("friendly_lambda", friendly_lambda, minimum=0)
        self.friendly_steps = friendly_steps
        self.friendly_lr = check_number("friendly_lr", friendly_lr, minimum=0, low_open=True)
        self.noise = check_choice("noise", noise, NOISES)
        self.noise_eps = check_number("noise_eps", noise_eps, minimum=0, maximum=255)
        self.at: int | None = epoch
        self.delta: Tensor | None = None
        self.record: dict[str, Any] = {}
        self.generator: torch.Generator | None = None
        self._pending_generator: Tensor | None = None
        self._applied: Any = None  # the trainer this defense last handed its images to

    def on_train_start(self, trainer: Any) -> None:
        cfg = trainer.config
        if self.epoch is not None:
            self.at = self.epoch
        elif cfg.pretrained:
            self.at = 0
        else:  # the authors' 5 of 40, scaled
            self.at = max(1, round(cfg.epochs / 8))
        self.generator = torch.Generator(device=trainer.device).manual_seed(cfg.seed + 3)
        if self._pending_generator is not None:
            self.generator.set_state(self._pending_generator)
            self._pending_generator = None

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if epoch == self.at and self.delta is None:
            t0 = time.perf_counter()
            generator = torch.Generator(device=trainer.device)
            generator.manual_seed(trainer.config.seed + 2)
            self.delta, agreement = friendly_perturbation(
                trainer.model, trainer.images, eps=self.friendly_eps, lam=self.friendly_lambda,
                steps=self.friendly_steps, lr=self.friendly_lr,
                batch_size=trainer.eval_batch_size, generator=generator,
                amp=trainer.config.amp, memory_format=trainer.memory_format)
            self.record = {"epoch": epoch + 1, "agreement": agreement,
                           "mean_abs_delta": float(self.delta.float().abs().mean()),
                           "seconds": time.perf_counter() - t0}
            trainer.log_event("friendly-noise", **self.record)

    def training_images(self, trainer: Any, epoch: int) -> Tensor | None:
        """The perturbed images, once per training run (also on resume), built in chunks so
        that no full-size int16 or float copy of the training set is made. In transfer they
        carry one draw of the random noise too (the trainer recomputes its features)."""
        if self.delta is None or trainer is self._applied:
            return None
        transfer = trainer.config.scenario == "transfer"
        generator = torch.Generator(device=trainer.device)  # transfer: one draw, reproducible
        generator.manual_seed(trainer.config.seed + 3)
        images = torch.empty_like(trainer.images)
        for part in torch.arange(len(images), device=trainer.device).split(
                trainer.eval_batch_size):
            pixels = trainer.images.index_select(0, part).to(torch.int16)
            pixels += self.delta.index_select(0, part.to(self.delta.device)).to(pixels)
            if transfer and self.noise_eps > 0:
                pixels += self._noise_like(pixels.float(), generator).round_().to(torch.int16)
            images[part] = pixels.clamp_(0, 255).to(torch.uint8)
        self._applied = trainer
        return images

    def _noise_like(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Random noise shaped like ``x`` with amplitude ``noise_eps``, in pixel levels."""
        if self.noise == "bernoulli":
            return torch.empty_like(x).bernoulli_(0.5, generator=generator).mul_(2).sub_(1) \
                .mul_(self.noise_eps)
        return torch.empty_like(x).uniform_(-self.noise_eps, self.noise_eps,
                                            generator=generator)

    def transform_batch(self, trainer: Any, indices: Tensor, inputs: Tensor) -> Tensor:
        if trainer.config.scenario == "transfer" or self.noise_eps == 0:
            return inputs
        if self.generator is None:  # called without on_train_start (direct use)
            self.generator = torch.Generator(device=inputs.device)
            self.generator.manual_seed(trainer.config.seed + 3)
        noise = self._noise_like(inputs, self.generator).div_(255.0)
        return (inputs + noise).clamp_(0.0, 1.0)

    def summary(self) -> dict[str, Any]:
        return {"friendly_eps": self.friendly_eps, "noise": self.noise,
                "noise_eps": self.noise_eps, **self.record}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"record": self.record}
        if self.delta is not None:
            state["delta"] = self.delta
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.record = dict(state.get("record", {}))
        self.delta = state.get("delta")
        self._applied = None
        if "generator" in state:
            generator_state = state["generator"].cpu()
            if self.generator is None:  # restored before on_train_start built the generator
                self._pending_generator = generator_state
            else:
                self.generator.set_state(generator_state)
