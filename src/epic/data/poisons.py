"""PoisonSet: one targeted clean-label poisoning trial, its two file formats, and its checks.

Formats:

* ``"epic"``: one ``.npz`` file (no pickle anywhere; read with ``allow_pickle=False``), keys
  ``format``, ``format_version``, the arrays, scalar fields, and ``metadata`` as a JSON string.
* ``"benchmark"``: the trial folder of the poisoning benchmark (Schwarzschild et al., "Just How
  Toxic is Data Poisoning?"): ``poisons.pickle`` (list of ``(PIL image, label)``),
  ``base_indices.pickle`` (list of ints) and ``target.pickle`` (``(PIL image, true label, ...)``).
  The fields the benchmark lacks (eps, target index, metadata) go in a side file ``epic.json``.
  Third-party pickles are read with :func:`~epic.data.restricted_load`.

Both are written atomically: the output is either complete or absent.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .._errors import EpicError
from .._io import atomic_write
from .._validation import check_choice
from ._tensors import ImageTensors
from ._unpickle import restricted_load
from .streaming import StreamingImages

__all__ = ["POISON_FORMATS", "PoisonSet"]

POISON_FORMATS = ("epic", "benchmark")
_NPZ_FORMAT = "epic-poisons"
_SIDE_FORMAT = "epic-benchmark-extra"
_VERSION = 1
_SIDE_FILE = "epic.json"
_BENCHMARK_FILES = ("poisons.pickle", "base_indices.pickle", "target.pickle")
_EXPECTED = ("expected an epic .npz file or a benchmark folder holding poisons.pickle, "
             "base_indices.pickle and target.pickle")


@dataclass(frozen=True, eq=False)
class PoisonSet:
    """A targeted clean-label poisoning: perturbed copies of some training images.

    Numpy arrays are accepted and converted to CPU tensors; integer arrays of any width are
    widened to int64, but images must already be uint8.

    Args:
        base_indices: ``(P,)`` int64 indices of the poisoned images in the training set.
        images: ``(P, C, H, W)`` uint8 poisoned images.
        labels: ``(P,)`` int64 poison labels (clean-label: equal to the base images' labels).
        target_image: ``(C, H, W)`` uint8 test image the attacker wants misclassified.
        target_label: True class of the target.
        adv_label: Class the attacker wants the target classified as.
        eps: L-inf bound in pixel units out of 255 (e.g. 8.0 or 16.0), or None if unknown.
        target_index: Index of the target in the test set, -1 if unknown.
        metadata: JSON-serialisable extras (attack name, seed, ...).

    Raises:
        EpicError: Wrong dtype, shape or length, eps outside (0, 255], or metadata that is not
            JSON-serialisable.
    """

    base_indices: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    target_image: torch.Tensor
    target_label: int
    adv_label: int
    eps: float | None
    target_index: int = -1
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        images = _tensor("images", self.images, integer=False, ndim=4)
        target = _tensor("target_image", self.target_image, integer=False, ndim=3)
        indices = _tensor("base_indices", self.base_indices, integer=True, ndim=1)
        labels = _tensor("labels", self.labels, integer=True, ndim=1)
        p = images.shape[0]
        if indices.shape[0] != p or labels.shape[0] != p:
            raise EpicError(f"base_indices, images and labels must have one entry per poison, "
                            f"got {indices.shape[0]}, {p} and {labels.shape[0]}")
        if tuple(target.shape) != tuple(images.shape[1:]):
            raise EpicError(f"target_image must have the poisons' shape (C, H, W)="
                            f"{tuple(images.shape[1:])}, got {tuple(target.shape)}")
        if not isinstance(self.metadata, dict):
            raise EpicError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        try:  # a JSON round trip also makes save/load reproduce metadata exactly
            metadata = json.loads(json.dumps(self.metadata, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise EpicError(f"metadata must be JSON-serialisable: {err}; store plain numbers, "
                            f"strings, lists and dicts") from None
        for name, value in (("base_indices", indices), ("images", images), ("labels", labels),
                            ("target_image", target), ("metadata", metadata),
                            ("target_label", _as_int("target_label", self.target_label)),
                            ("adv_label", _as_int("adv_label", self.adv_label)),
                            ("target_index", _as_int("target_index", self.target_index)),
                            ("eps", None if self.eps is None else _check_eps(self.eps))):
            object.__setattr__(self, name, value)
        if self.target_index < -1:
            raise EpicError(f"target_index must be >= 0, or -1 if unknown, got {self.target_index}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"PoisonSet(num_poisons={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
                f"target_label={self.target_label}, adv_label={self.adv_label}, eps={self.eps}, "
                f"target_index={self.target_index})")

    # ------------------------------------------------------------------ checks

    def validate(self, base: ImageTensors | StreamingImages, *,
                 eps: float | None = None) -> None:
        """Check that these poisons fit ``base``, the training split they were crafted on.

        Checks, in order: eps in (0, 255]; image shape equals the dataset's ``(C, H, W)``;
        base indices in range and unique; labels are classes of the dataset and equal the base
        images' labels (clean-label); ``|poison - base| <= eps + 1`` per pixel (1 of rounding
        slack, in /255 units).

        Args:
            base: The clean training split, in memory or streamed (then only the base images
                of the poisons are read).
            eps: Perturbation bound out of 255; overrides ``self.eps`` (needed when the file
                did not record one).

        Raises:
            EpicError: The first failed check, naming the offending poison and the fix.
        """
        if not isinstance(base, (ImageTensors, StreamingImages)):
            raise EpicError(f"base must be an ImageTensors training split (or StreamingImages), "
                            f"got {type(base).__name__}; load it with epic.data.load_split")
        bound = self.eps if eps is None else _check_eps(eps)
        if bound is None:
            raise EpicError("the perturbation bound of these poisons is unknown (the file "
                            "records no eps); give it with --eps (eps=... in the library), e.g. "
                            "--eps 8 for 8/255")
        n, k, shape = len(base), base.num_classes, base.image_shape
        if tuple(self.images.shape[1:]) != shape:
            raise EpicError(f"poison images have shape (C, H, W)={tuple(self.images.shape[1:])} "
                            f"but the dataset's images are {shape}; load the dataset the poisons "
                            f"were crafted on")
        idx = self.base_indices
        out = ((idx < 0) | (idx >= n)).nonzero().flatten()
        if out.numel():
            i = int(out[0])
            raise EpicError(f"poison {i} has base index {int(idx[i])}, out of range for a training "
                            f"set of {n} images; load the training split the poisons were "
                            f"crafted on")
        values, counts = torch.unique(idx, return_counts=True)
        if (counts > 1).any():
            j = int((counts > 1).nonzero()[0])
            raise EpicError(f"base index {int(values[j])} appears {int(counts[j])} times in the "
                            f"poisons; each training image can be poisoned once, remove the "
                            f"duplicates")
        for name, value in (("target_label", self.target_label), ("adv_label", self.adv_label)):
            if not 0 <= value < k:
                raise EpicError(f"{name}={value} is not a class of this dataset (0..{k - 1}); "
                                f"load the dataset the poisons were crafted on")
        bad = ((self.labels < 0) | (self.labels >= k)).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise EpicError(f"poison {i} has label {int(self.labels[i])}, not a class of this "
                            f"dataset (0..{k - 1}); load the dataset the poisons were crafted on")
        base_labels = base.labels[idx.to(base.labels.device)].cpu()
        wrong = (self.labels != base_labels).nonzero().flatten()
        if wrong.numel():
            i = int(wrong[0])
            raise EpicError(f"poison {i} (base index {int(idx[i])}) has label "
                            f"{int(self.labels[i])} but that training image has label "
                            f"{int(base_labels[i])}; clean-label poisons keep the base labels, "
                            f"check that the poisons belong to this dataset")
        if len(self):
            originals = base.read(idx) if isinstance(base, StreamingImages) \
                else base.images[idx.to(base.images.device)].cpu()
            diff = (self.images.to(torch.int16) - originals.to(torch.int16)).abs()
            per_poison = diff.flatten(1).amax(dim=1)
            i = int(per_poison.argmax())
            worst = int(per_poison[i])
            if worst > bound + 1:
                raise EpicError(f"poison {i} (base index {int(idx[i])}) changes a pixel by "
                                f"{worst}/255, more than eps={bound:g}/255 plus 1 of rounding "
                                f"slack; pass the eps the poisons were made with, or check that "
                                f"they belong to this dataset")

    # ------------------------------------------------------------------ saving

    def save(self, path: str | Path, format: str = "epic") -> Path:
        """Write the poisons atomically (the output is complete or absent, never partial).

        Args:
            path: A ``.npz`` file for ``"epic"`` (the suffix is added if missing), a folder for
                ``"benchmark"`` (an existing poison folder is replaced).
            format: One of ``{'epic', 'benchmark'}``, default ``'epic'``.

        Returns:
            The path written.

        Raises:
            EpicError: Unknown format, a path that is in the way, or images the benchmark
                format cannot hold (only RGB and grayscale).
        """
        check_choice("format", format, POISON_FORMATS)
        path = Path(path).expanduser()
        if format == "benchmark":
            return self._save_benchmark(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        if path.is_dir():
            raise EpicError(f"cannot save poisons to {path}: it is a folder; pass a .npz file name")
        arrays = {
            "format": np.array(_NPZ_FORMAT),
            "format_version": np.array(_VERSION, dtype=np.int64),
            "base_indices": self.base_indices.numpy(),
            "images": self.images.numpy(),
            "labels": self.labels.numpy(),
            "target_image": self.target_image.numpy(),
            "target_label": np.array(self.target_label, dtype=np.int64),
            "adv_label": np.array(self.adv_label, dtype=np.int64),
            "eps": np.array(math.nan if self.eps is None else self.eps, dtype=np.float64),
            "target_index": np.array(self.target_index, dtype=np.int64),
            "metadata": np.array(json.dumps(self.metadata)),
        }
        return atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)

    def _save_benchmark(self, path: Path) -> Path:
        channels = int(self.target_image.shape[0])
        if channels not in (1, 3):
            raise EpicError(f"the benchmark format stores RGB or grayscale images, these have "
                            f"{channels} channels; save with format='epic'")
        if path.exists() and not (path.is_dir() and ((path / "poisons.pickle").is_file()
                                                      or not any(path.iterdir()))):
            raise EpicError(f"refusing to replace {path}: it exists and is not a poison folder; "
                            f"choose another path")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            os.chmod(tmp, 0o755)
            poisons = [(_to_pil(img), int(label))
                       for img, label in zip(self.images, self.labels, strict=True)]
            extra = {"format": _SIDE_FORMAT, "format_version": _VERSION, "eps": self.eps,
                     "target_index": self.target_index, "adv_label": self.adv_label,
                     "metadata": self.metadata}
            files: dict[str, Any] = {
                "poisons.pickle": poisons,
                "base_indices.pickle": [int(i) for i in self.base_indices],
                "target.pickle": (_to_pil(self.target_image), self.target_label),
            }
            for name, obj in files.items():
                _write_synced(tmp / name, lambda f, obj=obj: pickle.dump(obj, f, protocol=4))
            _write_synced(tmp / _SIDE_FILE, lambda f: f.write(json.dumps(extra, indent=2)
                                                               .encode()))
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path) -> PoisonSet:
        """Read poisons saved in either format, detected from the path.

        A folder holding ``poisons.pickle`` is a benchmark trial; a ``.npz`` (or zip) file is
        the epic format. Benchmark pickles are read with the restricted unpickler.

        Raises:
            EpicError: Anything else, or a malformed file; nothing half-loaded is returned.
        """
        path = Path(path).expanduser()
        if path.is_dir():
            if not (path / "poisons.pickle").is_file():
                raise EpicError(f"cannot load poisons from {path}: the folder has no "
                                f"poisons.pickle; {_EXPECTED}")
            return cls._load_benchmark(path)
        if path.is_file():
            with open(path, "rb") as f:
                is_zip = f.read(4) == b"PK\x03\x04"
            if path.suffix == ".npz" and not is_zip:  # numpy would try it as a pickle
                empty = " (the file is empty)" if path.stat().st_size == 0 else ""
                raise EpicError(f"cannot read poisons from {path}: not a poison file written by "
                                f"`epic craft` (an .npz) or a poisoning-benchmark folder{empty}")
            if is_zip:
                return cls._load_epic(path)
            raise EpicError(f"cannot load poisons from {path}: unknown file type; {_EXPECTED}")
        raise EpicError(f"cannot load poisons from {path}: no such file or folder; {_EXPECTED}")

    @classmethod
    def _load_epic(cls, path: Path) -> PoisonSet:
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except Exception as err:  # BadZipFile, EOFError, ValueError, zlib.error, ...
            # numpy's text about allow_pickle= is advice epic does not take: say what it means
            reason = ("it holds pickled Python objects" if "allow_pickle" in str(err)
                      else _reason(err))
            raise EpicError(f"cannot read poisons from {path}: {reason}; it is truncated or not "
                            "a poison file written by `epic craft`, re-create it") from None
        if arrays.get("format") is None or str(arrays["format"]) != _NPZ_FORMAT:
            raise EpicError(f"{path} is a .npz but not an epic poison file (no format="
                            f"'{_NPZ_FORMAT}' key); {_EXPECTED}")
        raw_version = arrays.get("format_version")
        version = (int(raw_version) if raw_version is not None and raw_version.shape == ()
                   and raw_version.dtype.kind in "iu" else None)
        if version is None or version > _VERSION:
            raise EpicError(f"{path} has poison format version {raw_version}, not one this epic "
                            f"reads (<= {_VERSION}); upgrade epic or re-create the file")
        required = ("base_indices", "images", "labels", "target_image", "target_label",
                    "adv_label", "eps", "target_index", "metadata")
        missing = [k for k in required if k not in arrays]
        if missing:
            raise EpicError(f"{path} lacks the keys {missing}; re-create the poison file")
        try:
            eps = float(arrays["eps"])
            metadata = json.loads(str(arrays["metadata"]))
            return cls(base_indices=torch.from_numpy(arrays["base_indices"]),
                       images=torch.from_numpy(arrays["images"]),
                       labels=torch.from_numpy(arrays["labels"]),
                       target_image=torch.from_numpy(arrays["target_image"]),
                       target_label=int(arrays["target_label"]),
                       adv_label=int(arrays["adv_label"]),
                       eps=None if math.isnan(eps) else eps,
                       target_index=int(arrays["target_index"]),
                       metadata=metadata)
        except (EpicError, TypeError, ValueError) as err:
            raise EpicError(f"{path} holds malformed poisons: {_reason(err)}; re-create the "
                            f"poison file") from None

    @classmethod
    def _load_benchmark(cls, folder: Path) -> PoisonSet:
        missing = [n for n in _BENCHMARK_FILES if not (folder / n).is_file()]
        if missing:
            raise EpicError(f"benchmark poison folder {folder} lacks {', '.join(missing)}; "
                            f"{_EXPECTED}")
        source = folder / "poisons.pickle"
        tuples = restricted_load(source)
        if not isinstance(tuples, (list, tuple)):
            raise EpicError(f"{source} must hold a list of (image, label) tuples, got "
                            f"{type(tuples).__name__}")
        images, labels = [], []
        for i, item in enumerate(tuples):
            if not isinstance(item, (list, tuple)) or len(item) < 2:
                raise EpicError(f"{source}: item {i} is not an (image, label) tuple")
            images.append(_from_pil(item[0], f"{source}: poison {i}"))
            labels.append(_as_int(f"{source}: label of poison {i}", item[1]))
        source = folder / "target.pickle"
        target = restricted_load(source)
        if not isinstance(target, (list, tuple)) or len(target) < 2:
            raise EpicError(f"{source} must hold an (image, label, ...) tuple, got "
                            f"{type(target).__name__}")
        target_image = _from_pil(target[0], f"{source}: target")
        target_label = _as_int(f"{source}: target label", target[1])
        source = folder / "base_indices.pickle"
        raw = restricted_load(source)
        indices = np.asarray(raw) if isinstance(raw, (list, tuple, np.ndarray)) else None
        if indices is None or indices.ndim != 1 or (
                indices.size and indices.dtype.kind not in "iu"):
            raise EpicError(f"{source} must hold a list of integer indices, got "
                            f"{type(raw).__name__}")
        extra = _read_side_file(folder / _SIDE_FILE)
        adv_label = extra.get("adv_label")
        if adv_label is None:
            if not labels:
                raise EpicError(f"{folder} has no poisons and no {_SIDE_FILE}, so the adversarial "
                                f"label is unknown; add poisons or re-save with epic")
            adv_label = max(set(labels), key=labels.count)  # the benchmark: the poisons' label
        try:
            stacked = (torch.stack(images) if images
                       else torch.zeros((0, *target_image.shape), dtype=torch.uint8))
            return cls(base_indices=torch.from_numpy(indices.astype(np.int64)),
                       images=stacked, labels=torch.tensor(labels, dtype=torch.int64),
                       target_image=target_image, target_label=target_label,
                       adv_label=adv_label, eps=extra.get("eps"),
                       target_index=extra.get("target_index", -1),
                       metadata=extra.get("metadata", {}))
        except (EpicError, RuntimeError) as err:  # stack: images of different sizes
            raise EpicError(f"{folder} holds malformed poisons: {_reason(err)}; re-create the "
                            f"poison folder") from None


# --------------------------------------------------------------------------- helpers

def _tensor(name: str, value: Any, *, integer: bool, ndim: int) -> torch.Tensor:
    """A CPU tensor: uint8 for images (``integer=False``), int64 for indices and labels."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor) or value.ndim != ndim:
        got = (f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        raise EpicError(f"{name} must be a tensor with {ndim} dimensions, got {got}")
    value = value.detach().cpu()
    if integer:
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise EpicError(f"{name} must be an integer tensor, got {value.dtype}")
        return value.to(torch.int64).contiguous()
    if value.dtype != torch.uint8:
        raise EpicError(f"{name} must be uint8 pixels 0..255, got {value.dtype}; convert with "
                        f"(x * 255).round().to(torch.uint8)")
    return value.contiguous()


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise EpicError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) \
            or not 0 < float(eps) <= 255:
        raise EpicError(f"eps must be in (0, 255] pixel units (e.g. 8 for 8/255), got {eps!r}")
    return float(eps)


def _to_pil(image: torch.Tensor) -> Image.Image:
    arr = image.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def _from_pil(image: Any, what: str) -> torch.Tensor:
    if not isinstance(image, Image.Image):
        raise EpicError(f"{what} is a {type(image).__name__}, expected a PIL image")
    if image.mode not in ("RGB", "L"):
        raise EpicError(f"{what} has image mode {image.mode!r}, expected 'RGB' or 'L'; "
                        f"convert the poisons first")
    arr = np.array(image, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(np.ascontiguousarray(arr[None] if arr.ndim == 2
                                                  else arr.transpose(2, 0, 1)))


def _read_side_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        extra = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise EpicError(f"cannot read {path}: {_reason(err)}; fix or delete it") from None
    if not isinstance(extra, dict) or extra.get("format") != _SIDE_FORMAT:
        raise EpicError(f"{path} is not an epic side file (format '{_SIDE_FORMAT}'); delete it")
    version = extra.get("format_version", 0)
    if not isinstance(version, int) or version > _VERSION:
        raise EpicError(f"{path} has format version {version!r}, not one this epic reads "
                        f"(<= {_VERSION}); upgrade epic or delete the file")
    return extra


def _write_synced(path: Path, writer: Any) -> None:
    with open(path, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing an old poison folder there."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return text or type(err).__name__

