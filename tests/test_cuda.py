"""The CUDA fast path: autocast dtypes, loss scaling, channels-last memory, selection on the GPU.

Every test here is marked ``cuda`` and skips without a GPU; ``pytest -m cuda`` runs only them
(``benchmarks/gpu_check.sh`` does, on a GPU machine).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from epic.data import ImageTensors
from epic.defenses import EpicDefense
from epic.models import create_model
from epic.selection import EPIC
from epic.training import TrainConfig, Trainer

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
BF16 = CUDA and torch.cuda.is_bf16_supported()

FAST = dict(epochs=1, batch_size=32, lr=0.05, augment="none", progress=False, device="cuda",
            eval_batch_size=64, eval_every=0)


def tiny_split(n=96, size=16, classes=4, seed=0):
    """Seeded random 3-channel images: C, H and W all differ from 1, so that the
    channels-last and contiguous layouts of a batch are told apart."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageTensors(images, torch.arange(n) % classes, [f"c{k}" for k in range(classes)])


def tiny_model(classes=4):
    torch.manual_seed(0)
    return create_model("convnet", num_classes=classes, in_channels=3, channels=(8, 16),
                        hidden=32)


@contextlib.contextmanager
def recorded(model: nn.Module):
    """Record the output dtype of every Conv2d / Linear call, whether each conv output is
    channels-last, and the inputs of the first conv (the images the model is given)."""
    seen = {"dtypes": set(), "conv_out_channels_last": [], "inputs": [], "calls": 0}
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))

    def on_output(module, args, out):
        seen["calls"] += 1
        seen["dtypes"].add(out.dtype)
        if isinstance(module, nn.Conv2d):
            seen["conv_out_channels_last"].append(
                out.is_contiguous(memory_format=torch.channels_last))

    def on_input(module, args):
        seen["inputs"].append(args[0].detach())

    handles = [m.register_forward_hook(on_output) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles.append(first.register_forward_pre_hook(on_input))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


# ---------------------------------------------------------------------------------- AMP
@pytest.mark.parametrize("amp, dtype, expected, scaled", [
    pytest.param(True, "bfloat16", torch.bfloat16, False,
                 marks=pytest.mark.skipif(CUDA and not BF16, reason="this GPU has no bf16")),
    (True, "float16", torch.float16, True),
    (False, "bfloat16", torch.float32, False),
])
def test_autocast_dtype_of_convs_and_linears(amp, dtype, expected, scaled):
    trainer = Trainer(tiny_model(), tiny_split(),
                      config=TrainConfig(amp=amp, amp_dtype=dtype, **FAST))
    assert trainer.scaler.is_enabled() is scaled  # fp16 only: loss scaling
    with recorded(trainer.model) as seen:
        history = trainer.fit(resume=False)
    assert seen["calls"] > 0 and seen["dtypes"] == {expected}
    assert math.isfinite(history[-1]["train_loss"])
    # the weights (and the optimizer's master copy) stay float32
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert all(p.grad is None or p.grad.dtype == torch.float32
               for p in trainer.model.parameters())
    if scaled:
        scale = trainer.scaler.get_scale()
        assert math.isfinite(scale) and scale > 0
    logits, feats = trainer.predict(features=True)  # inference hands back float32
    assert logits.dtype == feats.dtype == torch.float32
    assert logits.device.type == "cuda"


# ------------------------------------------------------------------------- channels-last
def test_channels_last_weights_and_inputs():
    trainer = Trainer(tiny_model(), tiny_split(), config=TrainConfig(**FAST))
    assert trainer.memory_format is torch.channels_last
    weights = conv_weights(trainer.model)
    assert weights and all(w.is_cuda and w.is_contiguous(memory_format=torch.channels_last)
                           and not w.is_contiguous() for w in weights)
    with recorded(trainer.model) as seen:
        trainer.fit(resume=False)
    assert seen["inputs"] and all(x.is_contiguous(memory_format=torch.channels_last)
                                  and not x.is_contiguous() for x in seen["inputs"])
    assert all(seen["conv_out_channels_last"])
    assert all(w.is_contiguous(memory_format=torch.channels_last)  # after optimizer steps
               for w in conv_weights(trainer.model))


def test_channels_last_survives_crop_flip_through_the_network():
    """With the random crop the convs still run channels-last (their outputs are)."""
    trainer = Trainer(tiny_model(), tiny_split(),
                      config=TrainConfig(**{**FAST, "augment": "crop-flip"}))
    with recorded(trainer.model) as seen:
        trainer.fit(resume=False)
    assert seen["conv_out_channels_last"] and all(seen["conv_out_channels_last"])


def test_channels_last_inputs_after_crop_flip():
    trainer = Trainer(tiny_model(), tiny_split(),
                      config=TrainConfig(**{**FAST, "augment": "crop-flip"}))
    with recorded(trainer.model) as seen:
        trainer.fit(resume=False)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in seen["inputs"])


def test_channels_last_off_keeps_the_default_layout():
    trainer = Trainer(tiny_model(), tiny_split(),
                      config=TrainConfig(**{**FAST, "channels_last": False}))
    assert trainer.memory_format is torch.contiguous_format
    assert all(w.is_contiguous() for w in conv_weights(trainer.model))


# ---------------------------------------------------------------------------- selection
def seeded_proxies(classes=3, per_class=60, outliers=4, dim=8, seed=0):
    """Per class: a tight Gaussian cluster and a few far, scattered outliers (the isolated
    points EPIC drops)."""
    g = torch.Generator().manual_seed(seed)
    points, labels = [], []
    for c in range(classes):
        center = 4.0 * torch.randn(dim, generator=g)
        inliers = center + 0.3 * torch.randn(per_class - outliers, dim, generator=g)
        far = center + 6.0 * torch.randn(outliers, dim, generator=g)
        points += [inliers, far]
        labels.append(torch.full((per_class,), c))
    return torch.cat(points), torch.cat(labels)


@pytest.mark.parametrize("optimizer", ["lazy", "stochastic"])
def test_epic_select_on_cuda_drops_what_cpu_drops(optimizer):
    proxies, labels = seeded_proxies()
    epic = EPIC(subset_fraction=0.1, optimizer=optimizer, seed=0)
    cpu = epic.select(proxies, labels)
    gpu = epic.select(proxies.cuda(), labels.cuda())
    assert gpu.keep.is_cuda and gpu.dropped.is_cuda
    assert cpu.num_dropped > 0
    assert torch.equal(gpu.dropped.cpu(), cpu.dropped)
    assert torch.equal(gpu.keep.cpu(), cpu.keep)


def test_epic_defense_trains_on_cuda():
    trainer = Trainer(tiny_model(), tiny_split(),
                      config=TrainConfig(**{**FAST, "epochs": 3}),
                      callbacks=[defense := EpicDefense(warmup=1, interval=1)])
    history = trainer.fit(resume=False)
    assert defense.summary()["rounds"] >= 1
    assert history[-1]["active"] == int(trainer.active.sum())


@pytest.mark.skipif(not BF16, reason="needs bf16 autocast on the GPU")
def test_training_features_pass_under_bf16_autocast_matches_the_separate_pass_in_transfer():
    """The recorded features are bf16 under autocast; the round puts them through the head in
    float32, so in transfer (frozen extractor) it drops what the separate pass drops."""
    runs = {}
    for proxy_pass in ("separate", "training-features"):
        defense = EpicDefense(subset_fraction=0.3, warmup=1, interval=1, until=2,
                              proxy="last-layer", proxy_pass=proxy_pass, record_proxies=True)
        Trainer(tiny_model(), tiny_split(), callbacks=[defense], config=TrainConfig(
            **{**FAST, "epochs": 3, "scenario": "transfer", "amp": True,
               "amp_dtype": "bfloat16"})).fit(resume=False)
        runs[proxy_pass] = defense.proxies
    for a, b in zip(runs["separate"], runs["training-features"], strict=True):
        assert b["features"].dtype == torch.float32
        torch.testing.assert_close(a["features"], b["features"])
        assert torch.equal(a["keep"], b["keep"])
