"""StreamingImages: a split read lazily from image files, for data too large to hold in memory.

Only the labels (and the file paths, as one numpy byte array) are held in memory; an image is
decoded when it is indexed, typically inside a ``torch.utils.data.DataLoader`` worker. The
trainer streams such a split in the order it would slice an in-memory one (see
:class:`~epic.training.Trainer`); ``load_split(name, root, train=..., stream=True)`` builds one
for the file-based datasets (``tinyimagenet``, ``imagefolder``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .._errors import EpicError
from ._tensors import ImageTensors, as_index_tensor

__all__ = ["StreamingImages", "read_image"]


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode one image file as RGB into a ``(3, H, W)`` uint8 tensor.

    Args:
        path: The image file (anything PIL reads).
        size: ``(H, W)`` to return. An image of another size is resized (bilinear, with
            antialiasing) so that it covers ``size`` with its aspect ratio kept, then
            center-cropped; one of that size is returned as decoded. None keeps the file's size.

    Raises:
        EpicError: The file cannot be read as an image.
    """
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise EpicError(f"cannot read image {path}: {err}; replace or delete the file") from None
    if size is not None and rgb.size != (size[1], size[0]):
        h, w = size
        scale = max(h / rgb.height, w / rgb.width)
        covering = [max(h, round(rgb.height * scale)), max(w, round(rgb.width * scale))]
        import torchvision.transforms.functional as TF  # here: `import epic` stays light

        rgb = TF.center_crop(TF.resize(rgb, covering, antialias=True), [h, w])
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


class StreamingImages(Dataset[tuple[torch.Tensor, int, int]]):
    """A labelled image split whose pixels stay in their files until indexed.

    ``split[i]`` decodes file ``i`` (PIL, RGB) and returns ``(image, label, i)``: a
    ``(3, H, W)`` uint8 tensor of the fixed :attr:`image_shape`, its int label and the index,
    so a ``DataLoader`` batch carries the indices it holds. A few images may be replaced by
    in-memory ones (:meth:`with_images`, how poisons are spliced in); they are returned
    instead of the file's.

    Args:
        samples: ``(path, label)`` pairs, in the split's order.
        classes: Class names; ``classes[k]`` names label ``k``.
        image_size: Output height = width, or ``(H, W)``; None takes the first image's size.
            Images of another size are resized to cover it and center-cropped
            (:func:`read_image`).

    Attributes:
        labels: ``(N,)`` int64 tensor, in memory.
        classes: Class names.

    Raises:
        EpicError: No samples, a label outside ``[0, len(classes))``, a bad size, or an
            unreadable first image (the others are checked when read).
    """

    def __init__(self, samples: Sequence[tuple[str | Path, int]], classes: Sequence[str], *,
                 image_size: int | tuple[int, int] | None = None) -> None:
        if not samples:
            raise EpicError("a streaming split needs at least one (path, label) sample, got none")
        paths = [os.fsencode(p) for p, _ in samples]
        labels = torch.as_tensor([int(t) for _, t in samples], dtype=torch.int64)
        size = _size(image_size) if image_size is not None else \
            tuple(read_image(os.fsdecode(paths[0])).shape[1:])
        self._init(np.array(paths, dtype=np.bytes_), labels, list(classes), size, {})

    def _init(self, paths: np.ndarray, labels: torch.Tensor, classes: list[str],
              size: tuple[int, ...], overrides: Mapping[int, torch.Tensor]) -> None:
        # Paths as one numpy byte array, not a list of str: DataLoader workers forked from
        # this process then share its pages instead of copying them as refcounts change.
        self._paths = paths
        self.labels: torch.Tensor = labels
        self.classes: list[str] = list(classes)
        self._size = (int(size[0]), int(size[1]))
        self._overrides: dict[int, torch.Tensor] = dict(overrides)
        k = len(self.classes)
        if k == 0:
            raise EpicError("classes must name at least one class, got an empty list")
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            raise EpicError(f"labels must be in [0, {k}) for {k} classes, got values from "
                            f"{int(labels.min())} to {int(labels.max())}")

    @classmethod
    def _make(cls, paths: np.ndarray, labels: torch.Tensor, classes: list[str],
              size: tuple[int, int], overrides: Mapping[int, torch.Tensor]) -> StreamingImages:
        new = cls.__new__(cls)
        new._init(paths, labels, classes, size, overrides)
        return new

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        index = int(index)
        image = self._overrides.get(index)
        if image is None:
            image = read_image(self.path(index), self._size)
        return image, int(self.labels[index]), index

    def __repr__(self) -> str:
        return (f"StreamingImages(n={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes}, replaced={len(self._overrides)})")

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image as returned (C is 3: images are decoded as RGB)."""
        return 3, *self._size

    @property
    def replaced(self) -> torch.Tensor:
        """``(M,)`` sorted indices whose image comes from memory (:meth:`with_images`)."""
        return torch.tensor(sorted(self._overrides), dtype=torch.int64)

    def path(self, index: int) -> str:
        """The file of example ``index`` (read unless the example is replaced)."""
        return os.fsdecode(self._paths[index])

    def read(self, indices: torch.Tensor | np.ndarray | Iterable[int] | None = None, *,
             threads: int = 8) -> torch.Tensor:
        """Decode the images at ``indices`` (default all) into one ``(M, 3, H, W)`` uint8 tensor.

        Reads with up to ``threads`` threads (PIL releases the GIL); meant for a few images
        (e.g. to check poisons against their base images) or a split that fits in memory.
        """
        idx = torch.arange(len(self)) if indices is None else \
            as_index_tensor("indices", indices, len(self))
        out = torch.empty((len(idx), *self.image_shape), dtype=torch.uint8)
        workers = max(1, min(threads, os.cpu_count() or 1, len(idx)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for row, (image, _, _) in enumerate(pool.map(self.__getitem__, idx.tolist())):
                out[row] = image
        return out

    def to_tensors(self) -> ImageTensors:
        """Every image decoded into memory, as :class:`ImageTensors` (replacements included)."""
        return ImageTensors(self.read(), self.labels.clone(), list(self.classes))

    def subset(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> StreamingImages:
        """A new split holding the examples at ``indices`` (replaced images follow them).

        Args:
            indices: ``(M,)`` integer indices into this split, or an ``(N,)`` boolean mask.
        """
        idx = as_index_tensor("indices", indices, len(self))
        if not len(idx):
            raise EpicError("a streaming split needs at least one example; got no indices")
        position = {int(old): new for new, old in enumerate(idx.tolist())
                    if int(old) in self._overrides}
        overrides = {new: self._overrides[old] for old, new in position.items()}
        return self._make(self._paths[idx.numpy()], self.labels[idx], self.classes, self._size,
                          overrides)

    def with_images(self, indices: torch.Tensor | Sequence[int], images: torch.Tensor,
                    labels: torch.Tensor | None = None) -> StreamingImages:
        """A new split whose examples at ``indices`` are ``images`` held in memory.

        How poisons are spliced into a streamed split (they are few); this split is unchanged.

        Args:
            indices: ``(P,)`` distinct indices into this split.
            images: ``(P, 3, H, W)`` uint8 images of this split's :attr:`image_shape`.
            labels: ``(P,)`` labels for those examples; default: keep theirs.

        Raises:
            EpicError: Shapes, dtypes or indices that do not fit.
        """
        idx = as_index_tensor("indices", indices, len(self))
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
                or tuple(images.shape) != (len(idx), *self.image_shape):
            got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                   else type(images).__name__)
            raise EpicError(f"images must be uint8 of shape {(len(idx), *self.image_shape)} "
                            f"(one per index), got {got}")
        if len(torch.unique(idx)) != len(idx):
            raise EpicError("indices must be distinct: each example can be replaced once")
        new_labels = self.labels.clone()
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
            if labels.shape != idx.shape:
                raise EpicError(f"labels must have shape {tuple(idx.shape)}, got "
                                f"{tuple(labels.shape)}")
            new_labels[idx] = labels
        overrides = dict(self._overrides)
        for i, image in zip(idx.tolist(), images.cpu(), strict=True):
            overrides[i] = image.clone()
        return self._make(self._paths, new_labels, self.classes, self._size, overrides)


def _size(value: int | tuple[int, int]) -> tuple[int, int]:
    pair: Any = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                 for v in pair):
        raise EpicError(f"image_size must be a positive int or an (H, W) pair, got {value!r}")
    return int(pair[0]), int(pair[1])
