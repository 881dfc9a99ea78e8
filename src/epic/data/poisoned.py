"""PoisonedDataset: a training split with a PoisonSet spliced in, for training and defenses."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .._errors import EpicError
from ._tensors import ImageTensors
from .poisons import PoisonSet
from .streaming import StreamingImages

__all__ = ["PoisonedDataset", "splice_poisons"]


class PoisonedDataset(Dataset[tuple[torch.Tensor, int]]):
    """A copy of a training split with the poisoned images in place of their base images.

    The poisons are validated against ``base`` first (see :meth:`PoisonSet.validate`); the
    input split is never modified.

    Args:
        base: The clean training split the poisons were crafted on.
        poisons: The poisons to splice in.
        eps: Perturbation bound out of 255 for validation; overrides ``poisons.eps``.

    Attributes:
        images: ``(N, C, H, W)`` uint8 tensor, poisons included.
        labels: ``(N,)`` int64 tensor.
        classes: Class names.
        is_poison: ``(N,)`` bool mask of the poisoned positions.
        poison_indices: ``(P,)`` int64 positions of the poisons, in the order of
            ``poisons.images``.
        poisons: The :class:`PoisonSet`.

    Raises:
        EpicError: The poisons do not fit ``base`` (one line naming the problem and the fix).
    """

    def __init__(self, base: ImageTensors, poisons: PoisonSet, *,
                 eps: float | None = None) -> None:
        if not isinstance(poisons, PoisonSet):
            raise EpicError(f"poisons must be a PoisonSet, got {type(poisons).__name__}; load "
                            f"them with PoisonSet.load(path)")
        if isinstance(base, StreamingImages):
            raise EpicError("PoisonedDataset holds every image in memory; for a streamed split "
                            "use splice_poisons(split, poisons)")
        poisons.validate(base, eps=eps)
        device = base.images.device  # the poisons live on the CPU; follow the base split
        idx = poisons.base_indices.to(device)
        images = base.images.clone()
        images[idx] = poisons.images.to(device)
        labels = base.labels.clone()
        labels[idx] = poisons.labels.to(device)
        is_poison = torch.zeros(len(base), dtype=torch.bool, device=device)
        is_poison[idx] = True
        self.images: torch.Tensor = images
        self.labels: torch.Tensor = labels
        self.classes: list[str] = list(base.classes)
        self.is_poison: torch.Tensor = is_poison
        self.poison_indices: torch.Tensor = idx.clone()
        self.poisons: PoisonSet = poisons

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(image, label)``: a float ``(C, H, W)`` image in [0, 1] and an int label."""
        return self.images[index].float().div_(255), int(self.labels[index])

    def __repr__(self) -> str:
        return (f"PoisonedDataset(n={len(self)}, num_poisons={len(self.poison_indices)}, "
                f"num_classes={len(self.classes)})")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def to_tensors(self) -> ImageTensors:
        """The poisoned split as :class:`ImageTensors` (shares this dataset's tensors)."""
        return ImageTensors(self.images, self.labels, list(self.classes))


def splice_poisons(base: ImageTensors | StreamingImages, poisons: PoisonSet, *,
                   eps: float | None = None) -> tuple[ImageTensors | StreamingImages, torch.Tensor]:
    """``base`` with the poisons in place of their base images, and the ``(N,)`` poison mask.

    An in-memory split goes through :class:`PoisonedDataset`; a :class:`StreamingImages`
    split keeps streaming its files and returns the poisons, held in memory, at their indices
    (:meth:`StreamingImages.with_images`). The poisons are validated first either way.

    Returns:
        ``(split, is_poison)``: the poisoned split (of ``base``'s kind) and a CPU bool mask.
    """
    if not isinstance(base, StreamingImages):
        spliced = PoisonedDataset(base, poisons, eps=eps)
        return spliced.to_tensors(), spliced.is_poison.cpu()
    if not isinstance(poisons, PoisonSet):
        raise EpicError(f"poisons must be a PoisonSet, got {type(poisons).__name__}; load "
                        f"them with PoisonSet.load(path)")
    poisons.validate(base, eps=eps)
    is_poison = torch.zeros(len(base), dtype=torch.bool)
    is_poison[poisons.base_indices] = True
    return base.with_images(poisons.base_indices, poisons.images, poisons.labels), is_poison
