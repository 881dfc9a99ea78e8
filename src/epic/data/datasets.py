"""Image datasets held in memory, torchvision style, and the dataset registry.

Every class takes ``(root, train=True, transform=None, target_transform=None, download=False)``
and exposes ``data`` (uint8 ``(N, H, W)`` or ``(N, H, W, C)``), ``targets`` (list of ints) and
``classes``, like torchvision. ``to_tensors()`` returns the split as :class:`ImageTensors`, the
form the trainer consumes; :func:`load_split` does both steps by registered name. The
file-based datasets (``tinyimagenet``, ``imagefolder``) also have ``streaming(root, train)``,
which returns a :class:`~epic.data.streaming.StreamingImages` that reads the same files lazily
(``load_split(..., stream=True)``).

Local copies are read without checking the official md5 sums (re-encoded copies differ); only
the files' presence and format are checked. ``download=True`` uses torchvision's download code,
which verifies the official archives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image
from torchvision.datasets.utils import download_and_extract_archive

from .._errors import EpicError
from .._registry import Registry
from ._idx import read_idx
from ._tensors import ImageTensors
from ._unpickle import restricted_load
from .streaming import StreamingImages

__all__ = [
    "AUGMENTATIONS",
    "CIFAR10",
    "CIFAR100",
    "MNIST",
    "DatasetInfo",
    "Digits",
    "FashionMNIST",
    "ImageFolder",
    "TinyImageNet",
    "dataset_info",
    "list_datasets",
    "load_split",
    "register_dataset",
]

AUGMENTATIONS = ("crop-flip", "crop", "none")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: what a model and its input pipeline need to know.

    Args:
        name: Registered name, e.g. ``"cifar10"``.
        num_classes: Number of classes; None when it depends on the files (``imagefolder``).
        channels: Image channels C (1 grayscale, 3 RGB).
        image_size: Height = width in pixels; None when it depends on the files.
        mean: Per-channel mean of pixel values scaled to [0, 1], for normalisation.
        std: Per-channel standard deviation, same scale.
        augmentation: Default training augmentation, one of ``{'crop-flip', 'crop', 'none'}``.
    """

    name: str
    num_classes: int | None
    channels: int
    image_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: str

    def __post_init__(self) -> None:
        if self.augmentation not in AUGMENTATIONS:
            raise EpicError(f"unknown value {self.augmentation!r} for augmentation; valid values "
                            f"are {list(AUGMENTATIONS)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise EpicError(f"mean and std need one value per channel ({self.channels}), got "
                            f"{len(self.mean)} and {len(self.std)}")


_DATASETS: Registry[Any] = Registry("dataset")
D = TypeVar("D", bound=type)


def register_dataset(name: str | None = None) -> Callable[[D], D]:
    """Class decorator that registers a dataset under ``name`` (default: ``cls.info.name``).

    The class must have a :class:`DatasetInfo` ``info`` attribute, accept
    ``(root, train=..., download=...)`` and provide ``to_tensors() -> ImageTensors``.
    """

    def wrap(cls: D) -> D:
        info = getattr(cls, "info", None)
        if not isinstance(info, DatasetInfo):
            raise TypeError(f"{cls.__name__} needs a class attribute `info` of type DatasetInfo")
        _DATASETS.register(name or info.name)(cls)
        return cls

    return wrap


def load_split(name: str, root: str | Path | None, *, train: bool, download: bool = False,
               stream: bool = False,
               image_size: int | None = None) -> ImageTensors | StreamingImages:
    """Load one split of a registered dataset into memory, or open it for streaming.

    Args:
        name: Registered dataset name (see :func:`list_datasets`).
        root: Data folder; ignored by ``digits``, required by the others.
        train: True for the training split, False for the test split.
        download: Download the official archive when the files are absent.
        stream: Return a :class:`StreamingImages` that reads each image file when it is
            indexed (``tinyimagenet`` and ``imagefolder`` only) instead of loading the split.
        image_size: Resize and center-crop every image to this height = width (file-based
            datasets only; default: 64 for ``tinyimagenet``, the first image's size for
            ``imagefolder``). Without ``stream`` the resized images are loaded into memory.

    Returns:
        The split as ``(N, C, H, W)`` uint8 images with int64 labels, or with ``stream`` as a
        :class:`StreamingImages` (labels in memory, images read on demand).

    Raises:
        EpicError: Unknown name, missing root, missing or malformed files, or streaming /
            ``image_size`` asked of a dataset that is not read from image files.
    """
    cls = _DATASETS.get(name)
    if not (stream or image_size is not None):
        return cls(root, train=train, download=download).to_tensors()
    if not hasattr(cls, "streaming"):
        what = "stream=True (--stream)" if stream else "image_size (--image-size)"
        raise EpicError(f"dataset '{name}' is not read from image files, so {what} does not "
                        f"apply; choose from: {', '.join(_streamable())}")
    split = cls.streaming(root, train=train, download=download, image_size=image_size)
    return split if stream else split.to_tensors()


def _streamable() -> list[str]:
    return [n for n in _DATASETS.names() if hasattr(_DATASETS.get(n), "streaming")]


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered dataset (raises EpicError for unknown names)."""
    return _DATASETS.get(name).info


def list_datasets(pattern: str = "*") -> list[str]:
    """Sorted registered dataset names matching a shell-style ``pattern``."""
    return _DATASETS.names(pattern)


# --------------------------------------------------------------------------- shared plumbing

def _root_path(root: str | Path | None, name: str) -> Path:
    if root is None:
        raise EpicError(f"dataset '{name}' needs a data folder: --data-root DIR on the command "
                        "line; in Python, data_root=DIR (RunConfig, CraftConfig) or root=DIR "
                        "(load_split)")
    return Path(root).expanduser()


def _not_found(path: Path, fix: str) -> EpicError:
    return EpicError(f"Dataset not found or corrupted at {path}. {fix}")


def _check_labels(labels: np.ndarray, n: int, num_classes: int, source: Path) -> list[int]:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise _not_found(source, f"Expected {n} labels, got shape {labels.shape}; re-download it.")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise _not_found(source, f"Labels must be in [0, {num_classes}), got "
                                 f"{labels.min()}..{labels.max()}; re-download it.")
    return labels.astype(np.int64).tolist()


class _SplitMixin:
    """``to_tensors`` for datasets whose ``data`` is uint8 ``(N, H, W)`` or ``(N, H, W, C)``."""

    info: ClassVar[DatasetInfo]
    data: np.ndarray
    targets: list[int]
    classes: list[str]

    def to_tensors(self) -> ImageTensors:
        """This split as :class:`ImageTensors`: ``(N, C, H, W)`` uint8 images, int64 labels."""
        x = torch.from_numpy(self.data)  # strided views are fine; permute undoes HWC
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        labels = torch.as_tensor(self.targets, dtype=torch.int64)
        return ImageTensors(x.contiguous(), labels, list(self.classes))


class _ArrayDataset(_SplitMixin, tvd.VisionDataset):
    """A split held as a numpy array; items are PIL images, as in torchvision."""

    train: bool

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img: Any = Image.fromarray(self.data[index])
        target: Any = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __len__(self) -> int:
        return len(self.data)

    def extra_repr(self) -> str:
        return f"Split: {'Train' if self.train else 'Test'}"


def _read_rgb(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise EpicError(f"cannot read image {path}: {err}; replace or delete the file") from None


def _read_images(paths: Sequence[str], *, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode image files (threads; PIL releases the GIL) into one ``(N, H, W, 3)`` array.

    All images must share one size, ``size=(width, height)`` if given, else the first's.
    """
    if not paths:
        return np.zeros((0, *(size or (0, 0))[::-1], 3), np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        out: np.ndarray | None = None
        for i, (path, arr) in enumerate(zip(paths, pool.map(_read_rgb, paths), strict=True)):
            if out is None:
                want = (size[1], size[0]) if size else arr.shape[:2]
                out = np.empty((len(paths), *want, 3), np.uint8)
            if arr.shape != out.shape[1:]:
                h, w = out.shape[1:3]
                raise EpicError(
                    f"image {path} is {arr.shape[1]}x{arr.shape[0]} but {w}x{h} is expected; "
                    f"all images must have one size, resize them first (e.g. PIL Image.resize)")
            out[i] = arr
    assert out is not None  # paths is non-empty
    return out


# --------------------------------------------------------------------------- CIFAR

@register_dataset()
class CIFAR10(_SplitMixin, tvd.CIFAR10):
    """CIFAR-10 from the official python format, ``<root>/cifar-10-batches-py/``.

    ``root`` may be the folder holding ``cifar-10-batches-py`` or that folder itself. Local
    files are checked for presence and format only (not the official md5 sums), so re-encoded
    copies load; ``download=True`` fetches and verifies the official archive via torchvision.
    ``data`` is ``(N, 32, 32, 3)`` uint8 (HWC), ``targets`` a list of ints.

    Raises:
        EpicError: Files missing or malformed ("Dataset not found or corrupted at ...").
    """

    info = DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465),
                       (0.2470, 0.2435, 0.2616), "crop-flip")
    _labels_key: ClassVar[str] = "labels"

    def __init__(self, root: str | Path | None, train: bool = True,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 download: bool = False) -> None:
        base = _root_path(root, self.info.name)
        marker = self.test_list[0][0]
        self._folder = base if (base / marker).is_file() or base.name == self.base_folder \
            else base / self.base_folder
        tvd.VisionDataset.__init__(self, str(self._folder.parent), transform=transform,
                                   target_transform=target_transform)
        self.train = train
        if download:
            self.download()  # returns early when the files are present (see _check_integrity)
        files = [name for name, _ in (self.train_list if train else self.test_list)]
        missing = [n for n in [*files, self.meta["filename"]] if not (self._folder / n).is_file()]
        if missing:
            raise _not_found(self._folder, f"Missing {', '.join(missing)}: put the official "
                             "python-version files there, or pass download=True (--download on "
                             "the command line).")
        self._load_meta()
        chunks, targets = [], []
        for name in files:
            data, labels = self._read_batch(self._folder / name)
            chunks.append(data)
            targets.extend(labels)
        self.data = np.concatenate(chunks).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = targets

    def _read_batch(self, path: Path) -> tuple[np.ndarray, list[int]]:
        entry = restricted_load(path)
        if not isinstance(entry, dict) or "data" not in entry or self._labels_key not in entry:
            raise _not_found(path, f"Expected a pickled dict with 'data' and "
                                   f"'{self._labels_key}'; re-download it.")
        data = entry["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                or data.shape[1] != 3 * 32 * 32:
            raise _not_found(path, "Expected 'data' as a uint8 array of shape (N, 3072); "
                                   "re-download it.")
        labels = np.asarray(entry[self._labels_key])
        return data, _check_labels(labels, len(data), len(self.classes), path)

    def _load_meta(self) -> None:
        path = self._folder / self.meta["filename"]
        meta = restricted_load(path)
        names = meta.get(self.meta["key"]) if isinstance(meta, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _not_found(path, f"Expected a pickled dict with a '{self.meta['key']}' list; "
                                   f"re-download it.")
        self.classes = names
        self.class_to_idx = {c: i for i, c in enumerate(names)}

    def _check_integrity(self) -> bool:
        """Presence of every file; torchvision's ``download()`` skips when this is True."""
        names = [n for n, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all((self._folder / n).is_file() for n in names)


@register_dataset()
class CIFAR100(CIFAR10, tvd.CIFAR100):
    """CIFAR-100 (fine labels) from the official python format, ``<root>/cifar-100-python/``.

    Same behaviour as :class:`CIFAR10`: ``root`` may be the folder itself or its parent.
    """

    info = DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409),
                       (0.2673, 0.2564, 0.2762), "crop-flip")
    _labels_key: ClassVar[str] = "fine_labels"


# --------------------------------------------------------------------------- MNIST

@register_dataset()
class MNIST(_ArrayDataset):
    """MNIST from IDX files, gzipped or not, in ``<root>``, ``<root>/raw`` or ``<root>/MNIST/raw``.

    ``download=True`` delegates to ``torchvision.datasets.MNIST(root, download=True)`` (which
    verifies the official md5 sums) and then reads the files it wrote. ``data`` is
    ``(N, 28, 28)`` uint8, ``targets`` a list of ints.

    Raises:
        EpicError: Files missing or malformed.
    """

    info = DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), "crop")
    classes: list[str] = list(tvd.MNIST.classes)
    _torchvision_cls: ClassVar[type] = tvd.MNIST
    files: ClassVar[dict[bool, tuple[str, str]]] = {
        True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(self, root: str | Path | None, train: bool = True,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 download: bool = False) -> None:
        base = _root_path(root, self.info.name)
        super().__init__(str(base), transform=transform, target_transform=target_transform)
        self.train = train
        self.classes = list(type(self).classes)
        found = self._find(base)
        if None in found and download:
            self._torchvision_cls(str(base), train=train, download=True)
            found = self._find(base)
        if found[0] is None or found[1] is None:
            images, labels = self.files[train]
            folder = self._torchvision_cls.__name__
            raise _not_found(base, f"Put {images}[.gz] and {labels}[.gz] there (or in raw/ or "
                                   f"{folder}/raw/), or pass download=True (--download on the "
                                   "command line).")
        data = read_idx(found[0])
        if data.dtype != np.uint8 or data.ndim != 3:
            raise _not_found(found[0], f"Expected uint8 images of shape (N, H, W), got "
                                       f"{data.dtype} {data.shape}; re-download it.")
        self.data = data
        self.targets = _check_labels(read_idx(found[1]), len(data), len(self.classes), found[1])

    def _find(self, base: Path) -> list[Path | None]:
        folders = [base, base / "raw", base / self._torchvision_cls.__name__ / "raw"]
        found: list[Path | None] = []
        for stem in self.files[self.train]:
            hits = [d / n for d in folders for n in (stem, f"{stem}.gz") if (d / n).is_file()]
            found.append(hits[0] if hits else None)
        return found


@register_dataset()
class FashionMNIST(MNIST):
    """Fashion-MNIST, the same IDX layout as :class:`MNIST` (``<root>/FashionMNIST/raw``)."""

    info = DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "crop")
    classes: list[str] = list(tvd.FashionMNIST.classes)
    _torchvision_cls: ClassVar[type] = tvd.FashionMNIST


# --------------------------------------------------------------------------- digits

@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8), labels, train indices, test indices), computed once."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.25, random_state=0,
                                           stratify=labels)
    for arr in (images, labels):
        arr.setflags(write=False)
    return images, labels, np.sort(train_idx), np.sort(test_idx)


@register_dataset()
class Digits(_ArrayDataset):
    """scikit-learn's bundled 8x8 digits (1797 images), the embedded default; never downloads.

    Pixels 0..16 are scaled to uint8 with ``round(v * 255 / 16)``. The split is a stratified
    ``train_test_split(test_size=0.25, random_state=0)``: 1347 train and 450 test images, each
    kept in the original order. ``root`` and ``download`` are ignored.
    """

    info = DatasetInfo("digits", 10, 1, 8, (0.3053,), (0.3758,), "none")
    classes: list[str] = [str(d) for d in range(10)]

    def __init__(self, root: str | Path | None = None, train: bool = True,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 download: bool = False) -> None:
        super().__init__(None if root is None else str(root), transform=transform,
                         target_transform=target_transform)
        self.train = train
        self.classes = list(type(self).classes)
        images, labels, train_idx, test_idx = _digits_arrays()
        idx = train_idx if train else test_idx
        self.data = images[idx]
        self.targets = labels[idx].tolist()


# --------------------------------------------------------------------------- Tiny ImageNet

@register_dataset()
class TinyImageNet(_ArrayDataset):
    """Tiny ImageNet (200 classes, 64x64 RGB) from ``tiny-imagenet-200/``, loaded into memory.

    ``root`` may be the ``tiny-imagenet-200`` folder or its parent. Train images are read from
    ``train/<wnid>/images/*.JPEG``, test images from ``val/images`` labelled by
    ``val/val_annotations.txt`` (the official test labels are not public). Classes are the
    sorted wnids, images are sorted by path within each class (the poisoning benchmark's order).
    ``class_names`` holds the first word of each class from ``words.txt`` when present.
    """

    info = DatasetInfo("tinyimagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975),
                       (0.2770, 0.2691, 0.2821), "crop-flip")
    base_folder = "tiny-imagenet-200"
    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    filename = "tiny-imagenet-200.zip"
    md5 = "90528d7ca1a48142e341f4ef8d21d0de"

    def __init__(self, root: str | Path | None, train: bool = True,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 download: bool = False) -> None:
        paths, targets = self._find_files(root, train, transform, target_transform, download)
        self.data = _read_images(paths, size=(64, 64))
        self.targets = targets

    @classmethod
    def streaming(cls, root: str | Path | None, train: bool = True, *, download: bool = False,
                  image_size: int | None = None) -> StreamingImages:
        """The split as :class:`StreamingImages`: same files, classes and order, read lazily.

        ``image_size`` defaults to 64; images of another size are resized and center-cropped
        to it (the in-memory loader rejects them instead).
        """
        ds = cls.__new__(cls)
        paths, targets = ds._find_files(root, train, None, None, download)
        size = cls.info.image_size if image_size is None else image_size
        return StreamingImages(list(zip(paths, targets, strict=True)), ds.classes,
                               image_size=size)

    def _find_files(self, root: str | Path | None, train: bool, transform: Callable | None,
                    target_transform: Callable | None,
                    download: bool) -> tuple[list[str], list[int]]:
        """Check the layout, set the classes and return the split's image paths and labels."""
        base = _root_path(root, self.info.name)
        folder = base if (base / "wnids.txt").is_file() else base / self.base_folder
        super().__init__(str(folder.parent), transform=transform,
                         target_transform=target_transform)
        self.train = train
        if download and not (folder / "wnids.txt").is_file():
            download_and_extract_archive(self.url, str(folder.parent), filename=self.filename,
                                         md5=self.md5)
        if not (folder / "wnids.txt").is_file():
            raise _not_found(folder, "Expected wnids.txt, train/<wnid>/images/*.JPEG and "
                                     "val/images + val/val_annotations.txt from "
                                     "tiny-imagenet-200.zip; unzip it there or pass download=True "
                                     "(--download on the command line).")
        self.classes = sorted({w.strip() for w in (folder / "wnids.txt").read_text().split()})
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.class_names = self._class_names(folder / "words.txt")
        return self._train_files(folder) if train else self._val_files(folder)

    def _train_files(self, folder: Path) -> tuple[list[str], list[int]]:
        paths: list[str] = []
        targets: list[int] = []
        for label, wnid in enumerate(self.classes):
            files = sorted(str(p) for p in (folder / "train" / wnid / "images").glob("*.JPEG"))
            if not files:
                raise _not_found(folder, f"No training images in train/{wnid}/images/; "
                                         f"unzip tiny-imagenet-200.zip again.")
            paths += files
            targets += [label] * len(files)
        return paths, targets

    def _val_files(self, folder: Path) -> tuple[list[str], list[int]]:
        ann = folder / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise _not_found(folder, "Missing val/val_annotations.txt; unzip "
                                     "tiny-imagenet-200.zip again.")
        wnid_of = dict(line.split("\t")[:2] for line in ann.read_text().splitlines()
                       if line.count("\t") >= 1)
        files = sorted((folder / "val" / "images").glob("*.JPEG"))
        if not files:
            raise _not_found(folder, "No images in val/images/; unzip tiny-imagenet-200.zip again.")
        targets = []
        for f in files:
            wnid = wnid_of.get(f.name)
            if wnid not in self.class_to_idx:
                raise _not_found(ann, f"No valid label for {f.name} (got {wnid!r}); unzip "
                                      f"tiny-imagenet-200.zip again.")
            targets.append(self.class_to_idx[wnid])
        return [str(f) for f in files], targets

    def _class_names(self, words: Path) -> list[str]:
        if not words.is_file():
            return list(self.classes)
        table = dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
        return [table.get(w, w).split(",")[0].strip() for w in self.classes]


# --------------------------------------------------------------------------- image folders

@register_dataset()
class ImageFolder(_ArrayDataset):
    """Any ``root/<split>/<class>/*.png|jpg`` tree, loaded into memory as RGB.

    ``split`` is ``train``, or ``test`` (falling back to ``val``) when ``train=False``. Classes
    are the sorted class folders of ``train/`` (of the split itself when there is no
    ``train/``), found with torchvision's ImageFolder helpers. All images must share one size.

    Raises:
        EpicError: Missing folders, a test class absent from train, unreadable images, or
            images of different sizes.
    """

    info = DatasetInfo("imagefolder", None, 3, None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                       "crop-flip")

    def __init__(self, root: str | Path | None, train: bool = True,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 download: bool = False) -> None:
        samples = self._find_files(root, train, transform, target_transform, download)
        self.data = _read_images([p for p, _ in samples])
        self.targets = [t for _, t in samples]

    @classmethod
    def streaming(cls, root: str | Path | None, train: bool = True, *, download: bool = False,
                  image_size: int | None = None) -> StreamingImages:
        """The split as :class:`StreamingImages`: same files, classes and order, read lazily.

        Images may differ in size: each is resized to cover ``image_size`` (default: the
        first image's size) and center-cropped to it.
        """
        ds = cls.__new__(cls)
        samples = ds._find_files(root, train, None, None, download)
        return StreamingImages(samples, ds.classes, image_size=image_size)

    def _find_files(self, root: str | Path | None, train: bool, transform: Callable | None,
                    target_transform: Callable | None,
                    download: bool) -> list[tuple[str, int]]:
        """Check the layout, set the classes and return the split's (path, label) pairs."""
        base = _root_path(root, self.info.name)
        super().__init__(str(base), transform=transform, target_transform=target_transform)
        self.train = train
        if download:
            raise EpicError("imagefolder has nothing to download; arrange the images as "
                            "root/train/<class>/*.png and pass download=False")
        split = base / "train" if train else next(
            (base / s for s in ("test", "val") if (base / s).is_dir()), base / "test")
        if not split.is_dir():
            raise _not_found(split, f"Expected images in {base}/train/<class>/ and "
                                    f"{base}/test/<class>/ (or val/).")
        class_dir = base / "train" if (base / "train").is_dir() else split
        try:
            self.classes, self.class_to_idx = tvd.folder.find_classes(str(class_dir))
            samples = tvd.ImageFolder.make_dataset(
                str(split), self.class_to_idx, extensions=tvd.folder.IMG_EXTENSIONS,
                allow_empty=split != class_dir)
        except FileNotFoundError as err:
            raise _not_found(split, f"{str(err).splitlines()[0]}; put images in "
                                    f"<class>/ folders.") from None
        extra = sorted(d.name for d in split.iterdir()
                       if d.is_dir() and d.name not in self.class_to_idx)
        if extra:
            raise EpicError(f"{split} has class folders {extra} that {class_dir} lacks; give "
                            f"both splits the same class folders")
        if not samples:
            raise _not_found(split, "No images found; put .png or .jpg files in <class>/ folders.")
        return samples
