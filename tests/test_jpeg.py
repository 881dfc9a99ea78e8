"""The JPEG baseline: every training image re-encoded once, small perturbations mostly gone."""

from __future__ import annotations

import pytest
import torch

from epic import EpicError
from epic.defenses import DefenseSpec, JpegCompression, create_defense, jpeg_compress
from epic.evaluation import RunConfig, run_training
from epic.training import TrainConfig


def smooth_images(n: int = 8, channels: int = 3, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = torch.stack([xx * 3 + yy * (2 + c) + 12 * k for k in range(n)
                        for c in range(channels)]).view(n, channels, size, size)
    return base.clamp(0, 255).to(torch.uint8)


def test_jpeg_keeps_shape_and_removes_most_of_a_small_random_perturbation():
    clean = smooth_images()
    noise = torch.randint(-8, 9, clean.shape, generator=torch.Generator().manual_seed(0))
    poisoned = (clean.int() + noise).clamp(0, 255).to(torch.uint8)  # within 8/255
    out = jpeg_compress(poisoned, 50)
    assert out.shape == poisoned.shape and out.dtype == torch.uint8
    assert not torch.equal(out, poisoned)
    before = (poisoned.int() - clean.int()).abs().float().mean()
    after = (out.int() - jpeg_compress(clean, 50).int()).abs().float().mean()
    assert after < 0.5 * before  # most of the perturbation does not survive the codec
    # a higher quality changes the clean image less
    err = [(jpeg_compress(clean, q).int() - clean.int()).abs().float().mean() for q in (10, 50, 95)]
    assert err[0] > err[1] > err[2]


def test_jpeg_handles_grayscale_and_checks_quality():
    gray = smooth_images(4, channels=1, size=8)
    assert jpeg_compress(gray, 75).shape == gray.shape
    with pytest.raises(EpicError, match="quality must be <= 100"):
        JpegCompression(quality=101)
    with pytest.raises(EpicError, match="quality must be an integer"):
        create_defense("jpeg", quality="50")


def test_jpeg_defense_trains_on_the_compressed_images(tmp_path):
    cfg = RunConfig(out=str(tmp_path / "run"), defense=DefenseSpec("jpeg"),
                    train=TrainConfig(epochs=1, batch_size=64, progress=False))
    summary = run_training(cfg)
    assert summary["defense_summary"]["quality"] == 50
    assert summary["defense_summary"]["mean_abs_change"] > 0
    assert summary["clean_dropped"] == 0
