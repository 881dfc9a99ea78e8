"""Filter baselines: deep k-NN, spectral signatures, activation clustering and random drop."""

from __future__ import annotations

import pytest
import torch

from conftest import small_model
from epic._errors import EpicError
from epic.data import ImageTensors
from epic.defenses import (
    ActivationClustering,
    DeepKNN,
    FilterResult,
    RandomDrop,
    SpectralSignatures,
    create_defense,
    list_defenses,
)
from epic.training import TrainConfig, Trainer

POISONS = 5


@pytest.fixture(scope="module")
def planted():
    """3 Gaussian classes of 100 points in 16-D, then 5 points labelled 0 inside class 1."""
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(3, 16, generator=g)
    features = torch.cat([means[c] + torch.randn(100, 16, generator=g) for c in range(3)]
                         + [means[1] + torch.randn(POISONS, 16, generator=g)])
    labels = torch.cat([torch.full((100,), c) for c in range(3)]
                       + [torch.zeros(POISONS, dtype=torch.long)])
    logits = torch.randn(len(labels), 3, generator=g)
    poison = torch.zeros(len(labels), dtype=torch.bool)
    poison[-POISONS:] = True
    return features, labels, logits, poison


def check_result(result, n):
    assert isinstance(result, FilterResult)
    assert result.keep.shape == (n,) and result.keep.dtype == torch.bool
    assert result.scores.shape == (n,) and result.scores.is_floating_point()


def assert_flags_poisons(result, poison):
    """Planted poisons rank above chance and are over-represented among the dropped."""
    n = len(poison)
    ranks = result.scores.argsort().argsort().float() / (n - 1)  # 0 = least suspicious
    assert float(ranks[poison].mean()) > 0.9
    dropped = ~result.keep
    recall = float(dropped[poison].float().mean())
    assert 0 < dropped.sum() < n
    assert recall > float(dropped.float().mean())
    assert recall == 1.0


FLAGGING = [
    DeepKNN(),
    DeepKNN(k=10),
    SpectralSignatures(expected_poison_fraction=0.05),
    ActivationClustering(dims=3),  # ICA; see test_activation_clustering_pca_and_small_classes
    ActivationClustering(reduction="pca"),
]


@pytest.mark.parametrize("defense", FLAGGING, ids=lambda d: f"{d.name}")
def test_filters_flag_planted_poisons(planted, defense):
    features, labels, logits, poison = planted
    result = defense.filter(features, labels, logits)
    check_result(result, len(labels))
    assert_flags_poisons(result, poison)


def test_deep_knn_votes_ties_and_small_sets():
    # a 1-D line: labels 0 0 1 1 | with k=2, the ends vote with their neighbours
    features = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    result = DeepKNN(k=2).filter(features, labels, torch.zeros(4, 2))
    # example 1's neighbours are 0 (label 0) and 2 (label 1): a tie that includes its label
    assert result.keep.tolist() == [True, True, True, True]
    assert result.scores.tolist() == [0.5, 0.5, 0.5, 0.5]
    lone = torch.tensor([0, 1, 1, 1])  # example 0 is outvoted by all its neighbours
    result = DeepKNN(k=50).filter(features, lone, torch.zeros(4, 2))  # k capped at N - 1 = 3
    assert result.keep.tolist() == [False, True, True, True]
    assert result.scores[0] == 1.0
    single = DeepKNN().filter(torch.zeros(1, 3), torch.tensor([0]), torch.zeros(1, 2))
    assert single.keep.tolist() == [True]


def test_deep_knn_blocks_match_one_pass(planted, monkeypatch):
    from epic.defenses import deep_knn

    features, labels, logits, _ = planted
    whole = DeepKNN(k=7).filter(features, labels, logits)
    monkeypatch.setattr(deep_knn, "_BLOCK_ELEMENTS", 50 * len(labels))  # blocks of 50 rows
    blocked = DeepKNN(k=7).filter(features, labels, logits)
    assert torch.equal(whole.keep, blocked.keep)
    assert torch.equal(whole.scores, blocked.scores)


def test_spectral_signatures_drops_the_whole_budget_from_every_class(planted):
    """Tran et al. remove 1.5 times the expected number of poisons of the whole set from
    every class (any class may hold them all): 1.5 * 0.02 * 305 = 9 each; the 5 planted
    poisons of class 0 are all among them. Half a class at most."""
    features, labels, logits, poison = planted
    result = SpectralSignatures(expected_poison_fraction=0.02, removal=1.5).filter(
        features, labels, logits)
    dropped = torch.bincount(labels[~result.keep], minlength=3)
    assert dropped.tolist() == [round(1.5 * 0.02 * 305)] * 3
    assert not result.keep[poison].any()
    capped = SpectralSignatures(expected_poison_fraction=1.0).filter(features, labels, logits)
    assert torch.bincount(labels[~capped.keep], minlength=3).tolist() == [52, 50, 50]
    lone = SpectralSignatures(expected_poison_fraction=1.0).filter(
        torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.zeros(3, 3))
    assert lone.keep.all()  # classes with one example are kept


def test_activation_clustering_pca_and_small_classes(planted):
    features, labels, logits, poison = planted
    result = ActivationClustering(reduction="pca").filter(features, labels, logits)
    assert torch.equal(~result.keep, poison)
    assert result.scores[poison].tolist() == pytest.approx([1 - POISONS / 105] * POISONS)
    assert result.keep[labels != 0].all()  # two Gaussian halves: no cluster is small
    small = torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(40, dtype=torch.long)])
    x = torch.randn(45, 8, generator=torch.Generator().manual_seed(1))
    x[:5] += 20  # class 0 has 5 examples: fewer than dims + 1, so it is kept
    out = ActivationClustering().filter(x, small, torch.zeros(45, 2))
    assert out.keep[:5].all() and (out.scores[:5] == 0).all()
    constant = ActivationClustering().filter(torch.ones(20, 4), torch.zeros(20, dtype=torch.long),
                                             torch.zeros(20, 1))
    assert constant.keep.all()


def test_activation_clustering_falls_back_to_pca_when_ica_fails(planted, monkeypatch):
    """FastICA raises inside scipy on near-singular whitening (seen on digits features): the
    class is then reduced with PCA instead of the run crashing."""
    import sklearn.decomposition

    def broken(*args, **kwargs):
        raise ValueError("A has a NaN entry")

    monkeypatch.setattr(sklearn.decomposition.FastICA, "fit_transform", broken)
    features, labels, logits, poison = planted
    ica = ActivationClustering().filter(features, labels, logits)
    pca = ActivationClustering(reduction="pca").filter(features, labels, logits)
    assert torch.equal(ica.keep, pca.keep) and torch.equal(ica.scores, pca.scores)


def test_random_drop_is_seeded_and_exact(planted):
    features, labels, logits, poison = planted
    n = len(labels)
    a = RandomDrop(count=30, seed=3).filter(None, labels, logits)
    b = RandomDrop(count=30, seed=3).filter(None, labels, logits)
    c = RandomDrop(count=30, seed=4).filter(None, labels, logits)
    check_result(a, n)
    assert a.num_dropped == 30
    assert torch.equal(a.keep, b.keep) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.keep, c.keep)
    assert a.scores[~a.keep].min() > a.scores[a.keep].max()  # the dropped are the top scores
    assert RandomDrop(fraction=0.1).filter(None, labels, logits).num_dropped == round(0.1 * n)
    assert RandomDrop(count=10 * n).filter(None, labels, logits).num_dropped == n
    assert RandomDrop.needs_features is False


@pytest.mark.parametrize("name, options, match", [
    ("deep-knn", dict(k=0), "k must be >= 1"),
    ("deep-knn", dict(k=2.5), "k must be an integer"),
    ("deep-knn", dict(epoch=-1), "epoch"),
    ("spectral-signatures", dict(removal=0), "removal must be a number > 0"),
    ("spectral-signatures", dict(removal=-1.0), "removal"),
    ("spectral-signatures", dict(expected_poison_fraction=0.0), "expected_poison_fraction"),
    ("spectral-signatures", dict(expected_poison_fraction=1.5), "expected_poison_fraction"),
    ("activation-clustering", dict(reduction="tsne"), "reduction; valid values are"),
    ("activation-clustering", dict(dims=0), "dims"),
    ("activation-clustering", dict(size_threshold=0.0), "size_threshold"),
    ("activation-clustering", dict(seed=-1), "seed"),
    ("random-drop", dict(), "exactly one of count and fraction"),
    ("random-drop", dict(count=3, fraction=0.1), "exactly one of count and fraction"),
    ("random-drop", dict(count=-1), "count"),
    ("random-drop", dict(fraction=1.5), "fraction"),
])
def test_bad_options_raise(name, options, match):
    with pytest.raises(EpicError, match=match):
        create_defense(name, **options)


def test_registry():
    assert {"deep-knn", "spectral-signatures", "activation-clustering",
            "random-drop"} <= set(list_defenses())
    defense = create_defense("deep-knn", k=5)
    assert isinstance(defense, DeepKNN) and defense.k == 5 and defense.name == "deep-knn"
    with pytest.raises(EpicError, match=r"no option\(s\) \['kk'\]; valid options are "
                                        r"\['epoch', 'k', 'retrain'\]"):
        create_defense("deep-knn", kk=5)


def test_a_feature_filter_from_scratch_reads_a_fully_trained_copy_then_trains_anew(digits):
    """The reference protocol: a copy of the model trained to the end on everything gives the
    features (it is the undefended run of the same seed), the filter runs before the first
    epoch, and the run itself trains from its initial weights on what is kept."""
    train, _ = digits
    subset = ImageTensors(train.images[:400], train.labels[:400], train.classes)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, augment="none", progress=False)
    plain = Trainer(small_model(), subset, config=cfg)
    plain.fit()
    knn = create_defense("deep-knn", k=5)
    trainer = Trainer(small_model(), subset, callbacks=[knn], config=cfg)
    rng = torch.get_rng_state()
    copy = trainer.train_copy()
    assert torch.equal(torch.get_rng_state(), rng)  # this run's random state untouched
    for a, b in zip(copy.model.state_dict().values(), plain.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    features = plain.predict(features=True)[1]
    expected = knn.filter(features, subset.labels, plain.predict()[0]).keep
    trainer.fit()
    (event,) = [e for e in trainer.events if e["event"] == "filter"]
    assert event["epoch"] == 1 and event["retrained"]
    assert torch.equal(trainer.active, expected.cpu()) and not expected.all()
    # an explicit epoch filters mid-training instead; retrain needs epoch 0
    late = create_defense("deep-knn", k=5, epoch=2)
    Trainer(small_model(), subset, callbacks=[late], config=cfg).fit()
    assert late.rounds[0]["epoch"] == 3 and not late.rounds[0]["retrained"]
    with pytest.raises(EpicError, match="retrain filters before the run trains"):
        create_defense("deep-knn", retrain=True, epoch=2)


INTEGRATION = [
    ("deep-knn", dict(k=5)),
    ("spectral-signatures", dict(expected_poison_fraction=0.02)),
    ("activation-clustering", dict(reduction="pca", dims=5)),
    ("random-drop", dict(count=25)),
]


@pytest.mark.parametrize("name, options", INTEGRATION, ids=[n for n, _ in INTEGRATION])
def test_filters_run_through_the_trainer(digits, name, options):
    train, _ = digits
    subset = ImageTensors(train.images[:500], train.labels[:500], train.classes)
    model = small_model()
    defense = create_defense(name, epoch=1, **options)
    poison = torch.zeros(500, dtype=torch.bool)
    poison[:10] = True
    trainer = Trainer(model, subset, poison_mask=poison, callbacks=[defense],
                      config=TrainConfig(epochs=2, batch_size=64, lr=0.05, augment="none",
                                         progress=False))
    trainer.fit()
    dropped = defense.summary()["dropped"]
    assert int(trainer.active.sum()) == 500 - dropped
    events = [e for e in trainer.events if e["event"] == "filter"]
    assert len(events) == 1 and events[0]["defense"] == name and events[0]["epoch"] == 2
    assert events[0]["dropped_this_round"] == dropped and events[0]["poisons_total"] == 10
    assert defense.scores is not None and defense.scores.shape == (500,)
    if name == "random-drop":
        assert dropped == 25
    if name == "spectral-signatures":
        assert dropped > 0
