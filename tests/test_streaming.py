"""Streamed splits: image files read on demand by DataLoader workers, trained and predicted
exactly as the same images held in memory."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_same_weights, small_model, straight_and_resumed
from epic import EpicError
from epic._callback import Callback
from epic.cli.main import main as cli_main
from epic.data import (
    ImageTensors,
    PoisonedDataset,
    PoisonSet,
    StreamingImages,
    load_split,
    splice_poisons,
)
from epic.defenses import EpicDefense
from epic.defenses.epic_plus import _stem_pass
from epic.evaluation import RunConfig, prepare_data
from epic.training import TrainConfig, Trainer

FAST = dict(batch_size=8, lr=0.05, progress=False, device="cpu", eval_batch_size=16,
            milestones=(0.5,), augment="crop-flip")
CLASSES = ["cat", "dog", "fox"]


def _fake_folder(root: Path, *, per_class: int = 8, size: int = 16) -> Path:
    """``root/train/<class>/*.png`` (``per_class`` each) and ``root/test/<class>/*.png`` (2)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for k, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                arr[..., k] = arr[..., k] // 2 + 128  # a learnable colour cue
                Image.fromarray(arr).save(folder / f"{i}.png")
    return root


def _fake_tiny(root: Path) -> Path:
    """The standard tiny-imagenet-200 layout: 3 wnids, 8 train and 2 val JPEGs each."""
    folder = root / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(1)
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(8):
            arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(images / f"{wnid}_{i}.JPEG")
    val = folder / "val" / "images"
    val.mkdir(parents=True)
    lines = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            val / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % 3]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _fake_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def splits(tree):
    """(streamed train, streamed test, the same train in memory, the same test in memory)."""
    train = load_split("imagefolder", tree, train=True, stream=True)
    test = load_split("imagefolder", tree, train=False, stream=True)
    return (train, test, load_split("imagefolder", tree, train=True),
            load_split("imagefolder", tree, train=False))


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """Three classes of 3-channel images, narrower still (channels 4 and 8, hidden 16)."""
    return small_model(seed, num_classes=3, in_channels=3, channels=(4, 8), hidden=16,
                       mean=None, std=None)


# --------------------------------------------------------------------------- datasets

def test_tinyimagenet_stream_matches_the_in_memory_loader(tmp_path):
    folder = _fake_tiny(tmp_path)
    for train in (True, False):
        streamed = load_split("tinyimagenet", tmp_path, train=train, stream=True)
        memory = load_split("tinyimagenet", folder, train=train)
        assert isinstance(streamed, StreamingImages)
        assert streamed.classes == memory.classes == ["n01", "n02", "n03"]
        assert streamed.num_classes == 3 and streamed.image_shape == (3, 64, 64)
        assert torch.equal(streamed.labels, memory.labels)
        assert len(streamed) == (24 if train else 6)
        image, label, index = streamed[5]
        assert image.dtype == torch.uint8 and (label, index) == (int(memory.labels[5]), 5)
        assert torch.equal(image, memory.images[5])
        assert torch.equal(streamed.to_tensors().images, memory.images)
    small = load_split("tinyimagenet", tmp_path, train=False, stream=True, image_size=32)
    assert small.image_shape == (3, 32, 32) and small[0][0].shape == (3, 32, 32)


def test_imagefolder_stream_resizes_and_center_crops(tree, tmp_path, splits):
    train, test, memory, _ = splits
    assert train.classes == CLASSES and train.image_shape == (3, 16, 16)
    assert torch.equal(train.labels, memory.labels) and torch.equal(train.read(), memory.images)
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # differently sized images: each covers the first's size, then is center-cropped
    root = tmp_path / "sizes"
    for i, (w, h) in enumerate([(12, 8), (30, 10), (6, 6)]):
        (root / "train" / f"c{i}").mkdir(parents=True)
        Image.new("RGB", (w, h), (i * 100, 0, 0)).save(root / "train" / f"c{i}" / "0.png")
    mixed = load_split("imagefolder", root, train=True, stream=True)
    assert mixed.image_shape == (3, 8, 12)
    assert [tuple(mixed[i][0].shape) for i in range(3)] == [(3, 8, 12)] * 3
    assert int(mixed[1][0][0].float().mean().round()) == 100
    square = load_split("imagefolder", root, train=True, image_size=5)  # into memory, resized
    assert isinstance(square, ImageTensors) and square.images.shape == (3, 3, 5, 5)
    sub = train.subset([3, 9, 20])
    assert torch.equal(sub.read(), memory.images[[3, 9, 20]]) and sub.labels.tolist() == [0, 1, 2]


def test_stream_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(EpicError, match="wnids.txt, train/<wnid>/images"):
        load_split("tinyimagenet", tmp_path / "nowhere", train=True, stream=True)
    (tmp_path / "flat" / "cat").mkdir(parents=True)  # no train/ folder
    with pytest.raises(EpicError, match=r"Expected images in .*/train/<class>/"):
        load_split("imagefolder", tmp_path / "flat", train=True, stream=True)
    with pytest.raises(EpicError, match="'digits' is not read from image files.*imagefolder"):
        load_split("digits", None, train=True, stream=True)
    with pytest.raises(EpicError, match="image_size must be a positive int"):
        StreamingImages([("x.png", 0)], ["a"], image_size=0)
    root = _fake_folder(tmp_path / "broken", per_class=1)
    (root / "train" / "dog" / "0.png").write_bytes(b"not an image")  # found at read time
    split = load_split("imagefolder", root, train=True, stream=True)
    with pytest.raises(EpicError, match="cannot read image .*dog/0.png"):
        split[1]


# --------------------------------------------------------------------------- training

class CountWorkers(Callback):
    def __init__(self):
        self.seen = []

    def on_epoch_end(self, trainer, epoch, metrics):
        self.seen.append(len(multiprocessing.active_children()))


def test_streamed_training_equals_in_memory_training_with_and_without_workers(splits):
    train, test, memory, memory_test = splits
    cfg = TrainConfig(epochs=2, **FAST)
    reference = Trainer(tiny_model(), memory, test=memory_test, config=cfg)
    reference.fit()
    rng = torch.get_rng_state()
    for workers in (0, 2):
        cfg = TrainConfig(epochs=2, num_workers=workers, **FAST)
        count = CountWorkers()
        trainer = Trainer(tiny_model(), train, test=test, config=cfg, callbacks=[count])
        assert trainer.images is None and trainer.stream is train
        history = trainer.fit()
        assert len(history) == 2 and trainer._loaders == {}  # workers stopped after fit
        assert count.seen == [0, 0] if workers == 0 else min(count.seen) >= workers
        assert_same_weights(reference.model, trainer.model)
        assert torch.equal(torch.get_rng_state(), rng)  # the loaders draw from their own
        assert [h["test_acc"] for h in history] == [h["test_acc"] for h in reference.history]
        assert [h["train_loss"] for h in history] == \
            [h["train_loss"] for h in reference.history]


def test_streamed_predict_equals_in_memory_predict(splits):
    train, test, memory, memory_test = splits
    model = tiny_model(3)
    cfg = TrainConfig(epochs=1, **FAST)
    streamed, held = Trainer(model, train, config=cfg), Trainer(model, memory, config=cfg)
    idx = torch.tensor([20, 1, 7, 7, 13])
    for indices in (None, idx):
        a_logits, a_feats = streamed.predict(indices, features=True)
        b_logits, b_feats = held.predict(indices, features=True)
        assert a_logits.shape == (len(train) if indices is None else 5, 3)
        torch.testing.assert_close(a_logits, b_logits)
        torch.testing.assert_close(a_feats, b_feats)
    # transfer: the feature caches are computed by streaming too
    cfg = TrainConfig(epochs=1, scenario="transfer", **FAST)
    a = Trainer(tiny_model(3), train, test=test, config=cfg)
    b = Trainer(tiny_model(3), memory, test=memory_test, config=cfg)
    torch.testing.assert_close((a.cache, a.test_cache), (b.cache, b.test_cache))


def test_inputs_and_epic_plus_texture_pass_are_the_same_streamed(splits):
    """``Trainer.inputs`` gives the model-ready batches of the training images, in memory or
    streamed; epic-plus's first-layer pass over a frozen extractor runs on it, so a streamed
    split gets its texture rank too."""
    train, _, memory, _ = splits
    cfg = TrainConfig(epochs=1, scenario="transfer", **FAST)
    a, b = (Trainer(tiny_model(3), split, config=cfg) for split in (train, memory))
    idx = torch.tensor([20, 1, 7, 7, 13, 2])
    for indices in (None, idx):
        xa, xb = list(a.inputs(indices)), list(b.inputs(indices))
        assert [len(x) for x in xa] == [len(x) for x in xb]
        assert max(len(x) for x in xa) == cfg.eval_batch_size or indices is not None
        torch.testing.assert_close(torch.cat(xa), torch.cat(xb))
    x = torch.cat(list(b.inputs(idx)))
    torch.testing.assert_close(x, memory.images[idx].float() / 255)
    assert x.is_contiguous(memory_format=b.memory_format)
    stats = _stem_pass(a, idx)
    assert stats is not None and len(stats) == len(idx)
    torch.testing.assert_close(stats, _stem_pass(b, idx))


def test_each_rank_streams_its_share_as_the_in_memory_path_slices_it(splits):
    """Two ranks simulated in one process (the collectives are then the identity): a rank
    decodes only its examples of each global batch and trains as the in-memory rank does."""
    train, _, memory, _ = splits
    cfg = TrainConfig(epochs=1, **FAST)
    for rank in (0, 1):
        trainers = [Trainer(tiny_model(), split, config=cfg) for split in (train, memory)]
        for trainer in trainers:
            trainer.rank, trainer.world = rank, 2
            trainer._train_epoch(0)
        assert_same_weights(*(t.model for t in trainers))
        a, b = (t.predict(features=True) for t in trainers)
        assert len(a[0]) < len(train)  # this rank's share only (nothing to gather from)
        torch.testing.assert_close(a, b)


def test_epic_on_a_stream_and_resume_after_an_interruption(splits, tmp_path):
    train, _, memory, _ = splits
    cfg = TrainConfig(epochs=4, **FAST)

    def epic():
        return [EpicDefense(warmup=1, interval=1, until=3, subset_fraction=0.5)]

    straight, resumed = straight_and_resumed(train, cfg, epic, tmp_path, model=tiny_model)
    held = Trainer(tiny_model(), memory, config=cfg, callbacks=epic())
    held.fit()
    rounds = straight.callbacks[0].rounds
    assert len(rounds) >= 2 and int((~straight.active).sum()) > 0  # EPIC dropped examples
    assert torch.equal(straight.active, held.active)
    assert_same_weights(straight.model, held.model)
    assert resumed.epoch == 4 and torch.equal(resumed.active, straight.active)
    assert_same_weights(straight.model, resumed.model)


# --------------------------------------------------------------------------- poisons and runs

def test_poisons_are_spliced_into_a_stream(tree, splits, tmp_path):
    train, test, memory, _ = splits
    base = torch.tensor([2, 17])
    noise = torch.randint(-8, 9, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    images = (memory.images[base].int() + noise).clamp(0, 255).to(torch.uint8)
    poisons = PoisonSet(base_indices=base, images=images, labels=memory.labels[base],
                        target_image=test[0][0], target_label=0, adv_label=2, eps=8.0,
                        target_index=0)
    spliced, mask = splice_poisons(train, poisons)
    assert isinstance(spliced, StreamingImages) and spliced.replaced.tolist() == [2, 17]
    expected = PoisonedDataset(memory, poisons)
    assert torch.equal(mask, expected.is_poison) and torch.equal(spliced.read(), expected.images)
    assert torch.equal(train[2][0], memory.images[2])  # the clean split is unchanged
    assert torch.equal(spliced.subset([17, 0])[0][0], images[1])  # replacements follow
    with pytest.raises(EpicError, match="splice_poisons"):
        PoisonedDataset(train, poisons)
    bad = PoisonSet(base_indices=base, images=images ^ 255, labels=memory.labels[base],
                    target_image=test[0][0], target_label=0, adv_label=2, eps=8.0)
    with pytest.raises(EpicError, match="eps"):
        splice_poisons(train, bad)

    path = poisons.save(tmp_path / "poisons.npz")
    cfg = RunConfig(dataset="imagefolder", data_root=str(tree), stream=True, poisons=str(path),
                    train_size=10)
    data = prepare_data(cfg)
    assert isinstance(data["train"], StreamingImages) and len(data["train"]) == 10
    assert int(data["poison_mask"].sum()) == 2
    held = prepare_data(RunConfig(dataset="imagefolder", data_root=str(tree),
                                  poisons=str(path), train_size=10))
    assert torch.equal(data["train"].read(), held["train"].images)


def _cli(args: list[str]) -> int:
    try:
        return cli_main(args)
    except SystemExit as exit_:  # typer exits after a successful command
        return int(exit_.code or 0)


def test_train_command_streams(tree, tmp_path, capsys):
    out = tmp_path / "run"
    code = _cli(["train", "--dataset", "imagefolder", "--data-root", str(tree), "--stream",
                 "--num-workers", "0", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
                 "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 24 and summary["clean_test_acc"] is not None
    code = _cli(["train", "--dataset", "digits", "--stream", "--epochs", "1", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "d")])
    assert code == 2 and "not read from image files" in capsys.readouterr().err
    code = _cli(["train", "--dataset", "imagefolder", "--data-root", str(tree), "--stream",
                 "--defense", "friendly-noise", "--epochs", "1", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "f")])
    assert code == 2 and "needs every training image in memory" in capsys.readouterr().err
