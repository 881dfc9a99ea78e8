"""Feature-space attacks: Bullseye Polytope and Feature Collision on scikit-learn digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import epic.attacks.bullseye_polytope  # noqa: F401  (registration)
import epic.attacks.feature_collision  # noqa: F401  (registration)
from conftest import tiny_model
from epic._errors import EpicError
from epic.attacks import Target, ThreatModel, create_attack, list_attacks
from epic.attacks.bullseye_polytope import BullseyePolytope
from epic.attacks.feature_collision import FeatureCollision, default_beta
from epic.data import ImageTensors, PoisonSet, jpeg_compress
from epic.data.codec import jpeg_straight_through
from epic.models import forward_with_features

ATTACKS = ["bullseye-polytope", "feature-collision"]
EPS = 16.0
NUM_POISONS = 5


def _train_convnet(train: ImageTensors, seed: int, steps: int = 60, **options
                   ) -> torch.nn.Module:
    """A tiny convnet briefly trained on digits, so that its features mean something."""
    model = tiny_model(seed, **{"mean": (0.31,), **options})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = train.images.float() / 255, train.labels
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(train), (128,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def surrogates(digits):
    train, _ = digits
    return _train_convnet(train, seed=0), _train_convnet(train, seed=1)


@pytest.fixture(scope="module")
def target(digits):
    _, test = digits
    return Target.from_split(test, 0, adv_label=(int(test.labels[0]) + 1) % 10)


def _craft(name: str, models, train, target, *, seed: int = 0, eps: float = EPS,
           num_poisons: int = NUM_POISONS, **kwargs) -> PoisonSet:
    attack = create_attack(name, **{"steps": 30, **kwargs})
    return attack.craft(models, train, target, ThreatModel(eps=eps, num_poisons=num_poisons),
                        seed=seed, device="cpu", progress=False)


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return forward_with_features(model, images.float() / 255)[1]


def _centroid_distance(model, images, target_image) -> float:
    """Bullseye objective recomputed from uint8 images."""
    t = _features(model, target_image[None])
    centroid = _features(model, images).mean(0, keepdim=True)
    return float((t - centroid).pow(2).sum() / t.pow(2).sum())


def _collision_distance(model, images, target_image) -> float:
    """Mean squared feature distance of each image to the target, from uint8 images."""
    t = _features(model, target_image[None])
    return float((_features(model, images) - t).pow(2).sum(1).mean())


# --------------------------------------------------------------------------- registry


def test_registered():
    assert set(ATTACKS) <= set(list_attacks())
    assert isinstance(create_attack("bullseye-polytope"), BullseyePolytope)
    assert isinstance(create_attack("feature-collision", beta=None), FeatureCollision)
    assert create_attack("feature-collision").name == "feature-collision"


# --------------------------------------------------------------------------- constraints


@pytest.mark.parametrize("name, kwargs", [("bullseye-polytope", {}),
                                          ("feature-collision", {}),
                                          ("feature-collision", {"watermark": 0.3})])
def test_poisons_respect_threat_model(digits, surrogates, target, name, kwargs):
    train, _ = digits
    before = train.images.clone(), train.labels.clone()
    poisons = _craft(name, surrogates[0], train, target, **kwargs)

    assert torch.equal(train.images, before[0]) and torch.equal(train.labels, before[1])
    assert len(poisons) == NUM_POISONS and poisons.images.dtype == torch.uint8
    assert poisons.base_indices.unique().numel() == NUM_POISONS
    assert (train.labels[poisons.base_indices] == target.adv_label).all()
    assert (poisons.labels == target.adv_label).all()
    base = train.images[poisons.base_indices].to(torch.int16)
    assert (poisons.images.to(torch.int16) - base).abs().max() <= EPS
    assert not torch.equal(poisons.images, train.images[poisons.base_indices])
    poisons.validate(train)  # the library's own clean-label / eps checks
    assert torch.equal(poisons.target_image, target.image)
    assert (poisons.target_label, poisons.adv_label, poisons.eps) == \
        (target.label, target.adv_label, EPS)
    meta = poisons.metadata
    assert meta["attack"] == name and meta["hyperparameters"]["steps"] == 30
    assert meta["num_surrogates"] == 1
    assert meta["result"]["final_loss"] < meta["result"]["initial_loss"]


def test_bullseye_moves_centroid_to_target(digits, surrogates, target):
    train, _ = digits
    model = surrogates[0]
    poisons = _craft("bullseye-polytope", model, train, target)
    bases = train.images[poisons.base_indices]
    before = _centroid_distance(model, bases, target.image)
    after = _centroid_distance(model, poisons.images, target.image)
    assert after < 0.8 * before
    assert poisons.metadata["result"]["initial_loss"] == pytest.approx(before, rel=1e-4)
    assert poisons.metadata["result"]["final_loss"] == pytest.approx(after, rel=0.05)


def test_bullseye_jpeg_adapts_to_compression(digits):
    """The adaptive attacker (``jpeg``): its poisons' features move about half as far on a
    JPEG copy as the plain attack's (the signal EPIC-plus's ``squeeze`` ranks), and its
    centroid still reaches the target. On 32x32 colour copies of the digits: on 8x8 images
    the codec rewrites everything."""
    train, test = digits

    def big(images):
        x = F.interpolate(images.float(), size=32, mode="bilinear", align_corners=False)
        return x.repeat(1, 3, 1, 1).round().clamp(0, 255).to(torch.uint8)

    train = ImageTensors(big(train.images), train.labels, train.classes)
    test = ImageTensors(big(test.images), test.labels, test.classes)
    model = _train_convnet(train, seed=0, in_channels=3, mean=(0.31,) * 3)
    target = Target.from_split(test, 0, adv_label=(int(test.labels[0]) + 1) % 10)
    plain = _craft("bullseye-polytope", model, train, target, eps=8, steps=60)
    adaptive = _craft("bullseye-polytope", model, train, target, eps=8, steps=60, jpeg=70)

    def shift(poisons):
        return float((_features(model, poisons.images)
                      - _features(model, jpeg_compress(poisons.images, 70))).norm(dim=1).mean())

    assert shift(adaptive) < 0.7 * shift(plain)
    before = _centroid_distance(model, train.images[adaptive.base_indices], target.image)
    after = _centroid_distance(model, adaptive.images, target.image)
    assert after < 0.8 * before
    result = adaptive.metadata["result"]
    assert result["final_plain_loss"] == pytest.approx(after, rel=0.05)
    assert "final_plain_loss" not in plain.metadata["result"]


def test_bullseye_jpeg_list_averages_the_loss_over_every_quality(digits):
    """``jpeg=[Q1, Q2]``: the objective is the mean of the plain Bullseye loss and that of a
    JPEG copy at each quality (sorted, repeats once), and its gradient reaches the pixels."""
    pytest.importorskip("kornia")
    from epic.attacks.bullseye_polytope import bullseye_loss

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 10)).eval()
    g = torch.Generator().manual_seed(0)
    poisons = torch.rand(4, 3, 16, 16, generator=g, requires_grad=True)
    target = [torch.randn(1, 8, generator=g)]
    attack = BullseyePolytope(jpeg=[90, 50, 90])
    assert attack.jpeg == [50, 90]
    loss = attack._loss([model], poisons, target)
    with torch.no_grad():
        parts = [float(bullseye_loss([model], x, target)) for x in
                 (poisons, jpeg_straight_through(poisons, 50), jpeg_straight_through(poisons, 90))]
    assert float(loss.detach()) == pytest.approx(sum(parts) / 3, rel=1e-6)
    assert float(loss.detach()) != pytest.approx((parts[0] + parts[1]) / 2, rel=1e-3)
    loss.backward()
    assert poisons.grad is not None and poisons.grad.abs().sum() > 0
    assert BullseyePolytope(jpeg=70).jpeg == 70 and BullseyePolytope()._qualities == ()


@pytest.mark.parametrize("watermark", [0.0, 0.3])
def test_feature_collision_moves_poisons_to_target(digits, surrogates, target, watermark):
    train, _ = digits
    model = surrogates[0]
    poisons = _craft("feature-collision", model, train, target, watermark=watermark)
    bases = train.images[poisons.base_indices]
    before = _collision_distance(model, bases, target.image)
    after = _collision_distance(model, poisons.images, target.image)
    assert after < 0.8 * before
    assert poisons.metadata["result"]["final_loss"] == pytest.approx(after, rel=0.05)
    if watermark:  # blended toward the target in pixel space, but still within eps
        t = target.image.float()
        assert (poisons.images.float() - t).abs().mean() < (bases.float() - t).abs().mean()


def test_feature_collision_default_beta(digits, surrogates, target):
    train, _ = digits
    poisons = _craft("feature-collision", surrogates[0], train, target, steps=1)
    assert poisons.metadata["result"]["beta"] == pytest.approx(0.25 * (32 / 64) ** 2)
    assert default_beta(2048, 3 * 299 * 299) == pytest.approx(0.25 * (2048 / 268203) ** 2)
    explicit = _craft("feature-collision", surrogates[0], train, target, steps=1, beta=0.5)
    assert explicit.metadata["result"]["beta"] == 0.5


def test_feature_collision_step_size_safeguard(digits, surrogates, target):
    """A huge step is halved until it helps: the objective never rises, even with lr=1e3."""
    train, _ = digits
    poisons = _craft("feature-collision", surrogates[0], train, target, lr=1e3, eps=255.0)
    result = poisons.metadata["result"]
    assert result["final_loss"] < 0.5 * result["initial_loss"]


def test_bullseye_tolerance_stops_early(digits, surrogates, target):
    train, _ = digits
    poisons = _craft("bullseye-polytope", surrogates[0], train, target, tol=100.0)
    assert poisons.metadata["result"]["steps"] == 0
    assert torch.equal(poisons.images, train.images[poisons.base_indices])


@pytest.mark.parametrize("name", ATTACKS)
def test_progress_bar(digits, surrogates, target, name, capsys):
    train, _ = digits
    attack = create_attack(name, steps=3)
    poisons = attack.craft(surrogates[0], train, target, ThreatModel(num_poisons=2), device="cpu")
    assert len(poisons) == 2 and poisons.metadata["result"]["steps"] == 3
    assert name in capsys.readouterr().err


# --------------------------------------------------------------------------- seeding, ensembles


@pytest.mark.parametrize("name", ATTACKS)
def test_seeded(digits, surrogates, target, name):
    train, _ = digits
    a = _craft(name, surrogates[0], train, target, seed=3, steps=10)
    b = _craft(name, surrogates[0], train, target, seed=3, steps=10)
    c = _craft(name, surrogates[0], train, target, seed=4, steps=10)
    assert torch.equal(a.base_indices, b.base_indices) and torch.equal(a.images, b.images)
    assert a.metadata == b.metadata
    assert not torch.equal(a.base_indices, c.base_indices)


@pytest.mark.parametrize("name", ATTACKS)
def test_ensemble(digits, surrogates, target, name):
    train, _ = digits
    poisons = _craft(name, list(surrogates), train, target)
    assert poisons.metadata["num_surrogates"] == 2
    assert poisons.metadata["result"]["final_loss"] < poisons.metadata["result"]["initial_loss"]
    bases = train.images[poisons.base_indices]
    distance = _centroid_distance if name == "bullseye-polytope" else _collision_distance
    for model in surrogates:  # every surrogate's objective improves
        assert distance(model, poisons.images, target.image) < \
            distance(model, bases, target.image)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("fmt", ["epic", "benchmark"])
def test_round_trip(tmp_path, digits, surrogates, target, name, fmt):
    train, _ = digits
    poisons = _craft(name, surrogates[0], train, target, steps=5)
    loaded = PoisonSet.load(poisons.save(tmp_path / "poisons", format=fmt))
    for field in ("base_indices", "images", "labels", "target_image"):
        assert torch.equal(getattr(loaded, field), getattr(poisons, field)), field
    for field in ("target_label", "adv_label", "eps", "target_index", "metadata"):
        assert getattr(loaded, field) == getattr(poisons, field), field
    loaded.validate(train)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("cls, kwargs", [
    (BullseyePolytope, {"steps": 0}),
    (BullseyePolytope, {"steps": 2.5}),
    (BullseyePolytope, {"lr": 0}),
    (BullseyePolytope, {"lr": -0.1}),
    (BullseyePolytope, {"lr": float("nan")}),
    (BullseyePolytope, {"tol": -1.0}),
    (BullseyePolytope, {"jpeg": 101}),
    (BullseyePolytope, {"jpeg": -1}),
    (BullseyePolytope, {"jpeg": []}),
    (BullseyePolytope, {"jpeg": [70, 0]}),
    (BullseyePolytope, {"jpeg": [70, 101]}),
    (BullseyePolytope, {"jpeg": [70, 90.5]}),
    (BullseyePolytope, {"jpeg": "70"}),
    (FeatureCollision, {"steps": 0}),
    (FeatureCollision, {"lr": 0.0}),
    (FeatureCollision, {"lr": "0.1"}),
    (FeatureCollision, {"beta": -0.5}),
    (FeatureCollision, {"beta": float("inf")}),
    (FeatureCollision, {"watermark": 1.0}),
    (FeatureCollision, {"watermark": -0.1}),
    (FeatureCollision, {"watermark": True}),
])
def test_bad_hyperparameters(cls, kwargs):
    with pytest.raises(EpicError) as err:
        cls(**kwargs)
    message = str(err.value)
    assert "\n" not in message and next(iter(kwargs)) in message


# --------------------------------------------------------------------------- the attack works


def _linear_probe(features: torch.Tensor, labels: torch.Tensor,
                  steps: int = 200) -> torch.nn.Linear:
    """A fresh linear head trained by full-batch SGD on frozen features (fixed init)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(features.shape[1], 10)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(steps):
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


@pytest.mark.slow
def test_bullseye_transfer_poisons_linear_probe(digits, surrogates):
    """Transfer setting: retraining only a linear head on poisoned features raises the target's
    adversarial log-probability far more than random +-eps noise on the same bases does."""
    train, test = digits
    model = surrogates[0]
    clean_feats = _features(model, train.images)
    with torch.no_grad():
        top2 = model(test.images[:8].float() / 255).topk(2, dim=1).indices
    eps, trials, beaten = 32.0, 0, 0
    for i in range(8):
        if int(top2[i, 0]) != int(test.labels[i]):
            continue
        target = Target.from_split(test, i, adv_label=int(top2[i, 1]))  # runner-up class
        poisons = _craft("bullseye-polytope", model, train, target, eps=eps, steps=200)
        idx = poisons.base_indices
        g = torch.Generator().manual_seed(i)
        signs = torch.randint(0, 2, poisons.images.shape, generator=g) * 2 - 1
        noisy = (train.images[idx].int() + signs * int(eps)).clamp(0, 255).to(torch.uint8)
        t = _features(model, target.image[None])
        log_p = []
        for images in (poisons.images, noisy):
            feats = clean_feats.clone()
            feats[idx] = _features(model, images)
            head = _linear_probe(feats, train.labels)
            with torch.no_grad():
                log_p.append(float(head(t).log_softmax(1)[0, target.adv_label]))
        trials += 1
        beaten += log_p[0] > log_p[1] + 1.0
    assert trials >= 6 and beaten >= trials - 1


def test_a_new_attack_only_implements_craft_on_the_job(digits, surrogates, target):
    """The seam for a user's attack: ``_craft`` gets the set-up job (copies of the surrogates,
    seeded bases of the poison class, their pixels) and returns poisons, facts and extra
    metadata; ``craft`` quantises them inside eps and records both."""
    from epic.attacks import Attack, Crafted, Crafting

    seen: list[Crafting] = []

    class Brighten(Attack):
        name = "brighten"

        def _craft(self, job: Crafting) -> Crafted:
            seen.append(job)
            return Crafted(job.base + 1.0, {"steps": 0}, {"note": "every pixel up"})

    train, _ = digits
    poisons = Brighten().craft(list(surrogates), train, target, ThreatModel(eps=EPS),
                               seed=5, device="cpu")
    job = seen[0]
    assert len(job.models) == 2 and all(not m.training for m in job.models)
    assert job.models[0] is not surrogates[0]  # copies: the user's models are untouched
    assert (train.labels[job.indices] == target.adv_label).all()
    assert job.poison_class == target.adv_label
    torch.testing.assert_close(job.base, train.images[job.indices].float() / 255)
    assert torch.equal(poisons.base_indices, job.indices)
    lift = poisons.images.int() - train.images[job.indices].int()
    assert lift.max() == EPS and lift.min() >= 0  # clipped to eps and to 255
    assert poisons.metadata["result"] == {"steps": 0}
    assert poisons.metadata["note"] == "every pixel up" and poisons.metadata["seed"] == 5
    again = Brighten().craft(list(surrogates), train, target, ThreatModel(eps=EPS), seed=5,
                             device="cpu")
    assert torch.equal(again.base_indices, poisons.base_indices)
