"""The JPEG baseline: every training image re-encoded once, small perturbations mostly gone."""

from __future__ import annotations

import sys

import pytest
import torch

from epic import EpicError
from epic.attacks import create_attack
from epic.data.codec import jpeg_straight_through
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


@pytest.mark.parametrize("channels", [3, 1])
def test_straight_through_jpeg_has_the_codecs_value_and_a_gradient(channels):
    """What an adaptive attack optimises through: the real codec's output, and a gradient
    that says a brighter image compresses to a brighter copy (about a quarter of the
    identity's on average: kornia's soft rounding has slope 3 (x - round(x))^2)."""
    images = (smooth_images(4, channels=channels).float() / 255).requires_grad_()
    out = jpeg_straight_through(images, 70)
    pixels = (images.detach() * 255).round().to(torch.uint8)
    assert torch.allclose(out, jpeg_compress(pixels, 70).float() / 255)
    out.sum().backward()
    assert images.grad.shape == images.shape and float(images.grad.mean()) > 0.1


def test_straight_through_jpeg_without_kornia_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "kornia.enhance", None)  # `import` raises ImportError
    with pytest.raises(EpicError, match="pip install kornia"):
        jpeg_straight_through(torch.zeros(1, 3, 8, 8), 70)
    # the attack is built without it (a bench config naming it loads); crafting needs it
    assert create_attack("bullseye-polytope", jpeg=70).jpeg == 70


def test_jpeg_defense_trains_on_the_compressed_images(tmp_path):
    cfg = RunConfig(out=str(tmp_path / "run"), defense=DefenseSpec("jpeg"),
                    train=TrainConfig(epochs=1, batch_size=64, progress=False))
    summary = run_training(cfg)
    assert summary["defense_summary"]["quality"] == 50
    assert summary["defense_summary"]["mean_abs_change"] > 0
    assert summary["clean_dropped"] == 0
