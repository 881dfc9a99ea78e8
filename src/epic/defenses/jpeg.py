"""JPEG compression: re-encode every training image once, before training.

Lossy compression removes most of the high-frequency energy that small L-inf perturbations
live in, at the cost of some detail in every image. An independent re-run of EPIC's setting
(PureGen, NeurIPS 2024: CIFAR-10, ResNet-18, gradient matching at 1%) found quality 50 takes
attack success from 44% to 0% for about 3 points of accuracy and almost no extra time: the
cheap bar every other defense has to clear.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .._validation import check_int
from ..data.codec import jpeg_compress
from .base import DefenseCallback, register_defense

__all__ = ["JpegCompression", "jpeg_compress"]


@register_defense("jpeg")
class JpegCompression(DefenseCallback):
    """Train on JPEG-compressed copies of the training images (compressed once, up front).

    Args:
        quality: JPEG quality, 1-100 (default 50, the setting of the PureGen comparison).
    """

    name = "jpeg"
    needs_images = True

    def __init__(self, *, quality: int = 50) -> None:
        self.quality = check_int("quality", quality, minimum=1, maximum=100)
        self.changed = 0.0

    def prepare_images(self, images: Tensor) -> Tensor:
        out = jpeg_compress(images, self.quality)
        self.changed = float((out.int() - images.int()).abs().float().mean()) if len(images) \
            else 0.0
        return out

    def summary(self) -> dict[str, Any]:
        return {"quality": self.quality, "mean_abs_change": self.changed}
