"""JPEG round trips of images: the codec the `jpeg` defense, EPIC-plus's squeeze and the
attacks that adapt to them share."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .._errors import EpicError
from .._validation import check_int

__all__ = ["jpeg_compress", "jpeg_straight_through"]


def jpeg_compress(images: Tensor, quality: int = 50) -> Tensor:
    """JPEG-encode and decode uint8 images (N, C, H, W), C = 1 or 3, at ``quality`` (1-100).

    Pillow's codec (4:2:0 chroma subsampling for colour, its default) runs once per image on
    the CPU; returns a new uint8 tensor of the same shape on the images' device.
    """
    check_int("quality", quality, minimum=1, maximum=100)
    pixels = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    out = np.empty_like(pixels)
    for i, img in enumerate(pixels):  # the codec has no batch interface
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf))
    out_t = torch.from_numpy(out)
    out_t = out_t[:, None] if out_t.ndim == 3 else out_t.permute(0, 3, 1, 2)
    return out_t.contiguous().to(images.device)


def jpeg_straight_through(images: Tensor, quality: int) -> Tensor:
    """JPEG round trip of float images (N, C, H, W) in [0, 1], C = 1 or 3, that gradients
    pass: the value is the real codec's (:func:`jpeg_compress` of the images rounded to
    uint8), the gradient that of kornia's differentiable JPEG model (Reich et al. 2024;
    grey images through it as three equal channels). An attacker that optimises through it
    adapts to compression-based defenses."""
    check_int("quality", quality, minimum=1, maximum=100)
    try:  # an optional dependency: only the adaptive attacks use it, when they craft
        from kornia.enhance import jpeg_codec_differentiable
    except ImportError as err:
        raise EpicError("a JPEG-adaptive attack needs kornia's differentiable JPEG: "
                        "pip install kornia") from err
    grey = images.shape[1] == 1
    rgb = images.expand(-1, 3, -1, -1) if grey else images
    quality_t = torch.tensor([float(quality)], device=images.device)
    model = jpeg_codec_differentiable(rgb.float(), quality_t).to(images.dtype)
    if grey:
        model = model.mean(1, keepdim=True)
    pixels = (images.detach() * 255).round_().clamp_(0, 255).to(torch.uint8)
    real = jpeg_compress(pixels, quality).to(images.dtype) / 255
    return model + (real - model).detach()
