"""Activation clustering: split each class in two and drop a cluster that is too small.

Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy and Srivastava, "Detecting Backdoor
Attacks on Deep Neural Networks by Activation Clustering", SafeAI@AAAI 2019. Poisons are
classified as their label for a different reason than clean examples, so their activations
form a separate, small cluster: reduce each class's penultimate features (ICA to 10 dimensions
in the paper), run 2-means, and judge the clusters by relative size.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from .._validation import check_choice, check_fraction, check_int, check_labels, check_tensor
from .base import register_defense
from .filter import FilterDefense, FilterResult

__all__ = ["ActivationClustering", "REDUCTIONS"]

REDUCTIONS = ("ica", "pca")


@register_defense("activation-clustering")
class ActivationClustering(FilterDefense):
    """Per class, reduce the penultimate features, run 2-means, and drop the smaller cluster
    when it holds at most ``size_threshold`` of the class (the paper's relative-size
    analysis).

    Members of a class's smaller cluster score ``1 - its relative size`` (whether dropped or
    not); everything else scores 0. Classes with at most ``dims`` examples are kept.

    Args:
        dims: dimensions after reduction (10 in the paper), capped at the class size minus
            one, the feature dimension and the rank of the class's features.
        reduction: ``"ica"`` (FastICA, as in the paper) or ``"pca"``.
        size_threshold: a smaller cluster holding at most this fraction of its class is
            dropped. 0.35 is the relative-size threshold of the authors' implementation in
            IBM's Adversarial Robustness Toolbox: above it, two clusters are read as two
            clean modes of the class.
        seed: seeds FastICA and k-means.
        epoch, retrain: see :class:`FilterDefense`.
    """

    name = "activation-clustering"

    def __init__(self, *, dims: int = 10, reduction: str = "ica", size_threshold: float = 0.35,
                 seed: int = 0, epoch: int | None = None,
                 retrain: bool | None = None) -> None:
        super().__init__(epoch=epoch, retrain=retrain)
        self.dims = check_int("dims", dims, minimum=1)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.size_threshold = check_fraction("size_threshold", size_threshold)
        self.seed = check_int("seed", seed, minimum=0)

    def filter(self, features: Tensor | None, labels: Tensor, logits: Tensor) -> FilterResult:
        features = check_tensor("features", features, ndim=2, floating=True)
        n = features.shape[0]
        labels = check_labels(labels, n)
        keep = torch.ones(n, dtype=torch.bool)
        scores = torch.zeros(n)
        feats, labels = features.detach().float().cpu(), labels.cpu()
        for c in labels.unique():
            idx = (labels == c).nonzero().squeeze(1)
            if len(idx) < self.dims + 1:
                continue
            x = feats.index_select(0, idx)
            cluster = self._two_means(x)
            if cluster is None:
                continue
            sizes = torch.bincount(cluster, minlength=2)
            small = int(sizes.argmin())
            relative = float(sizes[small]) / len(idx)
            members = idx[cluster == small]
            scores[members] = 1.0 - relative
            if relative <= self.size_threshold:
                keep[members] = False
        device = features.device
        return FilterResult(keep=keep.to(device), scores=scores.to(device))

    def _two_means(self, x: Tensor) -> Tensor | None:
        """2-means cluster ids (n,) of one class's features (n, D) after reduction, or
        ``None`` when the features are constant."""
        from sklearn.cluster import KMeans  # imported here: scikit-learn is slow to import
        from sklearn.decomposition import PCA, FastICA
        from sklearn.exceptions import ConvergenceWarning

        rank = int(torch.linalg.matrix_rank(x - x.mean(0)))
        dims = min(self.dims, x.shape[0] - 1, x.shape[1], rank)
        if dims < 1:
            return None
        data = x.double().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            reduced = None
            if self.reduction == "ica":
                try:
                    reduced = FastICA(n_components=dims, whiten="unit-variance",
                                      random_state=self.seed).fit_transform(data)
                except ValueError:  # near-singular whitening: NaN inside scipy's pinv
                    reduced = None
            if reduced is None or not np.isfinite(reduced).all():  # PCA, or ICA failed
                reduced = PCA(n_components=dims, random_state=self.seed).fit_transform(data)
            ids = KMeans(n_clusters=2, n_init=10, random_state=self.seed).fit_predict(reduced)
        return torch.from_numpy(ids).long()
