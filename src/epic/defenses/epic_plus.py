"""EPIC-plus: EPIC's idea (poisons are isolated) without its clean losses.

The paper's EPIC drops every facility-location medoid left alone in its cluster of logit
gradients. On real data that fires on ordinary hard examples too (5-30% of the clean training
set in our runs), and it misses bullseye and feature-collision poisons, whose logit gradients sit
among confused clean images. EPIC-plus keeps the schedule and the per-class view and changes
three things:

* **what is isolated**: the poisons of one target are crafted towards one point, so among the
  penultimate features (the right factor of the last-layer gradient ``g ⊗ [h, 1]``) they form a
  small group apart from the clean examples of their label. The default score outside
  fine-tuning
  (:func:`~epic.selection.group_isolation`) ranks that shape: a far ``k``-th same-class
  neighbour against a close 5th one, or a ``k``-th same-class neighbour far against the
  ``k``-th of any class. ``score="knn"`` keeps the first version's distance to the ``k``-th
  same-class neighbour in last-layer gradient space (:func:`~epic.selection.knn_isolation`);
* **isolation is a number, ranked across classes**: a round flags the ``fraction`` most
  isolated examples of the whole training set, not a set number per class;
* **only persistent isolation drops**: an example goes once it has been flagged in at least
  ``patience`` rounds and in at least half of the rounds so far, and never more than
  ``fraction`` of the training set in all (the most often flagged first). Poisons stay
  isolated round after round; most clean examples that a round flags are not flagged again.
  A model trained from scratch needs that (3 rounds): its first epochs' features are noise. A
  pretrained one (transfer, fine-tuning) does not (1 round): its features are meaningful from
  the first round, and waiting lets the poisons act during the high learning rate.

A second view catches what the features do not: a large perturbation leaves a texture that
the first convolution sees. Where the 1% of examples whose first-layer statistics sit farthest
from their class fall in one class far beyond chance (one target's poisons all carry one
label; natural oddities spread over the classes), that class's examples are also ranked by
that texture (``stem="auto"``). On CIFAR-10 at eps 8-16 no class stood out and nothing changes.

In transfer learning a third view: a feature-space poison (bullseye, feature collision) is
a clean image plus a few levels of noise optimised to move its features. A JPEG copy of it
loses most of that noise and its features move back, where a clean image's barely move; each
example is also ranked by that move (``squeeze``, quality 70). On CIFAR-10 bullseye it takes
the poisons removed from 58% to 98%; on 8x8 digits it carries nothing (the codec rewrites
every image), and the other ranks do the work.

A pretrained model also gets its first round before its first epoch (``warmup`` 0): a
fine-tuning run's first epoch at its highest learning rate is enough for the poisons to act.

When fine-tuning, the rank is another (``score="misfit"``, picked by ``score=None``): the
model's mean loss over an example and its nearest same-class neighbours. Gradient-matching
poisons act through their gradients, which grow with their loss; on the model they were
crafted on, a handful of high-loss poisons carries nearly all of the attack, and their
neighbours are other poisons. A hard clean example has a high loss too, but among ordinary
neighbours. Each class's scores are divided by the square root of their median
(``relative``): otherwise the classes the starting model fits worst fill the cap with their
clean images, and poisons of a well-fitted class rank below them. The fine-tuned model's own
head makes those losses meaningful from the first round; a transfer victim's head is new.

It works with any schedule, constant learning rate included (rounds then run to the end).
Once the cap is reached no later round could change what is kept (drops are permanent), so
the rounds stop there and cost nothing more.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _distributed as dist
from .._errors import EpicError
from .._validation import check_choice, check_fraction, check_int, check_number
from ..data.codec import jpeg_compress
from ..models.features import StemReached, capture_stem_stats
from ..selection import (
    GradientProxy,
    group_isolation,
    knn_isolation,
    neighbourhood_loss,
    percentile_rank,
    reference_loss,
    small_classes,
)
from .base import register_defense
from .epic import EpicDefense

__all__ = ["EpicPlus", "SCORES", "STEM_MODES", "class_concentration", "concentrated_class",
           "squeeze_shift", "stem_isolation", "top_flags", "with_rank", "with_reference",
           "with_texture"]

SCORES = ("group", "knn", "misfit")
_DEFAULT_K = {"group": 30, "knn": 50, "misfit": 10}
_DEFAULT_RELATIVE = 0.5  # misfit: each class's scores over the square root of their median
_SQUEEZE_TRANSFER = 70  # squeeze=None: the JPEG quality in transfer learning (else off)
STEM_MODES = ("auto", "always", "never")


def stem_isolation(stats: torch.Tensor, labels: torch.Tensor, *, k: int = 10) -> torch.Tensor:
    """(N,) percentile rank, in (0, 1], of each example's distance to its ``k``-th nearest
    same-class example in standardised first-layer statistics (:func:`capture_stem_stats`):
    a perturbation large enough to poison leaves a texture its class does not have.

    ``k`` holds for the largest class and shrinks with a smaller one's size (rounded up), so
    that a sparser class's distances do not rank it high as a whole; examples of classes of
    at most ``2 * k`` examples rank 0."""
    z = (stats - stats.mean(0)) / stats.std(0).clamp(min=1e-6)
    sizes = torch.bincount(labels)
    small = small_classes(labels, k)
    dist = torch.zeros(len(labels))
    for c in torch.unique(labels[~small]).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        kc = math.ceil(k * len(idx) / int(sizes.max()))
        dist[idx] = knn_isolation(z[idx], labels[idx], k=kc).cpu()
    ranks = torch.zeros(len(labels))
    if not small.all():
        ranks[~small] = percentile_rank(dist[~small])
    return ranks


def class_concentration(scores: torch.Tensor, labels: torch.Tensor, *, top: float = 0.01
                        ) -> tuple[int, int, float] | None:
    """The class most over-represented among the ``top`` share of ``scores``: ``(class, its
    count there, natural log of the one-sided binomial tail of that count given the class's
    share of the set)``; ``None`` when the top is the whole set."""
    n = len(scores)
    m = max(1, round(top * n))
    if n == 0 or m >= n:
        return None
    sizes = torch.bincount(labels, minlength=int(labels.max()) + 1).double()
    counts = torch.bincount(labels[scores.topk(m).indices], minlength=len(sizes))
    best = None
    for c in counts.nonzero().squeeze(1).tolist():
        ks = torch.arange(int(counts[c]), m + 1, dtype=torch.float64)
        tail = float(torch.distributions.Binomial(m, probs=sizes[c] / n).log_prob(ks)
                     .logsumexp(0))
        if best is None or tail < best[2]:
            best = (c, int(counts[c]), tail)
    return best


def concentrated_class(scores: torch.Tensor, labels: torch.Tensor, *, top: float = 0.01,
                       alpha: float = 1e-5) -> int | None:
    """The class that the ``top`` share of ``scores`` over-represents beyond chance, or
    ``None``: the one-sided binomial tail of its count among the top, given its share of the
    set, is below ``alpha`` (:func:`class_concentration`). One target's poisons all carry one
    label; the natural outliers of a clean set spread over the classes."""
    found = class_concentration(scores, labels, top=top)
    return found[0] if found is not None and found[2] < math.log(alpha) else None


def with_texture(scores: torch.Tensor, texture: torch.Tensor, labels: torch.Tensor,
                 mode: str = "auto") -> tuple[torch.Tensor, int | None]:
    """``scores`` with the texture rank ``texture`` (:func:`stem_isolation`) folded in as
    ``epic-plus``'s ``stem`` option ``mode`` does, and the class the test named (``"auto"``):
    the larger of the two in every class (``"always"``), in the :func:`concentrated_class`
    only (``"auto"``), or nowhere (``"never"``)."""
    if mode == "never":
        return scores, None
    if mode == "always":
        return torch.maximum(scores, texture), None
    named = concentrated_class(texture, labels)
    if named is None:
        return scores, None
    own = labels == named
    out = scores.clone()
    out[own] = torch.maximum(scores[own], texture[own])
    return out, named


def with_rank(scores: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``scores`` with a second score ``other`` folded in: the larger of the two percentile
    ranks among the scored examples (``scores`` above 0); the unscored (small classes) stay
    at 0."""
    scored = scores > 0
    out = torch.zeros_like(scores)
    if scored.any():
        out[scored] = torch.maximum(percentile_rank(scores[scored]),
                                    percentile_rank(other[scored].to(scores.dtype)))
    return out


def with_reference(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Group scores ``scores`` with the reference losses ``reference``
    (:func:`~epic.selection.reference_loss`) folded in as ``epic-plus``'s ``reference``
    option does (:func:`with_rank`)."""
    return with_rank(scores, reference)


def squeeze_shift(features: torch.Tensor, squeezed: torch.Tensor) -> torch.Tensor:
    """(N,) Euclidean distance between each example's features and its squeezed copy's
    (``epic-plus``'s ``squeeze`` option). A poison's perturbation was optimised to move its
    features; re-encoding the image removes most of it, so its features move back, far more
    than a clean image's do."""
    if features.shape != squeezed.shape:
        raise EpicError(f"features {tuple(features.shape)} and squeezed features "
                        f"{tuple(squeezed.shape)} must have the same shape")
    return (features.float() - squeezed.float()).norm(dim=1)


def _stem_pass(trainer: Any, idx: torch.Tensor) -> torch.Tensor | None:
    """First-layer statistics of the training examples ``idx`` in eval mode, each forward
    stopped at the first layer (every process computes all of them: one convolution)."""
    model, was_training = trainer.model, trainer.model.training
    model.eval()
    try:
        with torch.no_grad(), capture_stem_stats(model, stop=True) as cap:
            for x in trainer.inputs(idx):
                try:
                    model(x)
                except StemReached:
                    pass
    finally:
        model.train(was_training)
    stats = cap.stats()
    return None if stats is None else stats.cpu()


def top_flags(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """The ``(N,)`` mask of one round's flags: the ``budget`` highest ``scores``, except those
    at zero (a class the model fits gives zero gradients, which never count as isolated)."""
    flagged = torch.zeros(len(scores), dtype=torch.bool)
    if budget:
        top = scores.topk(budget).indices
        flagged[top[scores[top] > 0]] = True
    return flagged


@register_defense("epic-plus")
class EpicPlus(EpicDefense):
    """Drop the examples that stay among the most isolated of their class in gradient space.

    Args:
        fraction: share of the training set flagged per round, and the most ever dropped
            (default 0.03).
        score: what ranks an example. ``"group"``: in the penultimate features, the larger
            of the percentile ranks of ``d_k / d_5`` (a tight group far from the rest of its
            class) and ``d_k / a_k`` (among other classes), where ``d_j`` is the distance to
            the ``j``-th nearest same-class example and ``a_k`` to the ``k``-th of any class
            (:func:`~epic.selection.group_isolation`). ``"misfit"``: the model's mean loss
            over an example and its ``k - 1`` nearest same-class examples in the penultimate
            features (:func:`~epic.selection.neighbourhood_loss`: a spot of its class the
            model does not fit). ``"knn"``: ``d_k`` in last-layer gradient space
            (:func:`~epic.selection.knn_isolation`). ``None`` (default): ``"misfit"`` when
            fine-tuning (``scenario="finetune"``: the model's head is the pretrained one, so
            its losses mean something from the first round), ``"group"`` otherwise (a
            transfer victim's head is new; from scratch the poisons are fitted early).
            ``"group"`` and ``"misfit"`` need ``proxy="last-layer"``.
        k: for ``"group"`` and ``"knn"`` the far neighbour (default 30 and 50), above the
            number of poisons an attack usually plants per target, which are each other's
            nearest neighbours (docs/defenses.md); for ``"misfit"`` the neighbourhood's size
            (default 10).
        relative: with ``score="misfit"``, each class's scores are divided by their median to
            this power (default 0.5; 0: the plain mean). A poison of a class the model fits
            well then counts as much as a hard clean image of a class it fits badly: on
            CIFAR-10 the starting model's hardest classes otherwise fill the cap with their
            clean images (docs/results.md).
        spread: with ``score="group"``, an example also takes the median score of its
            ``spread`` nearest same-class examples when higher (0, the default: off). A
            target's poisons are one group, so the ones the ratios miss sit among the ones
            they catch (:func:`~epic.selection.group_isolation`).
        reference: with ``score="group"``, also rank each example by its label's loss under
            a linear head fit on the examples whose 200 nearest neighbours mostly carry their
            label (:func:`~epic.selection.reference_loss`), and score it by the larger of the
            two ranks (default False). Bullseye poisons that stay close to the clean examples
            of their own label, so that no isolation score sets them apart, still sit where
            a head of the clean examples reads another class.
        squeeze: JPEG quality (1-100) of a squeezed copy of every training image: each
            example is also ranked by how far its penultimate features move on that copy
            (:func:`squeeze_shift`), and scored by the larger of the two ranks; 0: off.
            A feature-space poison's few levels of crafted noise are what move its
            features; compression takes most of them off and the features move back.
            ``None`` (default): 70 in transfer learning (``scenario="transfer"``, where it
            was measured: 98-100% of the bullseye and feature-collision poisons removed on
            CIFAR-10, against 58-94% without), off otherwise (fine-tuning on CIFAR-10 it
            stopped 9 of 11 gradient-matching hits where the misfit score alone stopped 11),
            and off when the images are streamed. Costs one compression of the training
            set and one pass over the copies per round (one in all with a frozen
            extractor); needs the images in memory. docs/defenses.md.
        mirror: also rank each example by how far its penultimate features move on its
            horizontal mirror image (:func:`squeeze_shift`), folded in as ``squeeze`` is
            (default False). An extractor trained with flips barely moves a clean image's
            features when it is mirrored; a poison's crafted noise stops lining up and its
            features move back. Unlike a JPEG copy it is not a transform an attacker who
            crafts through the codec has adapted to (docs/results.md); it assumes
            flip-invariant classes (not digits or text). One pass over the flipped images
            per round (one in all with a frozen extractor); needs the images in memory.
        patience: rounds an example must have been flagged in (and in at least half of the
            rounds so far) before it is dropped. ``None`` (default): 3 when the model trains
            from scratch, 1 when it starts pretrained (``scenario`` transfer or finetune).
        warmup: epochs before the first round. ``None`` (default): 1 from scratch, 0 when the
            model starts pretrained (a round before any training step).
        interval, until: the round schedule, as for ``epic`` (default: every epoch until the
            last learning-rate decay, or to the end without one).
        proxy: ``"last-layer"`` (default) or ``"logits"``.
        proxy_pass: ``"separate"``, ``"training"`` (logit proxy only) or
            ``"training-features"``, as for ``epic``. ``None`` (default):
            ``"training-features"`` when the model starts pretrained (the same targets
            stopped as the separate pass on 60 fine-tuning targets, at almost no extra time;
            identical proxies with a frozen extractor), ``"separate"`` from scratch (where the
            training steps' features stopped fewer hits). docs/defenses.md.
        proxy_precision: the proxy pass's arithmetic, as for ``epic``.
        stem: also rank examples by how far their first-layer texture (per-channel mean and
            spread of the first convolution's rectified response) sits from their class's
            (:func:`stem_isolation`), and score an example by the larger of the two ranks.
            ``"auto"`` (default): only in a class that the top 1% of that rank over-represents
            beyond chance (:func:`concentrated_class`): a large perturbation on one target's
            poisons, all of one label; ``"always"``: in every class; ``"never"``. The statistics
            come from the separate pass (a round that reuses the training steps' features
            reuses the last pass's; a frozen extractor's are computed once, by a pass
            stopped at the first layer).
        seed: unused (the rule is deterministic); accepted so runs can pass their seed.
    """

    name = "epic-plus"

    def __init__(self, *, fraction: float = 0.03, score: str | None = None,
                 k: int | None = None,
                 spread: int = 0, patience: int | None = None,
                 warmup: int | None = None, interval: int = 1, until: int | None = None,
                 proxy: str = "last-layer", proxy_pass: str | None = None,
                 proxy_precision: str = "float32", stem: str = "auto", seed: int = 0,
                 record_proxies: bool = False, relative: float | None = None,
                 reference: bool = False, squeeze: int | None = None,
                 mirror: bool = False) -> None:
        super().__init__(warmup=1 if warmup is None else warmup, interval=interval,
                         until=until, proxy=proxy,
                         proxy_pass=proxy_pass or "separate",
                         proxy_precision=proxy_precision, seed=seed,
                         record_proxies=record_proxies)
        self.fraction = check_fraction("fraction", fraction)
        self._score = None if score is None else check_choice("score", score, SCORES)
        self._k = None if k is None else check_int("k", k, minimum=1)
        self.spread = check_int("spread", spread, minimum=0)
        self.reference = bool(reference)
        self._squeeze = None if squeeze is None else check_int("squeeze", squeeze, minimum=0,
                                                                maximum=100)
        self.squeeze = self._squeeze or 0  # 0: off; resolved at the start, as patience
        self._squeezed: torch.Tensor | None = None  # the JPEG copies, uint8 on the CPU
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None  # (features, shift)
        if not isinstance(mirror, bool):
            raise EpicError(f"mirror must be true or false, got {mirror!r}")
        self.mirror = mirror
        self._mirror_shift: tuple[torch.Tensor, torch.Tensor] | None = None  # the same
        self._relative = None if relative is None else check_number("relative", relative,
                                                                     minimum=0)
        # until the run starts, score=None reads as "group" (its pick but in fine-tuning);
        # relative is checked against the score picked then
        self._resolve(self._score or "group", final=self._score is not None)
        self._proxy_pass = proxy_pass  # None: resolved at the start, as patience
        self._warmup_given = warmup
        self._patience = None if patience is None else check_int("patience", patience, minimum=1)
        self.patience = 3 if patience is None else self._patience  # resolved at the start
        self._memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.stem = check_choice("stem", stem, STEM_MODES)
        self._stem_stats: torch.Tensor | None = None  # the last pass's, (N, 2C) on the CPU
        self.votes: torch.Tensor | None = None  # rounds each example was flagged in
        self.voted = 0  # rounds so far

    def on_train_start(self, trainer: Any) -> None:
        if self._warmup_given is None:  # the schedule is built from it in super()
            self._warmup = 0 if trainer.config.pretrained else 1
        super().on_train_start(trainer)
        if self._patience is None:
            self.patience = 1 if trainer.config.pretrained else 3
        if self._proxy_pass is None:
            self.proxy_pass = "training-features" if trainer.config.pretrained else "separate"
        if self._score is None:
            self._resolve("misfit" if trainer.config.scenario == "finetune" else "group")
        self._squeezed = self._shift = None  # this run's images: copies made at its first round
        self._mirror_shift = None
        if self._squeeze is None:
            transfer = trainer.config.scenario == "transfer" and trainer.images is not None
            self.squeeze = _SQUEEZE_TRANSFER if transfer else 0
        elif self._squeeze and trainer.images is None:
            raise EpicError("squeeze compresses the training images, and this run streams "
                            "them from files; load them in memory (no --stream) or pass "
                            "squeeze=0")
        if self.mirror and trainer.images is None:
            raise EpicError("mirror flips the training images, and this run streams them; "
                            "train from images in memory (no --stream) or pass mirror=False")

    def check_config(self, config: Any) -> None:
        if self._score is None:  # what on_train_start will pick
            self._checked("misfit" if config.scenario == "finetune" else "group")

    def _resolve(self, score: str, final: bool = True) -> None:
        """Set :attr:`score`, :attr:`k` and :attr:`relative` (their defaults unless given)."""
        self.score, self.k, self.relative = self._checked(score, final)

    def _checked(self, score: str, final: bool = True) -> tuple[str, int, float | None]:
        """``(score, k, relative)`` for ``score``, with the other options checked together
        (``relative`` only when ``final``: the score is the run's)."""
        if score in ("group", "misfit") and self.proxy != "last-layer":
            raise EpicError(f"score='{score}' reads penultimate features; use "
                            "proxy='last-layer' or score='knn'")
        k = _DEFAULT_K[score] if self._k is None else self._k
        if score == "group" and k < 6:  # above its near neighbour, the 5th
            picked = (" (what score=None picks outside fine-tuning); give score='misfit' or "
                      "'knn' for a smaller k") if self._score is None else ""
            raise EpicError(f"k must be >= 6 with score='group', got {k}{picked}")
        if self.spread and score != "group":
            picked = " (fine-tuning picks it)" if self._score is None else ""
            raise EpicError(f"spread applies to score='group', not '{score}'{picked}; pass "
                            "score='group' or spread=0")
        if self.reference and score != "group":
            picked = " (fine-tuning picks it)" if self._score is None else ""
            raise EpicError(f"reference applies to score='group', not '{score}'{picked}; pass "
                            "score='group' or leave reference out")
        if self.spread > k:
            raise EpicError(f"spread must be <= k ({k}), got {self.spread}")
        if score != "misfit":
            if self._relative is not None and final:
                picked = (" (what the default score picks outside fine-tuning)"
                          if self._score is None else "")
                raise EpicError(f"relative applies to score='misfit', not '{score}'{picked}; "
                                "pass score='misfit' or leave relative out")
            return score, k, None
        return score, k, _DEFAULT_RELATIVE if self._relative is None else self._relative

    def _budget(self, n: int) -> int:
        """The cap: examples flagged per round and dropped in all, of ``n``."""
        return int(self.fraction * n)

    def _finished(self, trainer: Any) -> bool:
        """The cap is reached: drops are permanent and none can be added, so a later round
        would only count votes (skipping it changes nothing but the time)."""
        return int((~trainer.active).sum()) >= self._budget(len(trainer.active))

    def _logits(self, trainer: Any, idx: torch.Tensor) -> tuple[torch.Tensor, Any]:
        separate = self._rows is None
        out = self._stem_logits(trainer, idx)
        if self.squeeze or self.mirror:
            feats = out[1] if separate and out[1] is not None else trainer.predict(
                idx, features=True, precision=self.proxy_precision)[1]
            if self.squeeze:
                if self._squeezed is None:  # the JPEG copies: made once per run
                    self._squeezed = jpeg_compress(trainer.images.cpu(), self.squeeze)
                self._shift = self._copy_shift(trainer, feats, self._shift,
                                               lambda: self._squeezed)
            if self.mirror:
                self._mirror_shift = self._copy_shift(trainer, feats, self._mirror_shift,
                                                      lambda: trainer.images.flip(-1))
        return out

    def _copy_shift(self, trainer: Any, feats: torch.Tensor,
                    last: tuple[torch.Tensor, torch.Tensor] | None,
                    copies: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(feats, shift)``: :func:`squeeze_shift` of every example, from its eval-mode
        features ``feats`` and those of its copy in ``copies()`` (a JPEG copy for
        ``squeeze``, the mirror image for ``mirror``); ``last`` is reused while the features
        do not change (a frozen extractor's)."""
        if last is not None and torch.equal(last[0], feats):
            return last
        moved = trainer.predict(images=copies(), features=True,
                                precision=self.proxy_precision)[1]
        return feats, squeeze_shift(feats, moved).cpu()

    def _stem_logits(self, trainer: Any, idx: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The round's logits and features, and the first-layer statistics for ``stem``."""
        if self.stem == "never":
            return super()._logits(trainer, idx)
        with capture_stem_stats(trainer.model) as cap:
            out = super()._logits(trainer, idx)
        stats = cap.stats()
        if cap.module is not None and dist.is_distributed():  # each rank ran its share of
            stats = dist.all_gather_varlen(  # the batches (none, when they are fewer)
                stats if stats is not None else torch.empty(0, device=trainer.device))
            stats = stats if len(stats) else None
        if stats is not None and len(stats) == len(idx):  # a full pass ran the model
            self._stem_stats = stats.cpu()
        elif self._stem_stats is None:  # transfer's cached extractor: once
            self._stem_stats = _stem_pass(trainer, idx)
        return out

    def _decide(self, trainer: Any, proxies: GradientProxy, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        n = len(labels)
        if self.score == "group":  # the features' bias column of ones changes no distance
            scores = self._group_scores(proxies.features, labels)
        elif self.score == "misfit":
            scores = self._misfit_ranks(proxies, labels)
        else:
            scores = knn_isolation(proxies, labels, k=self.k).cpu()
            scores[small_classes(labels.cpu(), self.k)] = 0.0
        for shift in (self._shift, self._mirror_shift):  # squeeze, mirror
            if shift is not None and len(shift[1]) == n:
                scores = with_rank(scores, shift[1])
        stem_class = None
        if self.stem != "never" and self._stem_stats is not None and len(self._stem_stats) == n:
            labs = labels.cpu()
            if self.score == "knn":  # distances: ranked, to share the texture rank's scale
                scores = percentile_rank(scores).masked_fill_(scores == 0, 0.0)
            scores, stem_class = with_texture(scores, stem_isolation(self._stem_stats, labs),
                                              labs, self.stem)
        budget = self._budget(n)
        flagged = top_flags(scores, budget)
        if self.votes is None or len(self.votes) != n:
            self.votes, self.voted = torch.zeros(n, dtype=torch.long), 0
        self.votes += flagged
        self.voted += 1
        out = ~trainer.active.cpu()
        room = budget - int(out.sum())
        ready = ((self.votes >= self.patience) & (2 * self.votes >= self.voted)
                 & ~out).nonzero().squeeze(1)
        if room < len(ready):  # the cap: the most often flagged (then most isolated) first
            order = self.votes[ready].double() + scores[ready].double() / (
                1 + float(scores.max()))
            ready = ready[order.topk(max(room, 0)).indices]
        drop = torch.cat([out.nonzero().squeeze(1), ready]).sort().values
        return drop, {"flagged_now": int(flagged.sum()), "patience": self.patience,
                      "score": self.score, "k": self.k, "relative": self.relative,
                      "stem_class": -1 if stem_class is None else stem_class}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "score": self.score, "k": self.k,
                "relative": self.relative, "squeeze": self.squeeze, "mirror": self.mirror}

    def _misfit_ranks(self, proxies: GradientProxy, labels: torch.Tensor) -> torch.Tensor:
        """Percentile ranks of :func:`~epic.selection.neighbourhood_loss` of the label's
        cross-entropy, read off the logit proxy (``p_y = 1 + (softmax(z) - onehot(y))_y``,
        known to float32's resolution near 1, 2**-24: a loss is cut at ``24 log 2``, about
        16.6, so every example the model gets that wrong counts the same); 0 where unscored
        (small classes)."""
        labs = labels.to(proxies.vectors.device)
        p_y = 1.0 + proxies.vectors.float().gather(1, labs[:, None]).squeeze(1)
        loss = -p_y.clamp(min=2.0 ** -24).log()
        raw = neighbourhood_loss(proxies.features, loss, labs, k=self.k,
                                 relative=self.relative).cpu()
        return percentile_rank(raw).masked_fill_(raw == 0, 0.0)

    def _group_scores(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:func:`group_isolation` of the features, reused while they do not change (a frozen
        extractor in transfer learning gives the same features every round)."""
        if self._memo is not None:
            feats, labs, scores = self._memo
            if torch.equal(feats, features) and torch.equal(labs, labels):  # False on shapes
                return scores
        scores = group_isolation(features, labels, k=self.k, spread=self.spread).cpu()
        if self.reference:
            scores = with_reference(scores, reference_loss(features, labels).cpu())
        self._memo = (features, labels, scores)
        return scores

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "votes": self.votes, "voted": self.voted,
                "stem_stats": self._stem_stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.votes = None if state.get("votes") is None else state["votes"].cpu()
        self.voted = int(state.get("voted", 0))
        stats = state.get("stem_stats")
        self._stem_stats = None if stats is None else stats.cpu()
