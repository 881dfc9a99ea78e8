"""PoisonSet formats and checks, the restricted unpickler, and PoisonedDataset."""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from epic._errors import EpicError
from epic.data import (
    ImageTensors,
    PoisonedDataset,
    PoisonSet,
    RestrictedUnpickler,
    load_split,
    restricted_load,
)

K = 4


def _base(n: int = 40, c: int = 3, size: int = 8) -> ImageTensors:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n) % K, [f"class{i}" for i in range(K)])


def _poisons(base: ImageTensors, indices: list[int] | None = None, *, eps: float | None = 8.0,
             **kwargs) -> PoisonSet:
    """Clean-label poisons: base images of class 1 plus noise within eps."""
    idx = torch.tensor(indices if indices is not None else [1, 5, 9, 13])
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(-8, 9, (len(idx), *base.image_shape), generator=g)
    images = (base.images[idx].to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)
    fields = dict(base_indices=idx, images=images, labels=base.labels[idx].clone(),
                  target_image=base.images[2].clone(), target_label=2, adv_label=1, eps=eps,
                  target_index=17, metadata={"attack": "test", "seed": 1, "lr": [0.1, 0.01]})
    fields.update(kwargs)
    return PoisonSet(**fields)


def _assert_same(a: PoisonSet, b: PoisonSet) -> None:
    for name in ("base_indices", "images", "labels", "target_image"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in ("target_label", "adv_label", "eps", "target_index", "metadata"):
        assert getattr(a, name) == getattr(b, name), name


# --------------------------------------------------------------------------- construction

def test_poison_set_accepts_numpy_and_normalises() -> None:
    base = _base()
    p = _poisons(base)
    q = PoisonSet(p.base_indices.numpy().astype(np.int32), p.images.numpy(),
                  p.labels.numpy(), p.target_image.numpy(), np.int64(2), 1, 8, 17,
                  {"k": (1, 2)})
    assert q.base_indices.dtype == torch.int64 and q.eps == 8.0 and q.metadata == {"k": [1, 2]}
    assert len(q) == 4 and "num_poisons=4" in repr(q)


@pytest.mark.parametrize("kwargs, match", [
    ({"images": torch.zeros(4, 3, 8, 8)}, "uint8"),
    ({"labels": torch.zeros(3, dtype=torch.int64)}, "one entry per poison"),
    ({"base_indices": torch.zeros(4)}, "integer"),
    ({"target_image": torch.zeros(3, 4, 4, dtype=torch.uint8)}, "target_image must have"),
    ({"eps": 0}, r"eps must be in \(0, 255\]"),
    ({"eps": 300.0}, r"eps must be in \(0, 255\]"),
    ({"metadata": {"f": object()}}, "JSON-serialisable"),
    ({"target_label": 1.5}, "target_label must be an integer"),
    ({"target_index": -2}, "target_index must be"),
])
def test_poison_set_constructor_checks(kwargs: dict, match: str) -> None:
    with pytest.raises(EpicError, match=match):
        _poisons(_base(), **kwargs)


# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("eps", [8.0, None])
def test_epic_format_round_trip(tmp_path: Path, eps: float | None) -> None:
    p = _poisons(_base(), eps=eps)
    written = p.save(tmp_path / "trial")
    assert written == tmp_path / "trial.npz"
    assert sorted(os.listdir(tmp_path)) == ["trial.npz"]  # no temp files left behind
    with np.load(written, allow_pickle=False) as npz:  # no pickle inside
        assert str(npz["format"]) == "epic-poisons" and int(npz["format_version"]) == 1
    _assert_same(p, PoisonSet.load(written))


@pytest.mark.parametrize("channels", [3, 1])
def test_benchmark_format_round_trip(tmp_path: Path, channels: int) -> None:
    p = _poisons(_base(c=channels))
    folder = p.save(tmp_path / "trial0", format="benchmark")
    assert sorted(os.listdir(folder)) == ["base_indices.pickle", "epic.json", "poisons.pickle",
                                          "target.pickle"]
    assert os.listdir(tmp_path) == ["trial0"]
    _assert_same(p, PoisonSet.load(folder))
    # the files are the benchmark's plain types, readable by plain pickle
    with open(folder / "poisons.pickle", "rb") as f:
        tuples = pickle.load(f)
    mode = "RGB" if channels == 3 else "L"
    assert isinstance(tuples[0][0], Image.Image) and tuples[0][0].mode == mode
    assert [label for _, label in tuples] == p.labels.tolist()
    with open(folder / "target.pickle", "rb") as f:
        assert pickle.load(f)[1] == 2


def test_benchmark_without_side_file(tmp_path: Path) -> None:
    p = _poisons(_base())
    folder = p.save(tmp_path / "trial", format="benchmark")
    (folder / "epic.json").unlink()
    q = PoisonSet.load(folder)
    assert q.eps is None and q.target_index == -1 and q.metadata == {}
    assert q.adv_label == 1  # the poisons' label
    assert torch.equal(q.images, p.images) and torch.equal(q.base_indices, p.base_indices)
    with pytest.raises(EpicError, match="give it with --eps"):
        q.validate(_base())
    q.validate(_base(), eps=8)


def test_benchmark_third_party_variants(tmp_path: Path) -> None:
    """numpy indices and labels, a target tuple with extra items, pickle protocol 2."""
    p = _poisons(_base())
    folder = tmp_path / "theirs"
    folder.mkdir()
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in p.images]
    files = {"poisons.pickle": [(im, np.int64(1)) for im in pil],
             "base_indices.pickle": p.base_indices.numpy(),
             "target.pickle": (Image.fromarray(p.target_image.permute(1, 2, 0).numpy()), 2,
                               np.zeros((3, 2, 2)), (0, 0))}
    for name, obj in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    q = PoisonSet.load(folder)
    assert torch.equal(q.images, p.images) and q.target_label == 2 and q.adv_label == 1
    assert torch.equal(q.target_image, p.target_image)


def test_benchmark_save_replaces_only_poison_folders(tmp_path: Path) -> None:
    base = _base()
    folder = _poisons(base).save(tmp_path / "trial", format="benchmark")
    smaller = _poisons(base, [3, 7])
    smaller.save(folder, format="benchmark")  # replaces the old trial
    assert len(PoisonSet.load(folder)) == 2
    assert os.listdir(tmp_path) == ["trial"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("keep me")
    with pytest.raises(EpicError, match="refusing to replace"):
        smaller.save(other, format="benchmark")
    assert (other / "readme.txt").read_text() == "keep me"
    with pytest.raises(EpicError, match="unknown value 'zip' for format"):
        smaller.save(tmp_path / "x", format="zip")


def test_benchmark_rejects_other_channel_counts(tmp_path: Path) -> None:
    p = _poisons(_base(c=2))
    with pytest.raises(EpicError, match="RGB or grayscale"):
        p.save(tmp_path / "t", format="benchmark")
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------- malformed files

def test_load_rejects_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(EpicError, match="no such file or folder; expected an epic .npz"):
        PoisonSet.load(tmp_path / "missing")
    with pytest.raises(EpicError, match="has no poisons.pickle"):
        PoisonSet.load(tmp_path)
    (tmp_path / "poisons.txt").write_text("hello")
    with pytest.raises(EpicError, match=r"unknown file type; expected"):
        PoisonSet.load(tmp_path / "poisons.txt")


def test_truncated_and_foreign_npz(tmp_path: Path) -> None:
    path = _poisons(_base()).save(tmp_path / "p.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(EpicError, match="cannot read poisons from .*truncated.npz"):
        PoisonSet.load(truncated)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(EpicError, match="cannot read poisons from .*not a poison file written"):
        PoisonSet.load(garbage)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(EpicError, match="not an epic poison file"):
        PoisonSet.load(foreign)
    inconsistent = tmp_path / "inconsistent.npz"
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["labels"] = arrays["labels"][:2]
    np.savez(inconsistent, **arrays)
    with pytest.raises(EpicError, match="malformed poisons: .*one entry per poison"):
        PoisonSet.load(inconsistent)


def test_npz_with_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, format=np.array("epic-poisons"), metadata=np.array([{"a": 1}], dtype=object))
    with pytest.raises(EpicError, match="cannot read poisons from .*pickled Python objects"):
        PoisonSet.load(path)


def test_garbage_benchmark_pickles(tmp_path: Path) -> None:
    folder = _poisons(_base()).save(tmp_path / "trial", format="benchmark")
    (folder / "poisons.pickle").write_bytes(b"\x80\x04garbage")
    with pytest.raises(EpicError, match="cannot unpickle .*poisons.pickle"):
        PoisonSet.load(folder)
    with open(folder / "poisons.pickle", "wb") as f:
        pickle.dump([(np.zeros((8, 8, 3), np.uint8), 1)], f)
    with pytest.raises(EpicError, match="poison 0 is a ndarray, expected a PIL image"):
        PoisonSet.load(folder)
    with open(folder / "poisons.pickle", "wb") as f:
        pickle.dump([(Image.new("RGBA", (8, 8)), 1)], f)
    with pytest.raises(EpicError, match="mode 'RGBA'"):
        PoisonSet.load(folder)
    with open(folder / "poisons.pickle", "wb") as f:
        pickle.dump([(Image.new("RGB", (8, 8)), 1), (Image.new("RGB", (9, 9)), 1)], f)
    with pytest.raises(EpicError, match="malformed poisons"):
        PoisonSet.load(folder)
    (folder / "epic.json").write_text('{"format": "epic-benchmark-extra", "format_version": 9}')
    with pytest.raises(EpicError, match="format version 9"):
        PoisonSet.load(folder)
    (folder / "target.pickle").unlink()
    with pytest.raises(EpicError, match="lacks target.pickle"):
        PoisonSet.load(folder)


# --------------------------------------------------------------------------- validation

def test_validate_accepts_good_poisons() -> None:
    base = _base()
    _poisons(base).validate(base)
    _poisons(base, eps=None).validate(base, eps=16)


def _shift(p: PoisonSet, **changes) -> PoisonSet:
    fields = {name: getattr(p, name) for name in (
        "base_indices", "images", "labels", "target_image", "target_label", "adv_label", "eps",
        "target_index", "metadata")}
    fields.update(changes)
    return PoisonSet(**fields)


def test_validate_failures_are_one_line_and_helpful() -> None:
    base = _base()
    p = _poisons(base)
    cases = [
        (_shift(p, base_indices=torch.tensor([1, 5, 9, 40])),
         "poison 3 has base index 40, out of range for a training set of 40 images"),
        (_shift(p, base_indices=torch.tensor([1, 5, 5, 13])),
         "base index 5 appears 2 times"),
        (_poisons(_base(size=6)), r"shape \(C, H, W\)=\(3, 6, 6\) but the dataset's images "
                                  r"are \(3, 8, 8\)"),
        (_shift(p, labels=torch.tensor([1, 1, 2, 1])),
         "poison 2 .base index 9. has label 2 but that training image has label 1; clean-label"),
        (_shift(p, labels=torch.tensor([1, 1, 7, 1])), "poison 2 has label 7, not a class"),
        (_shift(p, adv_label=9), "adv_label=9 is not a class of this dataset"),
    ]
    for poisons, match in cases:
        with pytest.raises(EpicError, match=match) as err:
            poisons.validate(base)
        assert "\n" not in str(err.value)
    with pytest.raises(EpicError, match=r"eps must be in \(0, 255\]"):
        p.validate(base, eps=0)
    with pytest.raises(EpicError, match="ImageTensors"):
        p.validate(base.images)  # type: ignore[arg-type]


def test_validate_perturbation_reports_worst_poison() -> None:
    base = _base()
    p = _poisons(base, eps=4.0)  # noise is up to 8: beyond 4 + 1
    images = p.images.clone()
    images[2] = (base.images[9].to(torch.int16) + 30).clamp(max=255).to(torch.uint8)
    worst = int((images[2].to(torch.int16) - base.images[9].to(torch.int16)).abs().max())
    bad = _shift(p, images=images, eps=8.0)
    with pytest.raises(EpicError, match=rf"poison 2 \(base index 9\) changes a pixel by "
                                        rf"{worst}/255, more than eps=8/255"):
        bad.validate(base)
    with pytest.raises(EpicError, match="more than eps=4/255"):
        p.validate(base)
    p.validate(base, eps=8)  # rounding slack: |d| <= 8 <= 4 + 1 fails, 8 + 1 passes
    exact = _shift(p, images=(base.images[p.base_indices].to(torch.int16) + 9).clamp(max=255)
                   .to(torch.uint8))
    exact.validate(base, eps=8)  # 9 = eps + 1 is allowed
    with pytest.raises(EpicError, match="changes a pixel by 9/255"):
        exact.validate(base, eps=7)


# --------------------------------------------------------------------------- unpickler

class _Evil:
    def __init__(self, marker: Path, via: str) -> None:
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.via == "eval":
            return eval, (f"open({str(self.marker)!r}, 'w').close()",)
        return subprocess.call, (["touch", str(self.marker)],)


@pytest.mark.parametrize("via", ["os.system", "eval", "subprocess"])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_restricted_unpickler_refuses_code(tmp_path: Path, via: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps([Image.new("L", (2, 2)), _Evil(marker, via)], protocol=protocol)
    path = tmp_path / "poisons.pickle"
    path.write_bytes(payload)
    with pytest.raises(EpicError, match=r"refusing to unpickle (posix|os|builtins|subprocess)"
                                        r"\.\w+ from .*poisons.pickle: only images, arrays and "
                                        r"plain containers are allowed"):
        restricted_load(path)
    assert not marker.exists()


class _Reduce:
    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_restricted_unpickler_guards_allowed_callables(tmp_path: Path) -> None:
    with pytest.raises(EpicError, match=r"refusing to unpickle bytes\(1000000000000\)"):
        restricted_load(pickle.dumps(_Reduce(bytes, 10**12), protocol=2))
    with pytest.raises(EpicError, match="only the latin-1 encoding"):
        restricted_load(pickle.dumps(_Reduce(codecs.encode, "x", "rot13"), protocol=2))
    # plugin image classes resolve to PIL.Image.Image, whose constructor opens no file
    png = tmp_path / "secret.png"
    Image.new("RGB", (3, 3)).save(png)
    with pytest.raises(EpicError, match="cannot unpickle"):
        restricted_load(pickle.dumps(_Reduce(PngImagePlugin.PngImageFile, str(png))))
    with pytest.raises(EpicError, match=r"refusing to unpickle builtins\.getattr"):
        restricted_load(pickle.dumps(_Reduce(getattr, 1, "real")))


def test_malicious_benchmark_folder_is_refused(tmp_path: Path) -> None:
    folder = _poisons(_base()).save(tmp_path / "trial", format="benchmark")
    marker = tmp_path / "pwned"
    (folder / "target.pickle").write_bytes(pickle.dumps((_Evil(marker, "os.system"), 1)))
    with pytest.raises(EpicError, match="refusing to unpickle"):
        PoisonSet.load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_restricted_unpickler_round_trips_images_and_arrays(protocol: int) -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8))
    arrays = [np.arange(7, dtype=np.int64), rng.random((2, 3)).astype(np.float32),
              np.zeros((2, 2), dtype=np.uint8), np.float64(1.5), np.int64(3)]
    obj = {"rgb": rgb, "gray": gray, "arrays": arrays, "od": collections.OrderedDict(a=1),
           "misc": (b"bytes", bytearray(b"ba"), {1, 2}, frozenset([3]), 2.5 + 1j, None, True)}
    out = restricted_load(pickle.dumps(obj, protocol=protocol))
    assert out["rgb"].mode == "RGB" and out["gray"].mode == "L"
    assert np.array_equal(np.asarray(out["rgb"]), np.asarray(rgb))
    assert np.array_equal(np.asarray(out["gray"]), np.asarray(gray))
    for a, b in zip(out["arrays"], arrays, strict=True):
        assert np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype
    assert out["od"] == collections.OrderedDict(a=1) and out["misc"][0] == b"bytes"
    assert out["misc"][2:5] == ({1, 2}, frozenset([3]), 2.5 + 1j)


def test_restricted_unpickler_reads_numpy1_spelling() -> None:
    """numpy < 2 pickles (the official CIFAR batches) name numpy.core.multiarray."""
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    data = pickle.dumps({"data": arr, "labels": [1, 2]}, protocol=2)
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != data
    out = restricted_load(old)
    assert np.array_equal(out["data"], arr) and out["labels"] == [1, 2]


def test_restricted_unpickler_from_file_object_and_png_image(tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    Image.new("RGB", (3, 3), (1, 2, 3)).save(png)
    with Image.open(png) as im:
        im.load()
        data = pickle.dumps(im, protocol=4)  # a PngImageFile subclass
    out = RestrictedUnpickler(io.BytesIO(data), source="mem").load()
    assert isinstance(out, Image.Image) and out.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(EpicError, match="refusing to unpickle torch"):
        restricted_load(pickle.dumps(torch.nn.Identity()))
    with pytest.raises(EpicError, match="cannot open pickle file"):
        restricted_load(tmp_path / "nope.pickle")
    with pytest.raises(EpicError, match="cannot unpickle"):
        restricted_load(b"")


# --------------------------------------------------------------------------- PoisonedDataset

def test_poisoned_dataset_splices_exactly_and_leaves_base_unchanged() -> None:
    base = _base()
    before = base.images.clone(), base.labels.clone()
    p = _poisons(base, [13, 1, 9])
    data = PoisonedDataset(base, p)
    assert torch.equal(base.images, before[0]) and torch.equal(base.labels, before[1])
    assert len(data) == len(base) and data.classes == base.classes
    assert data.is_poison.nonzero().flatten().tolist() == [1, 9, 13]
    assert data.poison_indices.tolist() == [13, 1, 9] and data.poisons is p
    assert torch.equal(data.images[data.poison_indices], p.images)
    clean = ~data.is_poison
    assert torch.equal(data.images[clean], base.images[clean])
    assert torch.equal(data.labels, base.labels)
    img, label = data[13]
    assert img.dtype == torch.float32 and img.shape == (3, 8, 8) and label == 1
    assert torch.allclose(img * 255, p.images[0].float())
    tensors = data.to_tensors()
    assert isinstance(tensors, ImageTensors) and torch.equal(tensors.images, data.images)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 8, 8) and y.dtype == torch.int64


def test_poisoned_dataset_rejects_mismatched_poisons() -> None:
    base = _base()
    before = base.images.clone()
    with pytest.raises(EpicError, match="out of range"):
        PoisonedDataset(base, _poisons(_base(n=60), [1, 45]))
    with pytest.raises(EpicError, match="give it with --eps"):
        PoisonedDataset(base, _poisons(base, eps=None))
    assert len(PoisonedDataset(base, _poisons(base, eps=None), eps=8)) == 40
    assert torch.equal(base.images, before)


def test_poisoned_digits_end_to_end(tmp_path: Path) -> None:
    """Real data: poison digits, save in the benchmark format, reload, splice."""
    train = load_split("digits", None, train=True)
    test = load_split("digits", None, train=False)
    idx = (train.labels == 3).nonzero().flatten()[:5]
    delta = torch.randint(-16, 17, (5, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    images = (train.images[idx].to(torch.int16) + delta).clamp(0, 255).to(torch.uint8)
    p = PoisonSet(idx, images, train.labels[idx], test.images[0], int(test.labels[0]), 3, 16.0, 0)
    folder = p.save(tmp_path / "digits-trial", format="benchmark")
    data = PoisonedDataset(train, PoisonSet.load(folder))
    assert int(data.is_poison.sum()) == 5 and torch.equal(data.images[idx], images)
