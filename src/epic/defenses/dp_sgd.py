"""DP-SGD as a poisoning defense (gradient shaping): clip each example's gradient, add noise.

Hong et al. 2020, "On the Effectiveness of Mitigating Data Poisoning Attacks with Gradient
Shaping": poisons work through gradients that are larger than, and point away from, those of
clean examples; bounding every per-example gradient (clipping) and blurring their sum (Gaussian
noise) bounds what a few poisons can do to a step, even with noise far too small for a
meaningful privacy guarantee. The per-example gradients, the clipping and the noise are Opacus's
(:class:`opacus.GradSampleModule`, :class:`opacus.optimizers.DPOptimizer`); this module only
wires them into the trainer. No privacy accounting is done: this is a defense, not a DP run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._callback import TrainingParts
from .._errors import EpicError
from .._validation import check_number
from .base import DefenseCallback, register_defense

__all__ = ["DPSGD"]


def _move_optimizer(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module) -> None:
    """Point ``optimizer`` (its groups and any state) at ``new``'s parameters of the same
    names, so that the trainer's optimizer and learning-rate schedule carry over to a copy."""
    names = {id(p): name for name, p in old.named_parameters()}
    params = dict(new.named_parameters())
    try:
        swap = {id(p): params[names[id(p)]] for group in optimizer.param_groups
                for p in group["params"]}
    except KeyError as err:
        raise EpicError(f"dp-sgd: making the model compatible renamed parameter {err}; use a "
                        "model with batch norm as its only incompatible layers") from None
    for group in optimizer.param_groups:
        group["params"] = [swap[id(p)] for p in group["params"]]
    for p in list(optimizer.state):
        optimizer.state[swap[id(p)]] = optimizer.state.pop(p)


@register_defense("dp-sgd")
class DPSGD(DefenseCallback):
    """Train with per-example gradient clipping and Gaussian gradient noise (Opacus).

    Every step clips each example's gradient to L2 norm ``max_grad_norm``, sums them, adds
    Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` and divides by
    ``config.batch_size`` (Opacus's ``expected_batch_size``, so a last, smaller batch weighs a
    little less); the trainer's SGD (momentum, weight decay, learning-rate schedule) then steps
    as usual.

    What is trained: the whole model from scratch and in fine-tuning, the linear head in
    transfer (the frozen extractor is left alone). Per-example gradients need layers whose
    output for one example does not depend on the others, so the model is made compatible with
    :meth:`opacus.validators.ModuleValidator.fix` first: **batch norm is replaced by group
    norm** (Opacus's default fixer; fresh affine parameters, so a pretrained model's batch-norm
    weights and statistics are lost when fine-tuning). ``inplace`` activations are switched
    off (Opacus's backward hooks forbid modifying a hooked layer's output in place); a model
    that does so in its own ``forward`` (torchvision's ResNets, ``out += identity``) is
    rejected with an error. The fixed model is returned to the trainer (``configure_training``,
    Opacus style), so checkpoints and the final model hold group-norm weights; a resume applies
    the same fix before loading.

    The noise is drawn from a generator on the trainer's device seeded from ``config.seed``
    (not the trainer's own generator); its state is saved with the checkpoint, so a resumed
    run continues the same noise sequence.

    Args:
        noise_multiplier: noise standard deviation relative to ``max_grad_norm`` (>= 0; 0 clips
            without noise). The default, 0.01, with ``max_grad_norm=4``, is the small-noise,
            loose-clipping regime Hong et al. report as a useful robustness/accuracy trade-off
            (no privacy to speak of); their per-experiment values could not be re-checked
            here, so treat both as a starting point to tune.
        max_grad_norm: L2 bound of every per-example gradient (> 0).
    """

    name = "dp-sgd"
    needs_images = True

    def __init__(self, *, noise_multiplier: float = 0.01, max_grad_norm: float = 4.0) -> None:
        self.noise_multiplier = check_number("noise_multiplier", noise_multiplier, minimum=0)
        self.max_grad_norm = check_number("max_grad_norm", max_grad_norm, minimum=0, low_open=True)
        self.replaced: list[str] = []
        self.generator: torch.Generator | None = None
        self._pending_generator: torch.Tensor | None = None

    def configure_training(self, trainer: Any, parts: TrainingParts) -> TrainingParts:
        """Return the model (batch norm fixed for Opacus), the trained module wrapped in a
        ``GradSampleModule`` and the optimizer wrapped in a ``DPOptimizer``."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

        if isinstance(parts.optimizer, DPOptimizer):  # fit() called again: already wrapped
            return parts
        cfg = trainer.config
        if cfg.amp and cfg.amp_dtype == "float16" and trainer.device.type == "cuda":
            # scaled gradients would be clipped at the wrong norm
            raise EpicError("dp-sgd does not support amp_dtype=float16 (loss scaling); use "
                            "amp_dtype=bfloat16 or amp=False")
        model = parts.model
        if cfg.scenario != "transfer":  # scratch or fine-tune: the whole model is trained
            model.train()  # Opacus validates modules in training mode
            if not ModuleValidator.is_valid(model):
                before = dict(model.named_modules())
                fixed = ModuleValidator.fix(model)  # a copy, group norm for batch norm
                fixed.to(trainer.device)
                self.replaced = [name for name, module in fixed.named_modules()
                                 if name in before and type(module) is not type(before[name])]
                _move_optimizer(parts.optimizer, model, fixed)
                model = fixed
            for module in model.modules():
                if getattr(module, "inplace", None) is True:
                    module.inplace = False
            # Opacus's per-sample gradients assume the default layout: with channels-last
            # weights the summed gradients came out wrong (parameters stay the same objects)
            model.to(memory_format=torch.contiguous_format)
            target: nn.Module = model
        else:  # transfer: only the head is trained, on cached features
            target = parts.module.train()
        errors = ModuleValidator.validate(target, strict=False)
        if errors:
            raise EpicError(f"dp-sgd cannot compute per-example gradients of "
                            f"{type(target).__name__}: {errors[0]}; use another model")
        wrapped = GradSampleModule(target, batch_first=True, loss_reduction="mean")
        if cfg.scenario != "transfer":
            self._probe(trainer, model, wrapped)
        self.generator = torch.Generator(device=trainer.device).manual_seed(cfg.seed + 1)
        if self._pending_generator is not None:
            self.generator.set_state(self._pending_generator)
            self._pending_generator = None
        optimizer = DPOptimizer(parts.optimizer, noise_multiplier=self.noise_multiplier,
                                max_grad_norm=self.max_grad_norm,
                                expected_batch_size=cfg.batch_size,
                                loss_reduction="mean", generator=self.generator)
        trainer.log_event("dp-sgd", noise_multiplier=self.noise_multiplier,
                          max_grad_norm=self.max_grad_norm, replaced_layers=self.replaced)
        return TrainingParts(model, wrapped, optimizer)

    def release_training(self, trainer: Any, parts: TrainingParts) -> TrainingParts:
        """Unwrap: after training the module has no Opacus hooks and the optimizer is the
        plain one again (a later backward pass, e.g. by an attack, works as usual)."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        module, optimizer = parts.module, parts.optimizer
        if isinstance(module, GradSampleModule):
            module.remove_hooks()
            module = module._module
        if isinstance(optimizer, DPOptimizer):
            for p in optimizer.params:
                p.grad_sample = None
                p.summed_grad = None
            optimizer = optimizer.original_optimizer
        return TrainingParts(parts.model, module, optimizer)

    @staticmethod
    def _probe(trainer: Any, model: nn.Module, wrapped: nn.Module) -> None:
        """One forward and backward pass on two examples, so that a model which modifies a
        hooked layer's output in place fails here with a clear message, not mid-epoch."""
        x = trainer.images[:2].float().div(255.0)
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # leave the run's random state alone
            try:
                wrapped.train()
                wrapped(x).float().sum().backward()
            except RuntimeError as err:
                if "inplace" not in str(err):
                    raise
                net = getattr(model, "net", model)  # inside Normalized
                kind = f"{type(net).__module__}.{type(net).__qualname__}"
                raise EpicError(f"dp-sgd: the model ({kind}) modifies a layer's output in "
                                "place (e.g. `out += identity`), which Opacus's "
                                "per-example gradient hooks forbid; use a model without "
                                "in-place operations (convnet, resnet18, resnet20, vgg11)"
                                ) from None
            finally:
                for p in wrapped.parameters():
                    p.grad = None
                    p.grad_sample = None

    def summary(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "replaced_layers": len(self.replaced)}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" not in state:
            return
        generator_state = state["generator"].cpu()
        if self.generator is None:  # restored before on_train_start built the generator
            self._pending_generator = generator_state
        else:
            self.generator.set_state(generator_state)
