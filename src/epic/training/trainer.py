"""The training loop: data on the device, tensor augmentation, callbacks, checkpoints.

The whole training set lives on the device as uint8 (N, C, H, W); an epoch slices a seeded
permutation of the *active* indices (a defense can shrink that set), so there is no DataLoader
in the hot path (airbench style). Models take images in [0, 1] and normalise themselves.

A split too large for memory can be streamed instead (:class:`~epic.data.StreamingImages`, or
anything with ``labels`` and ``__getitem__(i) -> (image, label, i)``): a ``DataLoader`` with
``config.num_workers`` workers decodes the examples of the same seeded permutation, in the same
order, into pinned buffers copied to the device without blocking; augmentation still runs on
the device, and inference streams too, holding only the logits and features.

Under ``torchrun`` (several processes, see :mod:`epic._distributed`) the trained module is
wrapped in ``DistributedDataParallel`` and every process builds the same permutation, then
takes every ``world``-th example of it (a distributed sampler over the active indices); rank 0
alone writes files and shows progress.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import _distributed as dist
from .._callback import BatchEnd, Callback, TrainingParts
from .._device import PRECISIONS, resolve_device, seed_everything
from .._errors import EpicError
from .._io import atomic_write, write_jsonl
from .._validation import check_choice
from ..data.augment import augment_batch
from ..models.features import capture_features, find_classifier
from .config import AUGMENTATIONS, TrainConfig

__all__ = ["Trainer", "ImageSplit", "build_optimizer"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class ImageSplit(Protocol):
    """Anything with uint8 ``images`` (N, C, H, W) and int64 ``labels`` (N,)."""

    images: Tensor
    labels: Tensor


class StreamedSplit(Protocol):
    """A split read on demand: int64 ``labels`` (N,), ``image_shape`` (C, H, W), ``len`` and
    ``__getitem__(i) -> (uint8 (C, H, W) image, label, i)`` (:class:`epic.data.StreamingImages`)."""

    labels: Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]: ...


class _BatchPlan:
    """A ``DataLoader`` batch sampler whose batches are set before each pass over the loader,
    so that one loader (and its persistent workers) serves every epoch's permutation."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _is_streamed(split: Any) -> bool:
    return (not isinstance(getattr(split, "images", None), Tensor)
            and isinstance(getattr(split, "labels", None), Tensor)
            and hasattr(split, "__getitem__") and hasattr(split, "__len__"))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with weight decay on weights only (not on batch-norm parameters and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EpicError("the model has no trainable parameters; unfreeze at least its last layer")
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    nesterov = config.nesterov and config.momentum > 0
    return torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr,
                           momentum=config.momentum, nesterov=nesterov)


class Trainer:
    """Trains ``model`` on ``train`` with the given callbacks (defenses are callbacks).

    Args:
        model: a classifier taking images in [0, 1].
        train: the training split (poisons included), with ``images`` and ``labels``, or a
            streamed split (:class:`StreamedSplit`, e.g. :class:`epic.data.StreamingImages`)
            whose images are decoded by ``config.num_workers`` DataLoader workers as needed.
        config: hyperparameters, with a concrete ``augment`` (not the dataset-default ``None``).
        test: optional clean test split for accuracy after every epoch (in memory or streamed).
        target: optional (C, H, W) uint8 image whose prediction is logged every epoch.
        poison_mask: optional (N,) bool mask of the poisons, for scoring defenses only; it
            never influences training.
        callbacks: hooks called by name, in order.
        out_dir: where ``checkpoint.pt`` and ``metrics.jsonl`` (every event so far) are
            written after every epoch, atomically (by rank 0 only when distributed).

    Several processes (``torchrun``, after :func:`epic._distributed.init_from_env`): every
    rank holds the whole training set (rank 0's, broadcast), seeds the same generator and
    draws the same permutation of the active indices each epoch. The permutation is padded by
    repeating its start to a multiple of the world size (as ``DistributedSampler`` with
    ``drop_last=False`` does), and rank ``r`` trains on its elements ``r, r + world, ...`` in
    batches of ``batch_size // world``: the global batch (what one optimiser step sees, the
    gradients being averaged by ``DistributedDataParallel``) keeps ``config.batch_size``
    examples when it is divisible by the world size. Augmentation is drawn for the whole
    global batch on every rank so that the generator stays identical across ranks (a
    checkpoint of rank 0 is every rank's). Batch-norm statistics are per rank during an epoch
    and rank 0's are broadcast after it. :meth:`predict` shards its input and gathers the
    result, and :meth:`set_active` takes rank 0's mask; both are collective (every rank must
    call them). A streamed split is read by every rank from the same files (only the labels
    are broadcast); a rank decodes only its own share of each global batch, and augments it
    in place inside a global-batch-sized tensor, so every example gets the same crop and flip
    as in memory.

    Attributes:
        active: (N,) bool mask on the CPU of the examples trained on; callbacks change it
            with :meth:`set_active`.
        images: the training images on the device, or None for a streamed split.
        stream: the streamed training split, or None when it is held in memory.
        train_module: what the batch loop calls: :attr:`model`, or :attr:`head` in transfer
            (inside ``DistributedDataParallel`` during :meth:`fit` when distributed).
            A callback returns it (with :attr:`model` and :attr:`optimizer`) wrapped from
            ``configure_training`` (e.g. for per-example gradients); :attr:`model` is the
            network whose ``state_dict`` the checkpoint holds.
        history: one metrics dict per finished epoch.
        events: everything logged (epochs and callback records such as selection rounds).
    """

    def __init__(self, model: nn.Module, train: ImageSplit | StreamedSplit, *,
                 config: TrainConfig | None = None,
                 test: ImageSplit | StreamedSplit | None = None, target: Tensor | None = None,
                 poison_mask: Tensor | None = None, callbacks: Sequence[Callback] = (),
                 out_dir: str | Path | None = None) -> None:
        self.config = config or TrainConfig()
        self._split = train  # for train_copy
        if self.config.augment is None:
            raise EpicError("TrainConfig.augment is None (the dataset's default, which "
                            "run_training fills in); give the Trainer one of "
                            f"{list(AUGMENTATIONS)}")
        self.device = resolve_device(self.config.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        if self.world > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", dist.local_rank())  # one GPU per process
        self.generator = seed_everything(self.config.seed)  # the same on every rank
        self._check_split("train", train)
        if test is not None:
            self._check_split("test", test)
            if self._shape(test) != self._shape(train):
                raise EpicError(f"test images have shape {self._shape(test)} but "
                                f"training images {self._shape(train)}")
        n = len(train.labels)
        if poison_mask is not None and tuple(poison_mask.shape) != (n,):
            raise EpicError(f"poison_mask must have shape ({n},), got {tuple(poison_mask.shape)}")
        self.cuda = self.device.type == "cuda"
        self.memory_format = (torch.channels_last if self.config.channels_last
                              else torch.contiguous_format)
        self.eval_batch_size = self.config.eval_batch_size or (512 if self.cuda else 128)
        self.model = model.to(self.device, memory_format=self.memory_format)
        self._loaders: dict[str, tuple[DataLoader, _BatchPlan, Any]] = {}
        self.stream: StreamedSplit | None = train if _is_streamed(train) else None
        self.images: Tensor | None = None
        if self.stream is None:
            self.images = train.images.to(self.device)  # type: ignore[union-attr]
        self.labels = train.labels.to(self.device)
        if self.world > 1:  # every rank trains on rank 0's data (e.g. its crafted poisons)
            if self.images is not None:
                self.images = dist.broadcast(self.images.clone(), 0)  # clone: never the caller's
            self.labels = dist.broadcast(self.labels.clone(), 0)
        # (images on the device, or the streamed split; labels on the device)
        self.test: tuple[Any, Tensor] | None = None
        if test is not None:
            self.test = (test if _is_streamed(test) else test.images.to(self.device),
                         test.labels.to(self.device))
        self.target = None if target is None else target.to(self.device)
        self.poison_mask = None if poison_mask is None else poison_mask.bool().cpu()
        self.callbacks = list(callbacks)
        self._batch_transforms = [cb for cb in self.callbacks
                                  if type(cb).transform_batch is not Callback.transform_batch]
        self._batch_ends = [cb for cb in self.callbacks
                            if type(cb).on_batch_end is not Callback.on_batch_end]
        # Checkpoints hold the state of the callbacks that have one, by key.
        stateful = [cb for cb in self.callbacks
                    if type(cb).state_dict is not Callback.state_dict]
        keys = [cb.state_key for cb in stateful]
        self._stateful = {k if keys.count(k) == 1 else f"{k}#{i}": cb
                          for i, (k, cb) in enumerate(zip(keys, stateful, strict=True))}
        self.out_dir = None if out_dir is None else Path(out_dir)
        # Transfer: frozen extractor, fresh linear head trained on features computed once.
        self.head: nn.Linear | None = None
        self.cache: Tensor | None = None
        self.test_cache: Tensor | None = None
        if self.config.scenario == "transfer":
            self.model.requires_grad_(False)
            _, self.cache = self.predict(features=True)
            if self.test is not None and isinstance(self.test[0], Tensor):
                _, self.test_cache = self.predict(images=self.test[0], features=True)
            elif self.test is not None:  # streamed test split
                _, self.test_cache = self._predict(self.test[0], torch.arange(len(self.test[1])),
                                                   features=True, layer=None, key="test")
            self.head = find_classifier(self.model)
            self.head.reset_parameters()
            self.head.requires_grad_(True)
        self.train_module: nn.Module = self.model if self.head is None else self.head
        self.optimizer = build_optimizer(self.model, self.config)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=self.config.milestone_epochs(), gamma=self.config.gamma)
        # fp16 autocast needs loss scaling; disabled (a pass-through) otherwise.
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.cuda and self.config.amp and self.config.amp_dtype == "float16")
        self.active = torch.ones(n, dtype=torch.bool)
        self.epoch = 0  # the next epoch to run
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    @staticmethod
    def _check_split(name: str, split: Any) -> None:
        if _is_streamed(split):
            labels, n = split.labels, len(split)
            if labels.dtype != torch.int64 or labels.shape != (n,):
                raise EpicError(f"{name} labels of a streamed split must be int64 of shape "
                                f"({n},), got {labels.dtype} {tuple(labels.shape)}")
            shape = tuple(getattr(split, "image_shape", ()))
            if len(shape) != 3:
                raise EpicError(f"streamed {name} split needs image_shape (C, H, W), got "
                                f"{shape or 'none'}")
            return
        images, labels = getattr(split, "images", None), getattr(split, "labels", None)
        if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
            raise EpicError(f"{name} split needs tensor attributes images and labels, or "
                            f"labels and __getitem__ to be streamed (epic.data.StreamingImages)")
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise EpicError(f"{name} images must be uint8 (N, C, H, W), got {images.dtype} "
                            f"{tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise EpicError(f"{name} labels must have shape ({images.shape[0]},), "
                            f"got {tuple(labels.shape)}")

    @staticmethod
    def _shape(split: Any) -> tuple[int, ...]:
        if _is_streamed(split):
            return tuple(int(v) for v in split.image_shape)
        return tuple(split.images.shape[1:])

    # ----------------------------------------------------------------------------- helpers
    def _autocast(self, precision: str | None = None) -> contextlib.AbstractContextManager:
        """The training's autocast (``precision=None``), or float32 / bfloat16 on request."""
        if precision == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if precision is None and self.cuda and self.config.amp:
            return torch.autocast("cuda", dtype=getattr(torch, self.config.amp_dtype))
        return contextlib.nullcontext()

    def _to_input(self, images: Tensor) -> Tensor:
        x = images.float().div_(255.0)
        return x.contiguous(memory_format=self.memory_format)

    def _batches(self, indices: Tensor, size: int) -> Iterator[Tensor]:
        yield from indices.split(size)

    def _streamed(self, key: str, split: Any, parts: Sequence[Tensor]) -> Iterator[Tensor]:
        """The uint8 images of ``split`` at each of ``parts``, in order, on the device.

        One ``DataLoader`` per ``key`` (training, inference on the training split, on the test
        split) is kept with its workers for the trainer's life (until :meth:`fit` returns);
        its batch sampler is given ``parts`` before each pass. The loader draws its base seed
        from a generator of its own, never from the global or the trainer's generator, so
        streaming leaves every random state as the in-memory path does.
        """
        entry = self._loaders.get(key)
        if entry is None or entry[2] is not split:
            plan, workers = _BatchPlan(), self.config.num_workers
            loader = DataLoader(split, batch_sampler=plan, num_workers=workers,  # type: ignore
                                pin_memory=self.cuda and self.config.pin_memory,
                                persistent_workers=workers > 0,
                                generator=torch.Generator().manual_seed(self.config.seed))
            entry = self._loaders[key] = (loader, plan, split)
        loader, plan, _ = entry
        plan.batches = [p.tolist() for p in parts]
        for part, (images, _, index) in zip(parts, loader, strict=True):
            if not torch.equal(index, part.cpu()):  # a split must return the index it was given
                raise EpicError(f"the streamed split returned examples {index[:4].tolist()}... "
                                f"for {part[:4].tolist()}...; __getitem__(i) must return "
                                f"(image, label, i)")
            yield images.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the DataLoader workers of a streamed split (they restart when needed)."""
        self._loaders.clear()

    def set_active(self, mask: Tensor) -> None:
        """Train on the examples where ``mask`` is True from the next batch on.

        When distributed, every rank must call it, and rank 0's mask is broadcast to all.
        """
        mask = mask.bool().cpu()
        if mask.shape != self.active.shape:
            raise EpicError(f"active mask must have shape {tuple(self.active.shape)}, "
                            f"got {tuple(mask.shape)}")
        mask = dist.broadcast(mask.clone(), 0)
        if not mask.any():
            raise EpicError("a defense dropped every training example; lower its fraction")
        self.active = mask

    def log_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Record an event (``kind`` plus fields) in :attr:`events`; returns the record."""
        record = {"event": kind, **fields}
        self.events.append(record)
        return record

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, indices: Tensor | None = None, *, images: Tensor | None = None,
                features: bool = False, layer: str | None = None,
                precision: str | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (and penultimate features) in eval mode, without augmentation.

        Args:
            indices: training-set indices (default all); ignored when ``images`` is given.
            images: uint8 (N, C, H, W) images to predict instead of training examples.
            features: also return the input of the final linear layer.
            layer: name of that layer if it is not the last ``nn.Linear``.
            precision: ``None`` runs under the training's autocast (when on); ``"float32"``
                computes in float32 whatever the training does; ``"bfloat16"`` autocasts to
                bfloat16 on the trainer's device (CPU or CUDA): faster on a CPU with native
                bf16 (AVX512-BF16/AMX), slower on one without.

        Returns:
            ``(logits, features)`` as float32 tensors on the trainer's device; features is
            ``None`` unless requested.

        When distributed, each rank predicts a contiguous run of whole evaluation batches
        (each example sees the same batch as in one process) and the results are gathered in
        the input's order, so every rank gets the full result; every rank must call it.
        """
        if precision is not None:  # checked before the transfer shortcut, which ignores it
            check_choice("precision", precision, PRECISIONS)
        if images is None:
            idx = (torch.arange(len(self.labels)) if indices is None else indices.cpu())
            source: Any = self.images if self.stream is None else self.stream
            if self.cache is not None:  # transfer: the extractor is frozen, reuse its features
                feats = self.cache.index_select(0, idx.to(self.device))
                return self.head(feats).float(), (feats if features else None)
        else:
            idx, source = torch.arange(len(images)), images.to(self.device)
        return self._predict(source, idx, features=features, layer=layer, key="predict",
                             precision=precision)

    def _predict(self, source: Any, idx: Tensor, *, features: bool, layer: str | None,
                 key: str, precision: str | None = None) -> tuple[Tensor, Tensor | None]:
        """:meth:`predict` of ``source`` (images on the device, or a streamed split) at
        ``idx``; ``key`` names the DataLoader that streams it."""
        batches = list(self._batches(idx, self.eval_batch_size))
        if self.world > 1:  # this rank's contiguous share of the batches
            nb = len(batches)
            batches = batches[self.rank * nb // self.world:(self.rank + 1) * nb // self.world]
        inputs = self._inputs(source, batches, key)
        was_training = self.model.training
        self.model.eval()
        logits, feats = [], []
        try:
            with capture_features(self.model, layer, detach=True) if features \
                    else contextlib.nullcontext() as cap:
                for x in inputs:
                    with self._autocast(precision):
                        logits.append(self.model(x).float())
                    if features:
                        feats.append(cap.features.float())
        finally:
            self.model.train(was_training)
        empty = torch.empty(0, device=self.device)
        out = dist.all_gather_varlen(torch.cat(logits) if logits else empty)
        if not features:
            return out, None
        return out, dist.all_gather_varlen(torch.cat(feats) if feats else empty)

    def train_copy(self) -> Trainer:
        """A copy of the model, from its current weights, trained to the end on this run's
        training split with its config but no callbacks, no output and the same seed; its
        trainer is returned (to :meth:`predict` with). For a defense that needs a fully
        trained model's view of the data before this run trains (a filter's reference
        protocol). The random states of this run are left as they were."""
        import copy
        import dataclasses
        import random

        import numpy as np

        states = random.getstate(), np.random.get_state()
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            trainer = Trainer(copy.deepcopy(self.model), self._split,
                              config=dataclasses.replace(self.config, progress=False))
            trainer.fit(resume=False)
        random.setstate(states[0])
        np.random.set_state(states[1])
        return trainer

    def inputs(self, indices: Tensor | None = None) -> Iterator[Tensor]:
        """The model's inputs for the training examples ``indices`` (default all), in order,
        in batches of :attr:`eval_batch_size`: float in [0, 1], on the device, in the model's
        memory format, without augmentation; a streamed split is decoded by its DataLoader.

        For a defense's own pass over the images (e.g. one stopped at the first layer). Unlike
        :meth:`predict` it is not shared out between ranks: each rank gets every batch.
        """
        idx = torch.arange(len(self.labels)) if indices is None else indices.cpu()
        source: Any = self.images if self.stream is None else self.stream
        return self._inputs(source, list(self._batches(idx, self.eval_batch_size)), "predict")

    def _inputs(self, source: Any, batches: list[Tensor], key: str) -> Iterator[Tensor]:
        """Model-ready batches of ``source`` (images on the device, or a streamed split,
        decoded by the DataLoader named ``key``) at each index batch of ``batches``."""
        if isinstance(source, Tensor):
            pixels: Iterator[Tensor] = (source.index_select(0, part.to(self.device))
                                        for part in batches)
        else:
            pixels = self._streamed(key, source, batches)
        for batch in pixels:
            yield self._to_input(batch)

    @torch.no_grad()
    def _test_accuracy(self) -> float:
        if self.test_cache is not None:  # transfer: frozen extractor, cached test features
            logits = self.head(self.test_cache)
            return float((logits.argmax(1) == self.test[1]).float().mean())
        if not isinstance(self.test[0], Tensor):  # streamed test split
            logits, _ = self._predict(self.test[0], torch.arange(len(self.test[1])),
                                      features=False, layer=None, key="test")
            return float((logits.argmax(1) == self.test[1]).float().mean())
        return self.evaluate(*self.test)

    def evaluate(self, images: Tensor, labels: Tensor) -> float:
        """Top-1 accuracy on (images, labels)."""
        logits, _ = self.predict(images=images)
        return float((logits.argmax(1) == labels.to(logits.device)).float().mean())

    # --------------------------------------------------------------------------- training
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train(self.cache is None)  # a frozen extractor keeps its batch-norm stats
        self.train_module.train()
        cfg = self.config
        rank, world = self.rank, self.world
        idx = self.active.nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=self.generator)]  # the same on every rank
        if len(idx) % world:  # pad by repeating, so that every rank gets as many batches
            extra = world - len(idx) % world
            idx = torch.cat([idx, idx.repeat(math.ceil(extra / len(idx)))[:extra]])
        size = max(1, cfg.batch_size // world) * world  # the global batch of one step
        total_loss, correct, seen = 0.0, 0, 0
        steps = math.ceil(len(idx) / size)
        batches: Any = self._batches(idx, size)
        streamed: Iterator[Tensor] | None = None
        if self.stream is not None and self.cache is None:  # decode this rank's parts only
            batches = list(batches)
            streamed = self._streamed("train", self.stream, [b[rank::world] for b in batches])
        bar = tqdm(batches, total=steps, leave=False,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.rank == 0))
        for step, batch in enumerate(bar):
            part = batch[rank::world]  # this rank's examples of the global batch
            part_dev = part.to(self.device, non_blocking=True)
            y = self.labels.index_select(0, part_dev)
            if self.cache is not None:
                x = self.cache.index_select(0, part_dev)
            elif streamed is not None:
                x = self._to_input(next(streamed))
                if world == 1 or cfg.augment == "none":
                    x = augment_batch(x, cfg.augment, cfg.crop_padding, self.generator)
                else:  # the global batch's draws, this rank's rows (the others are zeros)
                    full = x.new_zeros((len(batch), *x.shape[1:]))
                    full[rank::world] = x
                    x = augment_batch(full, cfg.augment, cfg.crop_padding, self.generator)
                    x = x[rank::world]
            elif world == 1 or cfg.augment == "none":
                x = self._to_input(self.images.index_select(0, part_dev))
                x = augment_batch(x, cfg.augment, cfg.crop_padding, self.generator)
            else:  # augment the global batch so that every rank draws the same numbers
                x = self._to_input(self.images.index_select(0, batch.to(self.device)))
                x = augment_batch(x, cfg.augment, cfg.crop_padding, self.generator)
                x = x[rank::world]
            if self.cache is None:  # a random crop's gather returns (N, C, H, W) order
                x = x.contiguous(memory_format=self.memory_format)
            for cb in self._batch_transforms:
                x = cb.transform_batch(self, part_dev, x)
            with self._autocast():
                logits = self.train_module(x)
                loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)  # skips the step on inf/nan gradients (fp16)
            self.scaler.update()
            loss_value = float(loss.detach())
            total_loss += loss_value * len(part)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(part)
            if self._batch_ends:
                done = BatchEnd(epoch, step, part_dev, logits.detach().float(), loss_value)
                for cb in self._batch_ends:
                    cb.on_batch_end(self, done)
        if streamed is not None:
            next(streamed, None)  # the loader ends its pass (and checks that it is complete)
        if world > 1:
            for buf in self.model.buffers():  # batch-norm statistics: rank 0's everywhere
                dist.broadcast(buf, 0)
            sums = torch.tensor([total_loss, correct, seen], dtype=torch.float64,
                                device=self.device)
            total_loss, correct, seen = dist.all_reduce_sum(sums).tolist()
        return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1)}

    def _wrap(self) -> None:
        """Put :attr:`train_module` inside ``DistributedDataParallel`` when distributed."""
        if self.world > 1 and not isinstance(self.train_module, DistributedDataParallel):
            if self.train_module is not (self.model if self.head is None else self.head):
                raise EpicError("a defense wraps the trained module (dp-sgd does); it runs "
                                "in one process only: start it without torchrun")
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.train_module, device_ids=ids)

    def _configure(self, hook: str, callbacks: Any) -> TrainingParts:
        parts = TrainingParts(self.model, self.train_module, self.optimizer)
        for cb in callbacks:
            parts = getattr(cb, hook)(self, parts)
            if not isinstance(parts, TrainingParts):
                raise EpicError(f"{type(cb).__name__}.{hook} must return TrainingParts, got "
                                f"{type(parts).__name__}")
        return parts

    def _set_parts(self, parts: TrainingParts) -> None:
        self.model, self.train_module, self.optimizer = parts.model, parts.module, parts.optimizer

    def _replace_images(self, images: Tensor) -> None:
        """Train on ``images`` from now on (a callback's :meth:`Callback.training_images`);
        in transfer the images stay and the cached features are recomputed from these."""
        if self.images is None:
            raise EpicError("a defense replaces the training images, which needs them in "
                            "memory; drop --stream or choose another defense")
        if images.shape != self.images.shape or images.dtype != torch.uint8:
            raise EpicError(f"training_images must be uint8 {tuple(self.images.shape)}, got "
                            f"{images.dtype} {tuple(images.shape)}")
        if self.cache is not None:
            _, self.cache = self.predict(images=images.to(self.device), features=True)
        else:
            self.images = images.to(self.device)

    def _unwrap(self) -> None:
        if isinstance(self.train_module, DistributedDataParallel):
            self.train_module = self.train_module.module

    def fit(self, *, resume: bool = True) -> list[dict[str, Any]]:
        """Train until ``config.epochs``; with ``resume``, continue from ``out_dir``'s checkpoint.

        ``on_train_start`` and ``configure_training`` run first, before a checkpoint is
        loaded, so that the model, module and optimizer a callback returns wrapped (e.g. with
        group norm for batch norm) are what the checkpoint and the callbacks' own state are
        restored into. ``release_training`` unwraps them after the last epoch.

        Returns:
            :attr:`history`, one metrics dict per epoch.
        """
        self._call("on_train_start")
        self._set_parts(self._configure("configure_training", self.callbacks))
        if resume and self.out_dir is not None and (self.out_dir / CHECKPOINT).exists():
            self.load_checkpoint(self.out_dir / CHECKPOINT)
        self._wrap()  # after the resume; DistributedDataParallel broadcasts rank 0's weights
        main = self.rank == 0
        epochs = range(self.epoch, self.config.epochs)
        for epoch in epochs:
            t0 = time.perf_counter()
            self._call("on_epoch_start", epoch)
            for cb in self.callbacks:
                images = cb.training_images(self, epoch)
                if images is not None:
                    self._replace_images(images)
            metrics: dict[str, Any] = {"epoch": epoch + 1,
                                       "lr": self.optimizer.param_groups[0]["lr"],
                                       "active": int(self.active.sum())}
            metrics.update(self._train_epoch(epoch))
            self.scheduler.step()
            every = self.config.eval_every
            last = epoch + 1 == self.config.epochs
            if self.test is not None and (last or (every and (epoch + 1) % every == 0)):
                metrics["test_acc"] = self._test_accuracy()
            if self.target is not None:
                logits, _ = self.predict(images=self.target[None])
                metrics["target_pred"] = int(logits.argmax(1))
            metrics["seconds"] = time.perf_counter() - t0
            self._call("on_epoch_end", epoch, metrics)
            self.history.append(metrics)
            self.log_event("epoch", **metrics)
            self.epoch = epoch + 1
            if self.out_dir is not None and main:
                self.save_checkpoint(self.out_dir / CHECKPOINT)
                write_jsonl(self.out_dir / METRICS, self.events)
            if self.config.progress and main:
                shown = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items()}
                tqdm.write(" ".join(f"{k}={v}" for k, v in shown.items()))
        self._unwrap()
        self._set_parts(self._configure("release_training", reversed(self.callbacks)))
        self._call("on_train_end")
        self.close()  # a streamed split's DataLoader workers
        return self.history

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "active": self.active,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "events": self.events,
            "callbacks": {key: cb.state_dict() for key, cb in self._stateful.items()},
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write everything needed to resume, atomically."""
        state = self.state_dict()
        return atomic_write(path, lambda f: torch.save(state, f), binary=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (``weights_only`` load)."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError, EOFError, OSError, pickle.UnpicklingError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EpicError(f"cannot resume from {path}: {first}; delete it to start over or "
                            "use the same model and data") from None
        saved = state["callbacks"]
        if not isinstance(saved, dict) or sorted(saved) != sorted(self._stateful):
            names = sorted(saved) if isinstance(saved, dict) else "another version of epic"
            raise EpicError(f"cannot resume from {path}: it was written with the defense(s) "
                            f"{names}, this run has {sorted(self._stateful)}; use the same "
                            "--defense or a new --out")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when loss scaling is off
            self.scaler.load_state_dict(state["scaler"])
        self.active = state["active"].bool().cpu()
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.events = list(state["events"])
        for key, cb in self._stateful.items():
            cb.load_state_dict(saved[key])
