"""epic.data datasets and ImageTensors: real offline copies where present, fake trees otherwise."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from epic._errors import EpicError
from epic.data import (
    CIFAR10,
    CIFAR100,
    MNIST,
    DatasetInfo,
    Digits,
    ImageFolder,
    ImageTensors,
    TinyImageNet,
    dataset_info,
    list_datasets,
    load_split,
)
from epic.data._idx import read_idx

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EPIC_SHARED_DATA", REPO.parent / "shared" / "data")).absolute()
CACHE = Path(os.environ.get("EPIC_CACHE", REPO / ".cache"))
MNIST_DIR = SHARED / "mnist"
CIFAR_DIR = CACHE / "cifar10"

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"offline MNIST not found at {MNIST_DIR} (set EPIC_SHARED_DATA)")
needs_cifar = pytest.mark.skipif(
    not (CIFAR_DIR / "cifar-10-batches-py" / "test_batch").is_file(),
    reason=f"CIFAR-10 cache not found at {CIFAR_DIR} (run `make data` or set EPIC_CACHE)")

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- ImageTensors

def _tensors(n: int = 6, c: int = 3, k: int = 3) -> ImageTensors:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, 4, 5), generator=g, dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n) % k, [f"c{i}" for i in range(k)])


def test_image_tensors_basics_and_subset() -> None:
    data = _tensors()
    assert len(data) == 6 and data.num_classes == 3 and data.image_shape == (3, 4, 5)
    sub = data.subset([4, 1])
    assert torch.equal(sub.images, data.images[[4, 1]])
    assert sub.labels.tolist() == [1, 1] and sub.classes == data.classes
    mask = data.subset(data.labels == 0)
    assert len(mask) == 2
    sub.images.zero_()  # a subset is a copy
    assert data.images[4].any()
    assert "n=6" in repr(data)


@pytest.mark.parametrize("kwargs, match", [
    ({"images": torch.zeros(2, 1, 4, 4)}, "uint8"),
    ({"images": torch.zeros(2, 4, 4, dtype=torch.uint8)}, r"\(N, C, H, W\)"),
    ({"labels": torch.zeros(2, dtype=torch.int32)}, "int64"),
    ({"labels": torch.zeros(3, dtype=torch.int64)}, "one entry per image"),
    ({"labels": torch.tensor([0, 5])}, r"\[0, 2\)"),
    ({"classes": []}, "at least one class"),
    ({"classes": "ab"}, "list of class names"),
])
def test_image_tensors_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"images": torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
            "labels": torch.tensor([0, 1]), "classes": ["a", "b"], **kwargs}
    with pytest.raises(EpicError, match=match):
        ImageTensors(**args)


def test_image_tensors_subset_out_of_range() -> None:
    with pytest.raises(EpicError, match=r"indices must be in \[0, 6\)"):
        _tensors().subset([0, 6])
    with pytest.raises(EpicError, match="boolean mask"):
        _tensors().subset(torch.ones(5, dtype=torch.bool))
    with pytest.raises(EpicError, match="integer"):
        _tensors().subset([0.5])


# --------------------------------------------------------------------------- registry, info

def test_registry_and_info() -> None:
    assert {"cifar10", "cifar100", "mnist", "fashion-mnist", "digits", "tinyimagenet",
            "imagefolder"} <= set(list_datasets())
    assert list_datasets("cifar*") == ["cifar10", "cifar100"]
    info = dataset_info("cifar10")
    assert isinstance(info, DatasetInfo)
    assert (info.num_classes, info.channels, info.image_size) == (10, 3, 32)
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.augmentation == "crop-flip"
    assert dataset_info("mnist").augmentation == "crop"
    assert dataset_info("digits").augmentation == "none"
    for name in list_datasets():
        info = dataset_info(name)
        assert len(info.mean) == len(info.std) == info.channels
    with pytest.raises(EpicError, match="unknown dataset 'svhn'; choose from: .*cifar10"):
        load_split("svhn", None, train=True)


def test_root_required() -> None:
    with pytest.raises(EpicError, match="needs a data folder"):
        load_split("cifar10", None, train=True)


# --------------------------------------------------------------------------- digits

def test_digits_split_is_deterministic_and_stratified() -> None:
    train = load_split("digits", None, train=True)
    test = load_split("digits", "/ignored", train=False)
    assert train.images.shape == (1347, 1, 8, 8) and test.images.shape == (450, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert train.classes == [str(d) for d in range(10)]
    again = load_split("digits", None, train=True)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    ratio = train.labels.bincount(minlength=10).float() / test.labels.bincount(minlength=10)
    assert torch.allclose(ratio, torch.full((10,), 3.0), atol=0.2)  # 75/25 in every class
    # values are round(v * 255 / 16): every pixel is one of 17 levels
    levels = torch.unique(train.images).tolist()
    assert set(levels) <= {round(v * 255 / 16) for v in range(17)}


def test_digits_dataset_items_are_pil() -> None:
    ds = Digits(None, train=False, transform=np.asarray)
    img, label = ds[0]
    assert img.shape == (8, 8) and img.dtype == np.uint8 and label == ds.targets[0]
    assert len(ds) == 450


# --------------------------------------------------------------------------- MNIST / IDX

def _write_idx(path: Path, arr: np.ndarray, *, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    raw = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)


@needs_mnist
def test_mnist_from_shared_gz() -> None:
    train = load_split("mnist", MNIST_DIR, train=True)
    test = load_split("mnist", MNIST_DIR, train=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist() == MNIST_TRAIN_COUNTS
    assert test.labels.bincount().tolist() == MNIST_TEST_COUNTS
    assert train.classes[0] == "0 - zero"


@needs_mnist
def test_mnist_finds_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).symlink_to(MNIST_DIR / name)
    ds = MNIST(tmp_path, train=False)
    assert ds.data.shape == (10000, 28, 28) and len(ds.targets) == 10000


@pytest.mark.parametrize("sub, compress", [("", False), ("raw", False), ("raw", True)])
def test_mnist_uncompressed_and_gz_in_tmp(tmp_path: Path, sub: str, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / sub / f"train-images-idx3-ubyte{suffix}", images, compress=compress)
    _write_idx(tmp_path / sub / f"train-labels-idx1-ubyte{suffix}", labels, compress=compress)
    data = load_split("mnist", tmp_path, train=True)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert data.labels.tolist() == [3, 1, 4, 1, 5]


def test_malformed_idx_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(EpicError, match="not an IDX file"):
        read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    _write_idx(truncated, np.zeros((4, 3, 3), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(EpicError, match="truncated or corrupted"):
        read_idx(truncated)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 100)[:20])
    with pytest.raises(EpicError, match="cannot read IDX file"):
        read_idx(bad_gz)
    # a malformed labels file surfaces through the dataset as well
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"garbage!")
    with pytest.raises(EpicError, match="not an IDX file"):
        load_split("mnist", tmp_path, train=False)


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((2,), np.uint8))
    with pytest.raises(EpicError, match="Expected 3 labels"):
        load_split("mnist", tmp_path, train=False)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "tinyimagenet", "imagefolder"])
def test_missing_folder_names_the_path(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(EpicError, match="Dataset not found or corrupted at") as err:
        load_split(name, missing, train=True)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- CIFAR

@needs_cifar
def test_cifar10_from_cache() -> None:
    train = load_split("cifar10", CIFAR_DIR, train=True)
    assert train.images.shape == (50000, 3, 32, 32) and train.images.is_contiguous()
    assert train.labels.bincount().tolist() == [5000] * 10
    assert train.classes[:3] == ["airplane", "automobile", "bird"]
    test = CIFAR10(CIFAR_DIR / "cifar-10-batches-py", train=False)  # the folder itself works
    assert test.data.shape == (10000, 32, 32, 3) and len(test.targets) == 10000
    tensors = test.to_tensors()
    assert torch.equal(tensors.images[7], torch.from_numpy(test.data[7]).permute(2, 0, 1))
    img, label = test[0]
    assert img.size == (32, 32) and label == test.targets[0]


def _fake_cifar(root: Path, *, hundred: bool = False, n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(1)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + [
        "test_batch"]
    k = 100 if hundred else 10
    first = None
    for name in names:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        first = data if first is None else first
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: list(range(n)), "batch_label": name}, f, protocol=2)
    meta = {"fine_label_names": [f"f{i}" for i in range(k)]} if hundred else {
        "label_names": [f"c{i}" for i in range(k)]}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    return first


def test_fake_cifar10_reads_without_md5_and_download_is_offline(tmp_path: Path) -> None:
    first = _fake_cifar(tmp_path)
    ds = CIFAR10(tmp_path, train=True, download=True)  # files present: no network
    assert ds.data.shape == (20, 32, 32, 3) and ds.classes[0] == "c0"
    assert np.array_equal(ds.data[0].transpose(2, 0, 1).reshape(-1), first[0])


def test_fake_cifar100(tmp_path: Path) -> None:
    _fake_cifar(tmp_path, hundred=True)
    data = load_split("cifar100", tmp_path, train=False)
    assert data.images.shape == (4, 3, 32, 32) and data.num_classes == 100
    assert data.labels.tolist() == [0, 1, 2, 3]
    assert isinstance(CIFAR100(tmp_path), CIFAR10)


def test_cifar_malformed_batch(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(EpicError, match=r"Dataset not found or corrupted at .*test_batch"):
        load_split("cifar10", tmp_path, train=False)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(EpicError, match="cannot unpickle"):
        load_split("cifar10", tmp_path, train=False)


def test_cifar_missing_file_is_listed(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(EpicError, match="Missing data_batch_3"):
        load_split("cifar10", tmp_path, train=True)


# --------------------------------------------------------------------------- Tiny ImageNet

def _fake_tiny(root: Path, *, val_size: int = 64) -> Path:
    folder = root / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # unsorted on purpose: classes are the sorted wnids
    (folder).mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tshark\nn99\tx\n")
    colours = {"n01": (250, 0, 0), "n02": (0, 0, 250)}
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), colours[wnid]).save(images / f"{wnid}_{i}.JPEG")
    val = folder / "val" / "images"
    val.mkdir(parents=True)
    lines = []
    for i, wnid in enumerate(["n02", "n01", "n01", "n02"]):
        size = (64, 64) if i else (val_size, val_size)
        Image.new("RGB", size, colours[wnid]).save(val / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_tinyimagenet_fake_tree(tmp_path: Path) -> None:
    folder = _fake_tiny(tmp_path)
    train = load_split("tinyimagenet", tmp_path, train=True)
    assert train.images.shape == (6, 3, 64, 64) and train.classes == ["n01", "n02"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    red = train.images[:3, 0].float().mean()
    assert red > 240 and train.images[:3, 2].float().mean() < 10
    test = TinyImageNet(folder, train=False)  # the folder itself works too
    assert test.targets == [1, 0, 0, 1] and test.class_names == ["goldfish", "shark"]


def test_tinyimagenet_rejects_wrong_size(tmp_path: Path) -> None:
    _fake_tiny(tmp_path, val_size=32)
    with pytest.raises(EpicError, match=r"val_0.JPEG is 32x32 but 64x64 is expected"):
        load_split("tinyimagenet", tmp_path, train=False)


def test_tinyimagenet_missing_annotation(tmp_path: Path) -> None:
    folder = _fake_tiny(tmp_path)
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\n")
    with pytest.raises(EpicError, match="No valid label for val_1.JPEG"):
        load_split("tinyimagenet", tmp_path, train=False)


# --------------------------------------------------------------------------- image folders

def _fake_folder(root: Path, *, test_split: str = "test") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    pixels = {}
    for split in ("train", test_split):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                arr = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
                pixels[f"{split}/{cls}/{i}"] = arr
    return pixels


@pytest.mark.parametrize("test_split", ["test", "val"])
def test_imagefolder_fake_tree(tmp_path: Path, test_split: str) -> None:
    pixels = _fake_folder(tmp_path, test_split=test_split)
    train = load_split("imagefolder", tmp_path, train=True)
    assert train.images.shape == (4, 3, 5, 7) and train.classes == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(train.images[2].permute(1, 2, 0).numpy(), pixels["train/dog/0"])
    test = load_split("imagefolder", tmp_path, train=False)
    assert np.array_equal(test.images[1].permute(1, 2, 0).numpy(), pixels[f"{test_split}/cat/1"])


def test_imagefolder_size_mismatch_names_file(tmp_path: Path) -> None:
    _fake_folder(tmp_path)
    odd = tmp_path / "train" / "dog" / "odd.png"
    Image.new("RGB", (9, 9)).save(odd)
    with pytest.raises(EpicError, match=r"odd.png is 9x9 but 7x5 is expected; .*resize"):
        load_split("imagefolder", tmp_path, train=True)


def test_imagefolder_class_mismatch_and_download(tmp_path: Path) -> None:
    _fake_folder(tmp_path)
    (tmp_path / "test" / "bird").mkdir()
    Image.new("RGB", (7, 5)).save(tmp_path / "test" / "bird" / "0.png")
    with pytest.raises(EpicError, match=r"class folders \['bird'\]"):
        load_split("imagefolder", tmp_path, train=False)
    with pytest.raises(EpicError, match="nothing to download"):
        ImageFolder(tmp_path, download=True)


def test_imagefolder_unreadable_image(tmp_path: Path) -> None:
    _fake_folder(tmp_path)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(EpicError, match="cannot read image .*broken.png"):
        load_split("imagefolder", tmp_path, train=True)


def test_every_public_name_of_the_data_package_resolves():
    """The dataset names load lazily (no torchvision at `import epic`); each must still resolve."""
    import epic.data

    missing = [name for name in epic.data.__all__ if not hasattr(epic.data, name)]
    assert missing == []
    assert set(epic.data.__all__) <= set(dir(epic.data))
