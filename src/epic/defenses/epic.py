"""EPIC as a training callback: select at scheduled epochs, train on what is kept.

Under ``torchrun`` a round is split across the processes: the trainer predicts a shard of the
training set on each and gathers the logits, every process clusters the classes ``c`` with
``c % world == rank``, the dropped indices are gathered, and the trainer takes rank 0's keep
mask. The stochastic solver is seeded per class, so the examples kept are the same as in one
process.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from .. import _distributed as dist
from .._callback import BatchEnd
from .._device import PRECISIONS
from .._errors import EpicError
from .._validation import check_choice
from ..models.features import FeatureCapture, capture_features, find_classifier
from ..selection import EPIC, GradientProxy, SelectionSchedule, gradient_proxy
from .base import DropDefense, register_defense

__all__ = ["EpicDefense", "PROXIES", "PROXY_PASSES"]

PROXIES = ("logits", "last-layer")
PROXY_PASSES = ("separate", "training", "training-features")


@register_defense("epic")
class EpicDefense(DropDefense):
    """Drop isolated medoids of each class in gradient space during training.

    Args:
        subset_fraction: medoid budget per class (0.1, 0.2, 0.3 in the paper).
        cluster_threshold: medoids with at most this many examples in their cluster drop.
        warmup: no round before this epoch (K).
        interval: rounds at the epochs divisible by it (T).
        until: the last epoch at which a round may run (inclusive); ``None`` uses the
            trainer's last learning-rate decay (the paper's rule), or runs to the end if the
            schedule has no decay. See :class:`~epic.selection.SelectionSchedule`.
        proxy: ``"logits"`` (softmax minus one-hot) or ``"last-layer"`` (that combined with
            the penultimate features: the full last-layer gradient, kept factored).
        metric: distance in proxy space, ``"euclidean"`` or ``"cosine"``.
        permanent: dropped examples stay dropped (the paper); ``False`` re-evaluates every
            example at each round.
        proxy_pass: where the logits come from. ``"separate"`` (default, as the authors do):
            an extra inference pass over the training set at each round, in eval mode and
            without augmentation; on a CPU that pass costs most of an epoch. ``"training"``:
            the logits that the training steps of the epoch just before the round computed
            anyway (augmented, train mode, weights moving during the epoch), plus an inference
            pass over the examples not trained on (the dropped ones). Logit proxy only.
            ``"training-features"``: the penultimate features those training steps computed,
            put through the classifier layer as it is at the round (the head's moves within
            the epoch cancel; the trunk's remain), plus the same pass over the dropped ones;
            either proxy. With a frozen extractor (transfer) these are the separate pass's
            proxies at no pass at all.
        proxy_precision: the inference pass's arithmetic, ``"float32"`` (default, as the
            authors) or ``"bfloat16"`` (autocast; 1.3-1.9x faster on a CPU with AVX512-BF16,
            slower on one without; GPU unmeasured); the proxies are always formed in float32.
        optimizer: facility-location solver, ``"lazy"``, ``"stochastic"`` or ``"auto"``.
        seed: seed of the stochastic solver.
        record_proxies: keep each round's proxies (and features), labels, selection and the
            examples trained on before it in :attr:`proxies` (for plots and diagnostics;
            memory).
    """

    name = "epic"

    def __init__(self, *, subset_fraction: float = 0.1, cluster_threshold: int = 1,
                 warmup: int = 1, interval: int = 1, until: int | None = None,
                 proxy: str = "logits", metric: str = "euclidean", permanent: bool = True,
                 optimizer: str = "auto", seed: int = 0, record_proxies: bool = False,
                 proxy_pass: str = "separate", proxy_precision: str = "float32") -> None:
        super().__init__()
        self.epic = EPIC(subset_fraction=subset_fraction, cluster_threshold=cluster_threshold,
                         metric=metric, optimizer=optimizer, seed=seed)
        self.proxy = check_choice("proxy", proxy, PROXIES)
        self.proxy_pass = check_choice("proxy_pass", proxy_pass, PROXY_PASSES)
        self.proxy_precision = check_choice("proxy_precision", proxy_precision, PRECISIONS)
        if self.proxy_pass == "training" and self.proxy != "logits":
            raise EpicError("proxy_pass='training' reuses the training step's logits and has no "
                            "features; use proxy='logits' or proxy_pass='separate'")
        self.permanent = permanent
        self._warmup, self._interval, self._until = warmup, interval, until
        self.schedule = SelectionSchedule(warmup=warmup, interval=interval, until=until)
        self.record_proxies = record_proxies
        self.proxies: list[dict[str, torch.Tensor]] = []
        # proxy_pass="training*": this process's (indices, logits or features) of the epoch
        # before a round (recorded only then), gathered from every process at that epoch's
        # end into (rows, seen) for the round; those are checkpointed, so a resume is exact
        self._recording = False
        self._recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hook: contextlib.ExitStack | None = None  # "training-features": its capture
        self._capture: FeatureCapture | None = None

    def on_train_start(self, trainer: Any) -> None:
        until = self._until
        if until is None:
            decays = trainer.config.milestone_epochs()
            until = decays[-1] if decays else None
        self.schedule = SelectionSchedule(warmup=self._warmup, interval=self._interval,
                                          until=until)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._unhook()
        # once no round can change the kept set any more, the rounds are skipped
        if self.schedule.is_selection_epoch(epoch) and not self._finished(trainer):
            self._select(trainer, epoch)
        self._recorded, self._rows = [], None
        self._recording = (self.proxy_pass != "separate" and not self._finished(trainer)
                           and self.schedule.is_selection_epoch(epoch + 1))
        if self._recording and self.proxy_pass == "training-features":  # this epoch's
            self._hook = contextlib.ExitStack()
            self._capture = self._hook.enter_context(
                capture_features(trainer.model, detach=True))

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        if self._recording:  # every process's rows, for the round that opens the next epoch
            self._unhook()
            self._rows = self._training_rows(trainer)
            self._recorded, self._recording = [], False

    def on_train_end(self, trainer: Any) -> None:
        self._unhook()

    def _finished(self, trainer: Any) -> bool:
        """Whether no later round can change which examples are kept, so that the rounds
        (and their proxy passes) can be skipped. EPIC: never (a round may drop more)."""
        return False

    def _unhook(self) -> None:
        if self._hook is not None:
            self._hook.close()
            self._hook = self._capture = None

    def on_batch_end(self, trainer: Any, batch: BatchEnd) -> None:
        if not self._recording:
            return
        if self.proxy_pass == "training":
            self._recorded.append((batch.indices, batch.logits))  # they feed the next round
        elif self._capture is not None and self._capture.features is not None:
            self._recorded.append((batch.indices, self._capture.features.float()))
            self._capture.features = None

    def _training_rows(self, trainer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(N, K) logits (or (N, D) features) the training steps of the epoch before the round
        computed, every process's, and the (N,) mask of the examples that were trained on
        (the others are zeros); ``None`` when no process recorded any. Every process calls it."""
        empty = torch.empty(0, device=trainer.device)
        flat_idx = dist.all_gather_varlen(
            torch.cat([i for i, _ in self._recorded]) if self._recorded else empty.long())
        flat = dist.all_gather_varlen(
            torch.cat([z for _, z in self._recorded]) if self._recorded else empty)
        if flat.ndim != 2 or not len(flat):
            return None
        n = len(trainer.labels)
        # an example padded in twice (a distributed epoch): its first row, on every process
        # and device (an index_put with repeated indices picks one at random on CUDA)
        order = torch.arange(len(flat_idx), device=flat.device)
        first = torch.full((n,), len(flat_idx), device=flat.device).scatter_reduce(
            0, flat_idx, order, "amin")
        seen = first < len(flat_idx)
        logits = torch.zeros(n, flat.shape[1], device=flat.device)
        logits[seen] = flat[first[seen]]
        return logits, seen

    def _logits(self, trainer: Any, idx: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The round's logits (and features) of the examples ``idx`` (every example)."""
        if self._rows is None:  # the separate pass (or a round with nothing recorded)
            return trainer.predict(idx, features=self.proxy == "last-layer",
                                   precision=self.proxy_precision)
        rows, seen = self._rows
        missing = (~seen).nonzero().squeeze(1)  # not trained on: dropped
        if self.proxy_pass == "training":
            if len(missing):
                rows[missing] = trainer.predict(missing.cpu(),
                                                precision=self.proxy_precision)[0]
            return rows, None
        if len(missing):
            rows[missing] = trainer.predict(missing.cpu(), features=True,
                                            precision=self.proxy_precision)[1]
        layer = find_classifier(trainer.model)
        with torch.no_grad():  # the head as it is now, in float32
            logits = torch.nn.functional.linear(rows, layer.weight.float(),
                                                None if layer.bias is None else layer.bias.float())
        return logits, (rows if self.proxy == "last-layer" else None)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._rows is not None:  # a checkpoint between the recorded epoch and its round
            state["recorded"] = list(self._rows)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        rows = state.get("recorded")
        self._rows = None if rows is None else (rows[0], rows[1].bool())

    def _decide(self, trainer: Any, proxies: GradientProxy, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The examples this round flags (CPU indices into the training set) and the round's
        extra log fields. EPIC: the members of small facility-location clusters."""
        classes = None
        if dist.is_distributed():  # this process's share of the classes
            rank, world = dist.rank(), dist.world_size()
            classes = [c for c in torch.unique(labels).tolist() if c % world == rank]
        result = self.epic.select(proxies, labels, classes=classes)
        dropped = dist.all_gather_varlen(result.dropped).cpu()  # every class's
        return dropped, {"medoids": int(dist.all_gather_varlen(result.medoids).numel())}

    def _select(self, trainer: Any, epoch: int) -> None:
        t0 = time.perf_counter()
        # Every round clusters the whole training set, as the authors' code does: the dropped
        # examples still shape the clusters, so the same outliers are found again instead of
        # their neighbours becoming the next isolated points once they are gone.
        pool = torch.ones_like(trainer.active)
        idx = pool.nonzero().squeeze(1)
        used = "separate" if self._rows is None else self.proxy_pass
        logits, feats = self._logits(trainer, idx)
        labels = trainer.labels.index_select(0, idx.to(trainer.labels.device))
        proxies = gradient_proxy(logits, labels, feats)
        dropped, fields = self._decide(trainer, proxies, labels)
        selected = torch.ones(len(idx), dtype=torch.bool)
        selected[dropped] = False
        if self.record_proxies:
            self.proxies.append({"indices": idx, "vectors": proxies.vectors.cpu(),
                                 "features": None if proxies.features is None
                                 else proxies.features.cpu(),
                                 "labels": labels.cpu(), "keep": selected,
                                 "active": trainer.active.cpu()})
        keep = torch.zeros_like(pool)
        keep[idx[selected]] = True
        if self.permanent:
            keep &= trainer.active
        record = self._drop(trainer, keep, epoch=epoch, started=t0, pool=len(idx), **fields,
                            flagged=int(dropped.numel()), proxy_pass=used)
        if getattr(trainer.config, "progress", False) and dist.is_main():
            from tqdm.auto import tqdm

            tqdm.write("EPIC round " + " ".join(f"{k}={v:.3f}" if isinstance(v, float)
                                                 else f"{k}={v}" for k, v in record.items()))
