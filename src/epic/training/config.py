"""One hyperparameter dataclass for training; defaults are the EPIC paper's recipe."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .._errors import EpicError
from .._validation import check_choice, check_int, check_number

__all__ = ["TrainConfig", "AMP_DTYPES", "AUGMENTATIONS", "SCENARIOS"]

AUGMENTATIONS = ("crop-flip", "crop", "flip", "none")
SCENARIOS = ("scratch", "transfer", "finetune")
AMP_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (SGD with Nesterov momentum and step decays by default).

    Args:
        epochs: number of epochs.
        batch_size: examples per step (128 in the paper).
        lr: initial learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty, not applied to batch-norm weights and biases.
        milestones: epochs of the learning-rate decays, as fractions of ``epochs``
            (3/8, 5/8, 7/8 is the 40-epoch schedule of the poisoning literature).
        gamma: decay factor at each milestone.
        augment: ``"crop-flip"`` (random crop with padding + horizontal flip), ``"crop"``,
            ``"flip"`` or ``"none"``; ``None`` (default) means the dataset's own
            (``dataset_info(name).augmentation``), which :func:`~epic.evaluation.run_training`
            fills in. A :class:`~epic.training.Trainer` needs a concrete value.
        crop_padding: zero padding of the random crop.
        seed: seeds initialisation, order and augmentation.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: mixed-precision autocast on CUDA (ignored on CPU).
        amp_dtype: ``"bfloat16"`` (default: no loss scaling needed) or ``"float16"`` (for
            GPUs without bf16; the loss is scaled by a ``torch.amp.GradScaler``).
        channels_last: channels-last memory format for the model and its inputs. Faster on
            both: on CUDA with tensor cores, and on a CPU, where it trained a ConvNet and a
            ResNet-20 1.3-1.4x as fast and, with the smaller inference batch below, ran
            EPIC's proxy pass 2.3-3.1x as fast (docs/benchmarks.md).
        eval_batch_size: batch size for evaluation and gradient proxies; ``None``: 512 on
            CUDA, 128 on a CPU (where larger batches fall out of the cache and run slower).
        progress: show progress bars.
        eval_every: evaluate the test split every this many epochs (0: only after the last).
        scenario: ``"scratch"`` trains every weight; ``"transfer"`` freezes the feature
            extractor (eval mode) and trains a freshly initialised final linear layer on
            cached penultimate features (no augmentation: the features are computed once);
            ``"finetune"`` trains every weight of a pretrained model.
        num_workers: ``DataLoader`` worker processes that decode a streamed split
            (:class:`~epic.data.StreamingImages`); 0 decodes in the training process. Ignored
            for splits held in memory.
        pin_memory: page-locked host buffers for streamed batches on CUDA, so that their copy
            to the GPU is asynchronous (ignored on CPU and for splits held in memory).
    """

    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = field(default=(3 / 8, 5 / 8, 7 / 8))
    gamma: float = 0.1
    augment: str | None = None
    crop_padding: int = 4
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    amp_dtype: str = "bfloat16"
    channels_last: bool = True
    eval_batch_size: int | None = None
    progress: bool = True
    scenario: str = "scratch"
    eval_every: int = 1
    num_workers: int = 0
    pin_memory: bool = True

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        if self.eval_batch_size is not None:
            check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        check_int("crop_padding", self.crop_padding, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_int("eval_every", self.eval_every, minimum=0)
        check_int("num_workers", self.num_workers, minimum=0)
        if self.augment is not None:
            check_choice("augment", self.augment, AUGMENTATIONS)
        check_choice("scenario", self.scenario, SCENARIOS)
        check_choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        check_number("lr", self.lr, minimum=0, low_open=True)
        check_number("weight_decay", self.weight_decay, minimum=0)
        check_number("momentum", self.momentum, minimum=0, maximum=1, high_open=True)
        check_number("gamma", self.gamma, minimum=0, low_open=True)
        for flag in ("nesterov", "amp", "channels_last", "progress", "pin_memory"):
            if not isinstance(getattr(self, flag), bool):
                raise EpicError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if isinstance(self.milestones, (str, bytes)) or not all(
                isinstance(m, (int, float)) and not isinstance(m, bool)
                for m in self.milestones):
            raise EpicError(f"milestones must be a list of numbers, got {self.milestones!r}")
        if any(not 0 < m < 1 for m in self.milestones):
            raise EpicError(f"milestones are fractions of the epochs in (0, 1), got "
                            f"{list(self.milestones)}")
        object.__setattr__(self, "milestones", tuple(sorted(self.milestones)))

    @property
    def pretrained(self) -> bool:
        """Training starts from a pretrained model (transfer or fine-tuning): the run needs a
        checkpoint, and defenses can trust its features from the first epoch."""
        return self.scenario != "scratch"

    def milestone_epochs(self) -> list[int]:
        """Epochs at whose start the learning rate decays (distinct, within the run)."""
        return sorted({min(self.epochs - 1, max(1, round(m * self.epochs)))
                       for m in self.milestones}) if self.epochs > 1 else []

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping such as a YAML section or parsed CLI flags.

        ``None`` values are dropped, so unset options keep the defaults; an unknown key is an
        :class:`~epic.EpicError` listing the valid ones.
        """
        if not isinstance(options, Mapping):
            raise EpicError(f"training options must be a mapping of option names to values, "
                            f"got {type(options).__name__}")
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(str(k) for k in options if k not in known)
        if unknown:
            raise EpicError(f"unknown training option(s) {unknown}; valid options are {known}")
        return cls(**{k: v for k, v in options.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``milestones`` a list), for YAML and JSON; :meth:`from_dict` reads it."""
        data = asdict(self)
        data["milestones"] = list(self.milestones)
        return data
