"""EPIC-plus: k-NN isolation ranked across classes, dropped only when it persists, capped."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import small_model
from epic import EpicError
from epic.defenses import EpicPlus, create_defense
from epic.defenses.epic_plus import (
    concentrated_class,
    squeeze_shift,
    stem_isolation,
    top_flags,
    with_rank,
)
from epic.models import StemReached, capture_stem_stats, create_model, find_stem
from epic.selection import (
    GradientProxy,
    group_isolation,
    knn_isolation,
    neighbourhood_loss,
    percentile_rank,
    reference_loss,
)
from epic.training import TrainConfig, Trainer


def planted(n_per_class=100, group=4, seed=0):
    """Two classes of tight Gaussian points; class 0 also holds a small far group (the
    poisons, isolated together) at the end."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n_per_class, 6, generator=g),
                   torch.randn(n_per_class, 6, generator=g) * 5 + 20,  # another scale
                   torch.randn(group, 6, generator=g) * 0.1 + 12])
    y = torch.cat([torch.zeros(n_per_class), torch.ones(n_per_class),
                   torch.zeros(group)]).long()
    return x, y, torch.arange(2 * n_per_class, 2 * n_per_class + group)


def test_knn_isolation_is_the_kth_same_class_neighbour_distance():
    x, y, group = planted()
    s = knn_isolation(x, y, k=5, block=7)  # several row blocks
    assert set(s.topk(len(group)).indices.tolist()) == set(group.tolist())
    for i in (0, 150, int(group[0])):
        same = (y == y[i]).nonzero().squeeze(1)
        d = (x[same] - x[i]).norm(dim=1).sort().values  # d[0] is the point itself
        assert float(s[i]) == pytest.approx(float(d[5]), rel=1e-4, abs=1e-4)
    assert torch.allclose(knn_isolation(GradientProxy(x), y, k=5), s)
    with pytest.raises(EpicError, match="k must be >= 1"):
        knn_isolation(x, y, k=0)


def test_group_isolation_ranks_a_tight_far_group_and_a_point_among_another_class_first():
    g = torch.Generator().manual_seed(0)
    x, y, group = planted(group=6)
    # a wide class-0 point placed inside class 1's cloud: far from its own class, among others
    stray = torch.randn(1, 6, generator=g) * 5 + 20
    x, y = torch.cat([x, stray]), torch.cat([y, torch.zeros(1, dtype=torch.long)])
    s = group_isolation(x, y, k=20, near=5, block=9)  # several row blocks
    assert s.shape == (len(y),) and float(s.min()) > 0 and float(s.max()) == 1.0
    top = set(s.topk(len(group) + 1).indices.tolist())
    assert top == set(group.tolist()) | {len(y) - 1}
    # the same points scaled and shifted: ratios of distances, so the same ranks (up to the
    # rounding of near-ties)
    moved = group_isolation(x * 3 + 1, y, k=20, near=5)
    assert float((moved - s).abs().max()) <= 3 / len(y)
    # a singleton class scores 0; bad k or near say which
    assert float(group_isolation(x, torch.cat([y[:-1], torch.tensor([2])]), k=20)[-1]) == 0
    with pytest.raises(EpicError, match="near must be < k"):
        group_isolation(x, y, k=5, near=5)
    with pytest.raises(EpicError, match="k must be >= 2"):
        group_isolation(x, y, k=1)


def test_group_isolation_spread_lifts_an_example_to_its_neighbours_median_score():
    g = torch.Generator().manual_seed(1)
    x, y, group = planted(group=8)
    x[group[:3]] = torch.randn(3, 6, generator=g) * 0.4 + 12  # looser members of the group
    base = group_isolation(x, y, k=20, near=5)
    s = group_isolation(x, y, k=20, near=5, spread=4, block=11)
    for i in (0, 5, 150, *group.tolist()):  # by hand: the 4 nearest of the same class
        same = ((y == y[i]) & (torch.arange(len(y)) != i)).nonzero().squeeze(1)
        nearest = same[(x[same] - x[i]).norm(dim=1).argsort()[:4]]
        expected = max(float(base[i]), float(base[nearest].median()))
        assert float(s[i]) == pytest.approx(expected, abs=1e-6), i
    assert bool((s >= base).all()) and set(s.topk(8).indices.tolist()) == set(group.tolist())
    with pytest.raises(EpicError, match="spread must be <= k"):
        group_isolation(x, y, k=20, spread=21)
    with pytest.raises(EpicError, match="spread applies to score='group'"):
        EpicPlus(score="knn", spread=3)
    with pytest.raises(EpicError, match="reference applies to score='group', not 'knn'; "):
        EpicPlus(score="knn", reference=True)


def test_epic_plus_group_score_drops_the_feature_space_group_not_the_gradient_outlier():
    x, y, group = planted(group=6)
    # logit gradients: the group looks ordinary, one clean point (7) is the gradient outlier
    vectors = torch.full((len(y), 2), 0.1)
    vectors[7] = 5.0
    plus = EpicPlus(fraction=0.03, patience=1)  # the default: score="group", k=30
    trainer = SimpleNamespace(active=torch.ones(len(y), dtype=torch.bool))
    dropped, _ = plus._decide(trainer, GradientProxy(vectors, x), y)
    assert plus.k == 30 and set(group.tolist()) <= set(dropped.tolist())
    assert 7 not in dropped.tolist() and len(dropped) <= int(0.03 * len(y))
    knn = EpicPlus(fraction=0.03, score="knn", patience=1)
    dropped, _ = knn._decide(trainer, GradientProxy(vectors, x), y)
    assert knn.k == 50 and 7 in dropped.tolist()
    with pytest.raises(EpicError, match="score='group' reads penultimate features"):
        EpicPlus(proxy="logits")
    with pytest.raises(EpicError, match="k must be >= 6"):
        EpicPlus(k=5)


def rounds(defense, x, y, flags):
    """Run ``_decide`` once per entry of ``flags`` (extra points to push far in that round),
    applying its drops to a fake trainer's active mask as the defense does."""
    trainer = SimpleNamespace(active=torch.ones(len(y), dtype=torch.bool))
    drops = []
    for extra in flags:
        xr = x.clone()
        xr[extra] += 50  # a clean point isolated in this round only
        dropped, _ = defense._decide(trainer, GradientProxy(xr), y)
        trainer.active = torch.ones(len(y), dtype=torch.bool)
        trainer.active[dropped] = False
        drops.append(set(dropped.tolist()))
    return drops


def test_a_round_flags_its_top_scores_but_never_a_zero_score():
    scores = torch.tensor([0.5, 0.0, 3.0, 0.0, 2.0, 1.0])
    assert top_flags(scores, 2).nonzero().squeeze(1).tolist() == [2, 4]
    # a budget wider than the isolated examples: the zeros (fitted, zero gradients) stay
    assert top_flags(scores, 5).nonzero().squeeze(1).tolist() == [0, 2, 4, 5]
    assert not top_flags(scores, 0).any()


def test_only_isolation_that_persists_drops_and_the_cap_holds():
    x, y, group = planted()
    transient = torch.tensor([3])
    plus = EpicPlus(fraction=0.03, score="knn", k=5, patience=2)  # 6 of 204 flagged per round
    first, second, third = rounds(plus, x, y, [transient, [], []])
    assert first == set()  # flagged once: nothing drops yet
    assert set(group.tolist()) <= second and 3 not in second  # the transient point stays
    assert second <= third and len(third) <= int(0.03 * len(y))
    # flagged in 2 rounds, but in fewer than half of the rounds so far: kept
    late = EpicPlus(fraction=0.03, score="knn", k=5, patience=2)
    drops = rounds(late, x, y, [transient, [], [], [], transient])
    assert int(late.votes[3]) == 2 and all(3 not in d for d in drops)
    capped = EpicPlus(fraction=0.015, score="knn", k=5, patience=1)  # room for 3 of the 4
    (once,) = rounds(capped, x, y, [[]])
    assert len(once) == 3 and once <= set(group.tolist())


@pytest.mark.parametrize("scenario, given, expected", [
    ("scratch", None, 3), ("transfer", None, 1), ("finetune", None, 1), ("finetune", 2, 2)])
def test_patience_defaults_to_3_from_scratch_and_1_from_a_pretrained_model(
        scenario, given, expected):
    plus = EpicPlus(fraction=0.03, score="knn", k=5, patience=given)
    config = TrainConfig(scenario=scenario, epochs=8)
    plus.on_train_start(SimpleNamespace(config=config, images=None))
    assert plus.patience == expected
    # and so does the warm-up: a pretrained model gets a round before its first epoch
    assert plus.schedule.epochs(8)[0] == (0 if scenario != "scratch" else 1)
    assert plus.schedule.until == config.milestone_epochs()[-1]  # up to the last decay
    fixed = EpicPlus(warmup=2, until=6)
    fixed.on_train_start(SimpleNamespace(config=config, images=None))
    assert fixed.schedule.epochs(8) == [2, 3, 4, 5, 6]
    # the rule follows: with patience 1 an example flagged in the first round drops in it
    x, y, group = planted()
    if expected == 1:
        (first,) = rounds(plus, x, y, [[]])
        assert set(group.tolist()) <= first


@pytest.mark.parametrize("scenario, given, expected", [
    ("scratch", None, "separate"), ("transfer", None, "training-features"),
    ("finetune", None, "training-features"), ("finetune", "separate", "separate"),
    ("scratch", "training-features", "training-features")])
def test_proxy_pass_defaults_to_the_training_steps_features_for_a_pretrained_model(
        scenario, given, expected):
    plus = EpicPlus(proxy_pass=given)
    plus.on_train_start(SimpleNamespace(config=TrainConfig(scenario=scenario, epochs=8),
                                        images=None))
    assert plus.proxy_pass == expected
    with pytest.raises(EpicError, match="proxy_pass"):
        EpicPlus(proxy_pass="features")


class _EveryRound(EpicPlus):
    def _finished(self, trainer):
        return False


def test_rounds_stop_once_the_cap_is_reached_and_training_is_unchanged(digits):
    """Past the cap no round can drop or restore anything, so skipping the rest of the rounds
    (and their proxy passes) must leave the run bit for bit the same."""
    train, _ = digits
    runs = {}
    for cls in (EpicPlus, _EveryRound):
        plus = cls(fraction=0.02, patience=1)
        trainer = Trainer(small_model(), train, callbacks=[plus], config=TrainConfig(
            epochs=6, batch_size=64, lr=0.05, augment="none", progress=False))
        trainer.fit()
        runs[cls] = (plus, trainer)
    (skip, t_skip), (every, t_every) = runs[EpicPlus], runs[_EveryRound]
    cap = int(0.02 * len(train.labels))
    assert int((~t_skip.active).sum()) == cap and torch.equal(t_skip.active, t_every.active)
    assert len(skip.rounds) < len(every.rounds) == 5  # rounds at epochs 1-5
    weights = zip(t_skip.model.state_dict().values(), t_every.model.state_dict().values(),
                  strict=True)
    for a, b in weights:
        assert torch.equal(a, b)


def test_epic_plus_runs_without_a_decay_to_the_end_and_drops_at_most_its_fraction(digits):
    train, _ = digits
    plus = create_defense("epic-plus", fraction=0.05)
    trainer = Trainer(small_model(), train, callbacks=[plus], config=TrainConfig(
        epochs=5, batch_size=64, lr=0.05, augment="none", progress=False, milestones=()))
    trainer.fit()
    assert [r["epoch"] - 1 for r in plus.rounds] == [1, 2, 3, 4]
    assert int((~trainer.active).sum()) <= int(0.05 * len(train.labels))
    state = plus.state_dict()
    again = EpicPlus()
    again.load_state_dict(state)
    assert torch.equal(again.votes, plus.votes) and again.voted == plus.voted == 4
    with pytest.raises(EpicError, match="fraction must be a number"):
        EpicPlus(fraction="0.03")


def test_a_fine_tuning_run_gets_its_first_round_before_any_training_step(digits):
    """From a pretrained model the first round comes before epoch 0 (no features recorded
    yet, so it runs the separate pass); later rounds use the training steps' features."""
    train, _ = digits
    plus = create_defense("epic-plus", fraction=0.02)
    trainer = Trainer(small_model(), train, callbacks=[plus], config=TrainConfig(
        scenario="finetune", epochs=4, batch_size=64, lr=0.02, augment="none",
        progress=False, milestones=()))
    trainer.fit()
    assert [r["epoch"] - 1 for r in plus.rounds] == [0]  # the cap is full after it
    assert int((~trainer.active).sum()) == int(0.02 * len(train.labels))
    assert plus.patience == 1 and plus.proxy_pass == "training-features"
    # the score fine-tuning picks is in the run's summary and in every round's record
    assert plus.summary()["score"] == "misfit" and plus.summary()["k"] == 10
    assert plus.rounds[0]["score"] == "misfit"
    # the same defense reused from scratch picks its score again
    plus.on_train_start(SimpleNamespace(config=TrainConfig(scenario="scratch", epochs=8)))
    assert (plus.score, plus.k) == ("group", 30)



def test_concentrated_class_is_the_class_its_top_scores_over_represent_beyond_chance():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2000) % 10
    scores = torch.rand(2000, generator=g)
    assert concentrated_class(scores, y) is None  # top 1% (20) spread over the classes
    planted_ = (y == 3).nonzero().squeeze(1)[:15]
    scores[planted_] += 1  # 15 of the top 20 in class 3, where chance puts 2
    assert concentrated_class(scores, y) == 3
    # as many outliers spread over all classes are natural, not a target's
    spread = torch.rand(2000, generator=g)
    spread[torch.arange(0, 150, 10) + torch.arange(15) % 10] += 1
    assert concentrated_class(spread, y) is None
    # a class that is most of the set is not over-represented by holding most of the top
    skewed = torch.cat([torch.zeros(1800), torch.ones(200)]).long()
    assert concentrated_class(torch.rand(2000, generator=g), skewed) is None


def test_stem_isolation_ranks_a_group_of_another_texture_first_within_its_class():
    g = torch.Generator().manual_seed(1)
    stats = torch.randn(2000, 8, generator=g)
    y = torch.arange(2000) % 4
    poisons = (y == 2).nonzero().squeeze(1)[:20]
    stats[poisons] += torch.randn(20, 8, generator=g) * 2 + 6  # textures the class lacks
    s = stem_isolation(stats, y, k=10)
    assert s.shape == (2000,) and float(s.max()) == 1.0 and float(s.min()) > 0
    assert set(s.topk(20).indices.tolist()) == set(poisons.tolist())
    assert concentrated_class(s, y) == 2  # the top 1% (20) all in class 2: p = 0.25^20
    # the same count in a set too small for it to be unlikely by chance: no class
    assert concentrated_class(s[:400], y[:400]) is None


def test_stem_statistics_are_the_rectified_first_convolutions_channel_mean_and_spread():
    model = small_model().eval()
    x = torch.rand(5, 1, 8, 8)
    stem = find_stem(model)
    assert isinstance(stem, torch.nn.BatchNorm2d)  # the norm right after the first conv
    with torch.no_grad(), capture_stem_stats(model) as cap:
        model(x)
        model(x[:2])
    with torch.no_grad():  # by hand, outside the hook: normalise, conv, norm, rectify
        net = model.net if hasattr(model, "net") else model
        a = net.features[1](net.features[0](model.normalize(x) if hasattr(model, "normalize")
                                             else x)).clamp(min=0).flatten(2)
    stats = cap.stats()
    assert stats.shape == (7, 2 * a.shape[1])  # both passes, in call order
    assert torch.allclose(stats[:5], torch.cat([a.mean(2), a.std(2)], 1), atol=1e-5)
    assert torch.allclose(stats[5:], stats[:2], atol=1e-6)
    with torch.no_grad(), capture_stem_stats(model, stop=True) as cap:  # first layer only
        with pytest.raises(StemReached):
            model(x)
    assert torch.allclose(cap.stats(), stats[:5], atol=1e-6)
    mlp = create_model("mlp", num_classes=10, in_channels=1, image_size=8)
    assert find_stem(mlp) is None
    with capture_stem_stats(mlp) as cap:
        mlp(x)
    assert cap.stats() is None


def with_sign_noise(data, *, label, count, level, seed):
    """``data`` with ``+-level`` pixel noise (random signs, clamped to 0-255) on its first
    ``count`` images of class ``label``, like one target's perturbed poisons; and their
    indices."""
    g = torch.Generator().manual_seed(seed)
    noisy = (data.labels == label).nonzero().squeeze(1)[:count]
    images = data.images.clone()
    noise = (torch.randint(0, 2, (count, *images.shape[1:]), generator=g) * 2 - 1) * level
    images[noisy] = (images[noisy].int() + noise).clamp(0, 255).to(images.dtype)
    return dataclasses.replace(data, images=images), noisy


@pytest.mark.parametrize("scenario", ["scratch", "transfer"])
def test_epic_plus_auto_adds_texture_in_the_class_that_a_large_perturbation_marks(
        digits, scenario):
    """13 images of class 0 with +-0.5 noise (like a large-eps attack on one target's
    poisons): ``stem="auto"`` finds their class in every round and drops most of them;
    ``"never"`` ranks penultimate features only, where they do not stand out. In transfer
    the frozen extractor's statistics come from one pass stopped at the first layer."""
    train, _ = digits
    marked, noisy = with_sign_noise(train, label=0, count=13, level=128, seed=0)
    dropped = {}
    for mode in ("auto", "never"):
        plus = create_defense("epic-plus", fraction=0.02, stem=mode)
        trainer = Trainer(small_model(), marked, callbacks=[plus], config=TrainConfig(
            epochs=5, batch_size=64, lr=0.05, augment="none", progress=False,
            scenario=scenario))
        trainer.fit()
        dropped[mode] = int((~trainer.active[noisy]).sum())
        if mode == "auto":
            assert {r["stem_class"] for r in plus.rounds} == {0}
    assert dropped["auto"] >= 7 and dropped["never"] <= 2  # measured: 8 (9 transfer), 0
    with pytest.raises(EpicError, match="stem"):
        EpicPlus(stem="on")


def test_group_isolation_leaves_classes_of_at_most_2k_examples_unscored():
    """A class too small to hold a group apart from the rest of it (here 12 points scattered
    among class 0, like a rare class the model has not learned) is not scored; the other
    classes are still scored, the planted group first."""
    g = torch.Generator().manual_seed(2)
    x, y, group = planted(group=6)
    rare = torch.randn(12, 6, generator=g)  # inside class 0's cloud
    s = group_isolation(torch.cat([x, rare]), torch.cat([y, torch.full((12,), 2)]), k=20)
    assert bool((s[len(y):] == 0).all())
    assert set(s.topk(len(group)).indices.tolist()) == set(group.tolist())
    assert bool((s[:len(y)] > 0).all())
    assert bool((group_isolation(x[:40], y[:40], k=20) == 0).all())  # 2k examples
    assert bool((group_isolation(x[:41], y[:41], k=20) > 0).all())  # 2k + 1


def test_knn_score_is_ranked_before_the_texture_rank_joins_it(digits, monkeypatch):
    """``score="knn"`` gives distances in the proxy's units; folded into the texture's
    percentile rank they are ranked first, so the larger of the two means the same with
    either proxy (raw last-layer distances of 1-25 made the texture rank never count)."""
    import epic.defenses.epic_plus as module

    seen = []

    def spy(scores, texture, labels, mode="auto"):
        seen.append((float(scores.min()), float(scores.max())))
        return module.with_texture.__wrapped__(scores, texture, labels, mode)

    spy.__wrapped__ = module.with_texture
    monkeypatch.setattr(module, "with_texture", spy)
    plus = EpicPlus(score="knn", stem="always", patience=1)
    Trainer(small_model(), digits[0], callbacks=[plus], config=TrainConfig(
        epochs=2, batch_size=64, lr=0.05, augment="none", progress=False,
        milestones=())).fit()
    assert seen and all(0 <= lo and hi <= 1 for lo, hi in seen)


def test_texture_and_knn_ranks_leave_small_classes_unscored():
    """The texture rank (k=10) leaves a class of at most 20 examples at 0, as the group score
    does: with its k-th neighbour its farthest member, a rare class ranked top as a whole and
    the class test then named it (found dropping a whole 5-example digits class)."""
    g = torch.Generator().manual_seed(3)
    stats = torch.cat([torch.randn(200, 4, generator=g), torch.randn(5, 4, generator=g) * 9])
    labels = torch.cat([torch.zeros(200), torch.ones(5)]).long()
    ranks = stem_isolation(stats, labels)
    assert bool((ranks[200:] == 0).all()) and float(ranks[:200].min()) > 0
    assert concentrated_class(ranks, labels) is None


def test_texture_rank_does_not_single_out_a_smaller_class_of_the_same_texture():
    """Nine classes of 135 and one of 40, every texture from one distribution: with one k for
    all, the sparser class's 10th-neighbour distances are larger and it crowds the top 1%
    (the class test's tail reaches e^-10); with k scaled to the class's size it does not."""
    from epic.defenses.epic_plus import class_concentration
    from epic.selection import percentile_rank

    labels = torch.cat([torch.full((135,), c) for c in range(9)] + [torch.full((40,), 9)])
    fixed_k = scaled_k = 0
    for seed in range(5):
        stats = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(seed))
        z = (stats - stats.mean(0)) / stats.std(0)
        for ranks, hits in ((percentile_rank(knn_isolation(z, labels, k=10)), "fixed"),
                            (stem_isolation(stats, labels), "scaled")):
            c, _, tail = class_concentration(ranks, labels)
            if c == 9 and tail < -4.5:
                fixed_k += hits == "fixed"
                scaled_k += hits == "scaled"
    assert fixed_k >= 3 and scaled_k == 0


def misfit_planted(seed=0):
    """Class 0: a blob of 60 well-fitted points (loss 0.1), one hard clean point inside it
    (loss 5) and a tight group of 6 apart from it whose losses are high (3); class 1: a blob
    of 60 fitted points. Returns features, losses, labels and the group's indices."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(60, 4, generator=g), torch.randn(60, 4, generator=g) + 30,
                   torch.randn(6, 4, generator=g) * 0.1 + 8])
    y = torch.cat([torch.zeros(60), torch.ones(60), torch.zeros(6)]).long()
    loss = torch.full((126,), 0.1)
    loss[5] = 5.0  # hard, alone among fitted neighbours
    loss[120:] = 3.0
    return x, loss, y, torch.arange(120, 126)


def test_neighbourhood_loss_ranks_a_group_the_model_does_not_fit_above_a_hard_example():
    x, loss, y, group = misfit_planted()
    score = neighbourhood_loss(x, loss, y, k=5)
    assert torch.allclose(score[group], torch.full((6,), 3.0))  # the group's own losses
    assert score[5] == pytest.approx((5.0 + 4 * 0.1) / 5)  # itself among 4 fitted ones
    assert set(score.topk(6).indices.tolist()) == set(group.tolist())
    # a class of at most 2k examples is not scored
    small = neighbourhood_loss(x[:70], loss[:70], torch.cat([y[:60], torch.ones(10).long()]),
                               k=5)
    assert (small[60:] == 0).all() and (small[:60] > 0).all()
    with pytest.raises(EpicError, match=r"losses must be a \(126,\) floating-point tensor"):
        neighbourhood_loss(x, loss[:3], y)


def test_reference_loss_reads_a_planted_group_as_the_class_it_sits_in():
    """8 examples labelled 1 inside class 0, apart along a direction no clean example takes
    (as bullseye poisons are): a head fit on the examples whose neighbours agree with their
    label reads them as class 0, so their loss is the highest."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0, 0, 0], [6, 0, 0, 0], [0, 6, 0, 0]])
    x = torch.cat([torch.randn(100, 4, generator=g) * 0.8 + centres[c] for c in range(3)])
    x[:, 3] *= 0.05
    planted = torch.randn(8, 4, generator=g) * 0.3 + torch.tensor([0.5, 0, 0, 3.0])
    x = torch.cat([x, planted])
    y = torch.cat([torch.arange(3).repeat_interleave(100), torch.ones(8, dtype=torch.long)])
    loss = reference_loss(x, y, k=30)
    assert set(loss.topk(8).indices.tolist()) == set(range(300, 308))
    assert loss[300:].min() > 2.0 and loss[:300].median() < 0.1
    # more voters than the smallest class (100) has examples: capped at 99, so class 0 and 2
    # still win their own votes and the group stays on top
    wide = reference_loss(x, y, k=1000)
    assert torch.equal(wide, reference_loss(x, y, k=99))
    assert set(wide.topk(8).indices.tolist()) == set(range(300, 308))
    with pytest.raises(EpicError, match="k must be >= 1"):
        reference_loss(x, y, k=0)
    with pytest.raises(EpicError, match="reg must be >= 0"):
        reference_loss(x, y, reg=-1.0)
    # EpicPlus(reference=True) scores each example by the larger of its two ranks
    plain = EpicPlus(k=30)._group_scores(x, y)
    both = EpicPlus(k=30, reference=True)._group_scores(x, y)
    scored = plain > 0
    assert scored.all()
    want = torch.maximum(percentile_rank(plain), percentile_rank(reference_loss(x, y)))
    assert torch.allclose(both, want)
    assert (both >= percentile_rank(plain)).all() and not torch.equal(both, plain)


def relative_planted():
    """A hard class 0 (every loss 2) and an easy class 1 (loss 0.05) holding a tight group
    of 6 apart from it (loss 1). Returns features, losses, labels and the group's indices."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(60, 4, generator=g), torch.randn(60, 4, generator=g) + 30,
                   torch.randn(6, 4, generator=g) * 0.1 + 38])
    y = torch.cat([torch.zeros(60), torch.ones(66)]).long()
    loss = torch.cat([torch.full((60,), 2.0), torch.full((60,), 0.05), torch.full((6,), 1.0)])
    return x, loss, y, torch.arange(120, 126)


def test_neighbourhood_loss_relative_to_its_class_lifts_a_group_in_an_easy_class():
    x, loss, y, group = relative_planted()
    plain = neighbourhood_loss(x, loss, y, k=5)
    assert not set(plain.topk(6).indices.tolist()) & set(group.tolist())  # class 0 first
    for relative in (0.5, 1.0):
        scaled = neighbourhood_loss(x, loss, y, k=5, relative=relative)
        assert set(scaled.topk(6).indices.tolist()) == set(group.tolist())
        assert torch.allclose(scaled[:60], plain[:60] / 2.0 ** relative)  # median 2
    small = neighbourhood_loss(x[:70], loss[:70], torch.cat([y[:60], torch.ones(10).long()]),
                               k=5, relative=1.0)
    assert (small[60:] == 0).all() and torch.allclose(small[:60], torch.ones(60))
    # a class the model fits perfectly (median 0): its one small loss is not inflated past
    # the group, as a division by that median would
    fitted = loss.clone()
    fitted[:60] = 0.0
    fitted[7] = 1e-3
    scaled = neighbourhood_loss(x, fitted, y, k=5, relative=0.5)
    assert set(scaled.topk(6).indices.tolist()) == set(group.tolist())
    with pytest.raises(EpicError, match="relative must be >= 0"):
        neighbourhood_loss(x, loss, y, relative=-0.5)


def test_epic_plus_misfit_drops_by_the_class_relative_score_by_default():
    x, loss, y, group = relative_planted()
    vectors = torch.zeros(len(y), 2)  # logit proxies whose label entry gives the loss
    vectors[torch.arange(len(y)), y] = torch.exp(-loss) - 1
    trainer = SimpleNamespace(active=torch.ones(len(y), dtype=torch.bool))
    dropped = {}
    for relative in (None, 0.0):
        plus = EpicPlus(fraction=0.05, patience=1, score="misfit", k=5, relative=relative)
        out, info = plus._decide(trainer, GradientProxy(vectors, x), y)
        dropped[relative] = set(out.tolist())
        assert info["relative"] == (0.5 if relative is None else 0.0)
    assert dropped[None] == set(group.tolist())  # the cap's 6: the group
    assert not dropped[0.0] & set(group.tolist())  # the plain mean: the hard class


def test_relative_is_refused_outside_the_misfit_score():
    message = ("relative applies to score='misfit', not 'group'{}; pass score='misfit' or "
               "leave relative out")
    with pytest.raises(EpicError, match=re.escape(message.format(""))):
        EpicPlus(score="group", relative=1.0)
    picked = EpicPlus(relative=1.0)  # score=None: known once the scenario is
    with pytest.raises(EpicError, match=re.escape(message.format(
            " (what the default score picks outside fine-tuning)"))):
        picked.check_config(TrainConfig(scenario="scratch", epochs=8))
    picked.check_config(TrainConfig(scenario="finetune", epochs=8))
    picked.on_train_start(SimpleNamespace(config=TrainConfig(scenario="finetune", epochs=8)))
    assert (picked.score, picked.relative) == ("misfit", 1.0)
    assert EpicPlus(score="misfit", relative=0.0).relative == 0.0
    with pytest.raises(EpicError, match="relative must be >= 0"):
        EpicPlus(score="misfit", relative=-1)


def test_epic_plus_misfit_drops_the_group_the_model_does_not_fit_not_a_hard_example():
    x, loss, y, group = misfit_planted()
    # logit proxies whose label entry gives each example's loss: p_y = exp(-loss)
    vectors = torch.zeros(len(y), 2)
    vectors[torch.arange(len(y)), y] = torch.exp(-loss) - 1
    trainer = SimpleNamespace(active=torch.ones(len(y), dtype=torch.bool))
    misfit = EpicPlus(fraction=0.05, patience=1, score="misfit", k=5)
    dropped, _ = misfit._decide(trainer, GradientProxy(vectors, x), y)
    assert set(dropped.tolist()) == set(group.tolist())  # 6 of the cap's 6; not example 5
    fitted = vectors.clone()
    fitted[group, 0] = torch.exp(torch.tensor(-0.01)) - 1  # the model fits the group
    dropped, _ = EpicPlus(fraction=0.05, patience=1, score="misfit", k=5)._decide(
        trainer, GradientProxy(fitted, x), y)
    assert not set(dropped.tolist()) & set(group.tolist())
    with pytest.raises(EpicError, match="score='misfit' reads penultimate features"):
        EpicPlus(score="misfit", proxy="logits")


@pytest.mark.parametrize("scenario, given, expected, k", [
    ("scratch", None, "group", 30), ("transfer", None, "group", 30),
    ("finetune", None, "misfit", 10), ("finetune", "group", "group", 30),
    ("scratch", "misfit", "misfit", 10)])
def test_score_defaults_to_misfit_when_fine_tuning_the_models_own_head(scenario, given,
                                                                       expected, k):
    plus = EpicPlus(score=given)
    assert plus.score == (given or "group")  # before the run: the pick outside fine-tuning
    plus.on_train_start(SimpleNamespace(config=TrainConfig(scenario=scenario, epochs=8),
                                        images=None))
    assert (plus.score, plus.k) == (expected, k)
    assert plus.relative == (0.5 if expected == "misfit" else None)
    assert plus.summary()["relative"] == plus.relative
    # an option of the group score alone, given without a score, is refused at the start
    spread = EpicPlus(spread=5)
    if expected == "misfit" and given is None:
        with pytest.raises(EpicError, match=r"spread applies to score='group', not 'misfit' "
                                            r"\(fine-tuning picks it\)"):
            spread.on_train_start(SimpleNamespace(config=TrainConfig(scenario=scenario,
                                                                     epochs=8)))
        with pytest.raises(EpicError, match=r"reference applies to score='group', not "
                                            r"'misfit' \(fine-tuning picks it\)"):
            EpicPlus(reference=True).on_train_start(
                SimpleNamespace(config=TrainConfig(scenario=scenario, epochs=8)))


def test_squeeze_shift_is_the_feature_distance_to_the_squeezed_copy_and_folds_in_as_a_rank():
    feats = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    squeezed = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    assert torch.allclose(squeeze_shift(feats, squeezed), torch.tensor([1.0, 0.0, 5.0]))
    with pytest.raises(EpicError, match=r"features \(3, 2\) and squeezed features \(2, 2\)"):
        squeeze_shift(feats, squeezed[:2])
    # the larger of the two ranks among the scored examples; an unscored one stays at 0
    scores = torch.tensor([0.9, 0.1, 0.5, 0.0])
    other = torch.tensor([0.0, 9.0, 1.0, 100.0])
    assert torch.equal(with_rank(scores, other), torch.tensor([1.0, 1.0, 2 / 3, 0.0]))
    with pytest.raises(EpicError, match="squeeze"):
        EpicPlus(squeeze=101)
    with pytest.raises(EpicError, match=r"squeeze compresses the training images, and this "
                                        r"run streams them from files; load them in memory "
                                        r"\(no --stream\) or pass squeeze=0"):
        EpicPlus(squeeze=70).on_train_start(
            SimpleNamespace(config=TrainConfig(epochs=8), images=None))


@pytest.mark.parametrize("scenario, given, streamed, expected", [
    ("transfer", None, False, 70), ("transfer", None, True, 0), ("scratch", None, False, 0),
    ("finetune", None, False, 0), ("scratch", 50, False, 50), ("transfer", 0, False, 0)])
def test_squeeze_defaults_to_quality_70_in_transfer_learning_only(scenario, given, streamed,
                                                                  expected):
    plus = EpicPlus(squeeze=given)
    plus.on_train_start(SimpleNamespace(config=TrainConfig(scenario=scenario, epochs=8),
                                        images=None if streamed else torch.zeros(1)))
    assert plus.squeeze == plus.summary()["squeeze"] == expected


@pytest.mark.parametrize("scenario", ["scratch", "transfer"])
def test_epic_plus_squeeze_drops_the_images_whose_squeezed_copy_moves_their_features(
        digits, scenario, monkeypatch):
    """20 images of class 3 carry +-40 levels of pixel noise, like a poison's crafted
    perturbation, and a stand-in for the JPEG codec takes exactly that noise off (on 8x8
    digits the real codec rewrites every image; on CIFAR-10 it takes most of a poison's
    perturbation off and little of a clean image, docs/results.md). ``squeeze`` drops the
    noisy images, whose features move; without it the features alone do not set them apart
    (texture off, so only the two feature ranks count). The copies are made once, of the
    training images, at the quality given."""
    import epic.defenses.epic_plus as module

    train, _ = digits
    marked, noisy = with_sign_noise(train, label=3, count=20, level=40, seed=1)
    calls = []

    def restore(pixels, quality):
        calls.append(quality)
        assert torch.equal(pixels, marked.images)
        return train.images.clone()

    monkeypatch.setattr(module, "jpeg_compress", restore)
    dropped = {}
    for squeeze in (70, 0):
        plus = create_defense("epic-plus", fraction=0.02, stem="never", squeeze=squeeze)
        trainer = Trainer(small_model(), marked, callbacks=[plus], config=TrainConfig(
            epochs=4, batch_size=64, lr=0.05, augment="none", progress=False,
            scenario=scenario))
        trainer.fit()
        dropped[squeeze] = int((~trainer.active[noisy]).sum())
        assert plus.summary()["squeeze"] == squeeze
    assert calls == [70]
    assert dropped[70] >= 8 and dropped[0] <= 2, dropped  # measured: 10 (13 transfer), 0


def test_epic_plus_mirror_drops_the_images_whose_mirror_image_moves_their_features(digits):
    """Every training image is made left-right symmetric, so mirroring leaves it unchanged;
    20 images of class 3 then get +-40 levels of antisymmetric noise, which mirroring turns
    into its negative, like a poison's crafted noise that stops lining up when flipped.
    ``mirror`` drops those 20, whose features move; without it the features alone do not set
    them apart (texture and JPEG rank off, so only the two feature ranks count)."""
    train, _ = digits
    pixels = train.images.int()
    symmetric = (pixels + pixels.flip(-1)) // 2
    g = torch.Generator().manual_seed(1)
    noisy = (train.labels == 3).nonzero().squeeze(1)[:20]
    half = torch.randint(0, 2, (20, *pixels.shape[1:]), generator=g) * 40 - 20
    symmetric[noisy] += half - half.flip(-1)
    marked = dataclasses.replace(train, images=symmetric.clamp(0, 255).to(train.images.dtype))
    dropped = {}
    for mirror in (True, False):
        plus = create_defense("epic-plus", fraction=0.02, stem="never", squeeze=0,
                              mirror=mirror)
        trainer = Trainer(small_model(), marked, callbacks=[plus], config=TrainConfig(
            epochs=4, batch_size=64, lr=0.05, augment="none", progress=False,
            scenario="transfer"))
        trainer.fit()
        dropped[mirror] = int((~trainer.active[noisy]).sum())
        assert plus.summary()["mirror"] is mirror
    assert dropped[True] >= 10 and dropped[False] <= 2, dropped  # measured: 13, 0


def test_mirror_is_a_boolean_and_needs_the_images_in_memory():
    with pytest.raises(EpicError, match="mirror must be true or false, got 'yes'"):
        EpicPlus(mirror="yes")
    with pytest.raises(EpicError, match=r"mirror flips the training images, and this run "
                                        r"streams them; train from images in memory "
                                        r"\(no --stream\) or pass mirror=False"):
        EpicPlus(mirror=True, squeeze=0).on_train_start(
            SimpleNamespace(config=TrainConfig(epochs=8), images=None))


def test_a_reused_epic_plus_compresses_each_runs_own_images(digits, monkeypatch):
    """The JPEG copies belong to one run: a defense object trained with twice (as a
    library user may) compresses the second run's images, not the first's again."""
    import epic.defenses.epic_plus as module

    train, _ = digits
    seen = []
    monkeypatch.setattr(module, "jpeg_compress",
                        lambda pixels, quality: seen.append(pixels.clone()) or pixels.clone())
    brighter = dataclasses.replace(train, images=(train.images.int() + 1).clamp(max=255)
                                   .to(train.images.dtype))
    plus = create_defense("epic-plus", fraction=0.02, squeeze=70)
    for data in (train, brighter):
        Trainer(small_model(), data, callbacks=[plus], config=TrainConfig(
            epochs=1, batch_size=64, lr=0.05, augment="none", progress=False,
            scenario="transfer")).fit()
    assert len(seen) == 2
    assert torch.equal(seen[0], train.images) and torch.equal(seen[1], brighter.images)
