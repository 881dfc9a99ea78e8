"""Per-example gradient proxies and the distances between them.

EPIC compares examples by the gradient of their loss. Two proxies are cheap:

* the gradient of cross-entropy with respect to the logits, ``softmax(z) - onehot(y)`` (N, K);
* the full last-layer gradient ``g ⊗ [h, 1]`` (weights and bias), which is the outer product of
  the logit gradient ``g`` with the penultimate features ``h``. It has K * (D + 1) entries per
  example, so it is never built: ``<g_i ⊗ h_i, g_j ⊗ h_j> = <g_i, g_j> <h_i, h_j>`` gives every
  inner product, and hence every distance, from the two small factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import EpicError
from .._validation import check_labels, check_tensor

__all__ = ["GradientProxy", "gradient_proxy", "pairwise_distances", "METRICS"]

METRICS = ("euclidean", "cosine")


@dataclass(frozen=True)
class GradientProxy:
    """Per-example vectors, optionally kept as a factored outer product.

    Attributes:
        vectors: (N, K) logit gradients (or any per-example vectors).
        features: (N, D) right factor, or ``None``. When set, example ``i`` stands for the
            flattened outer product ``vectors[i] ⊗ features[i]``, which is never materialised.
    """

    vectors: Tensor
    features: Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("proxies", self.vectors, ndim=2, floating=True)
        if self.features is not None:
            check_tensor("features", self.features, ndim=2, floating=True)
            if self.features.shape[0] != self.vectors.shape[0]:
                raise EpicError(
                    f"features must have one row per example ({self.vectors.shape[0]}), "
                    f"got {self.features.shape[0]}")

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __getitem__(self, idx: Tensor | slice) -> GradientProxy:
        if isinstance(idx, Tensor) and idx.dtype != torch.bool:  # index_select: fast on CPU
            pick = lambda t: t.index_select(0, idx.to(t.device))  # noqa: E731
        else:
            pick = lambda t: t[idx]  # noqa: E731
        feats = None if self.features is None else pick(self.features)
        return GradientProxy._trusted(pick(self.vectors), feats)

    @classmethod
    def _trusted(cls, vectors: Tensor, features: Tensor | None) -> GradientProxy:
        """A proxy from parts of a checked one, without re-running the checks (a full pass
        over the data each; hot loops slice proxies into many blocks)."""
        out = object.__new__(cls)
        object.__setattr__(out, "vectors", vectors)
        object.__setattr__(out, "features", features)
        return out

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    @property
    def dim(self) -> int:
        """Length of the (possibly implicit) flattened vector."""
        k = self.vectors.shape[1]
        return k if self.features is None else k * self.features.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> GradientProxy:
        feats = None if self.features is None else self.features.to(device, dtype)
        return GradientProxy(self.vectors.to(device, dtype), feats)

    def sq_norms(self) -> Tensor:
        """(N,) squared norms of the flattened vectors."""
        sq = self.vectors.pow(2).sum(1)
        if self.features is not None:
            sq = sq * self.features.pow(2).sum(1)
        return sq

    def gram(self, other: GradientProxy) -> Tensor:
        """(len(self), len(other)) inner products of the flattened vectors."""
        if (self.features is None) != (other.features is None):
            raise EpicError("cannot compare factored and plain proxies; build both the same way")
        g = self.vectors @ other.vectors.T
        if self.features is not None:
            g = g * (self.features @ other.features.T)
        return g

    def materialize(self) -> Tensor:
        """(N, dim) explicit vectors; for tests and small inputs only."""
        if self.features is None:
            return self.vectors
        return torch.einsum("nk,nd->nkd", self.vectors, self.features).flatten(1)


def gradient_proxy(logits: Tensor, labels: Tensor, features: Tensor | None = None) -> GradientProxy:
    """Gradient of the cross-entropy loss for each example, as EPIC compares them.

    Args:
        logits: (N, K) model outputs.
        labels: (N,) integer labels in [0, K).
        features: optional (N, D) penultimate features (the input of the last linear layer).
            When given, the proxy is the full last-layer gradient (weights and bias),
            ``(softmax(z) - onehot(y)) ⊗ [h, 1]``, kept factored.

    Returns:
        A :class:`GradientProxy`; with ``features=None`` its ``vectors`` are
        ``softmax(logits) - onehot(labels)``.
    """
    check_tensor("logits", logits, ndim=2, floating=True)
    labels = check_labels(labels, logits.shape[0], logits.shape[1])
    logits = logits.detach().float()
    g = torch.softmax(logits, dim=1)
    g[torch.arange(len(labels), device=g.device), labels] -= 1.0
    if features is None:
        return GradientProxy(g)
    check_tensor("features", features, ndim=2, floating=True)
    if features.shape[0] != logits.shape[0]:
        raise EpicError(
            f"features must have one row per example ({logits.shape[0]}), got {features.shape[0]}")
    h = features.detach().float()
    h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)  # the bias column
    return GradientProxy(g, h)


def as_proxy(points: Tensor | GradientProxy) -> GradientProxy:
    """Accept either plain (N, d) vectors or a :class:`GradientProxy`."""
    if isinstance(points, GradientProxy):
        return points
    return GradientProxy(points)  # checked (shape, dtype, finite) on construction


def pairwise_distances(a: Tensor | GradientProxy, b: Tensor | GradientProxy, *,
                       metric: str = "euclidean", a_sq: Tensor | None = None,
                       b_sq: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """(len(a), len(b)) distances: Euclidean, or cosine distance ``1 - cos``.

    ``a_sq``/``b_sq`` are optional precomputed squared norms (saves work in hot loops); ``out``
    an optional (len(a), len(b)) tensor to write into (a view of a larger matrix works), which
    is returned.
    """
    a, b = as_proxy(a), as_proxy(b)
    if metric not in METRICS:
        raise EpicError(f"unknown value {metric!r} for metric; valid values are {list(METRICS)}")
    a_sq = a.sq_norms() if a_sq is None else a_sq
    b_sq = b.sq_norms() if b_sq is None else b_sq
    if metric == "euclidean" and a.features is None and b.features is None:
        # ||a||^2 + ||b||^2 - 2 a.b with the product and one sum fused in one addmm
        d2 = torch.addmm(b_sq[None, :], a.vectors, b.vectors.T, alpha=-2, out=out)
        return d2.add_(a_sq[:, None]).clamp_(min=0).sqrt_()
    g = a.gram(b)
    if out is not None:
        g = out.copy_(g)
    if metric == "euclidean":
        d2 = g.mul_(-2).add_(a_sq[:, None]).add_(b_sq[None, :])
        return d2.clamp_(min=0).sqrt_()
    denom = (a_sq[:, None] * b_sq[None, :]).sqrt_().clamp_(min=1e-12)  # cosine
    return g.div_(denom).neg_().add_(1).clamp_(0, 2)
