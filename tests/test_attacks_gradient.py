"""Gradient matching (Witches' Brew) and Sleeper Agent on scikit-learn digits, a tiny convnet."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import epic.attacks.gradient_matching as gm
import epic.attacks.sleeper_agent as sa
from conftest import tiny_model
from epic._errors import EpicError
from epic.attacks import Target, ThreatModel, create_attack, list_attacks
from epic.data import ImageTensors, PoisonSet

EPS = 16
THREAT = ThreatModel(eps=EPS, num_poisons=6)
# no augmentation here, so that the crafting objective is exactly the one measured afterwards
ATTACKS = {
    "gradient-matching": dict(steps=15, augment=False),
    "sleeper-agent": dict(steps=15, augment=False, source_batch=48, placement="fixed"),
}


def _tiny(seed: int = 0) -> nn.Module:
    return tiny_model(seed, mean=(0.31,))


@pytest.fixture(scope="module")
def surrogate(digits) -> nn.Module:
    """The tiny convnet after 60 SGD steps on digits (about 90% test accuracy), eval mode."""
    train, _ = digits
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(train), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(train.images[idx].float() / 255),
                                           train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def target(digits) -> Target:
    _, test = digits
    return Target.from_split(test, 3, adv_label=(int(test.labels[3]) + 1) % 10)


@pytest.fixture(scope="module", params=sorted(ATTACKS))
def run(request, digits, surrogate, target):
    """(attack name, training split as it was before, poisons) for each attack."""
    train, _ = digits
    before = ImageTensors(train.images.clone(), train.labels.clone(), train.classes)
    state = copy.deepcopy(surrogate.state_dict())
    attack = create_attack(request.param, **ATTACKS[request.param])
    poisons = attack.craft(surrogate, train, target, THREAT, seed=3, device="cpu",
                           progress=False)
    for key, value in surrogate.state_dict().items():
        assert torch.equal(value, state[key]), f"the surrogate's {key} changed"
    return request.param, before, poisons


def _target_gradients(name: str, model: nn.Module, train: ImageTensors, target: Target,
                      poisons: PoisonSet) -> list[torch.Tensor]:
    """The attack's target gradient, rebuilt from the public helpers and the metadata."""
    if name == "gradient-matching":
        x = target.image[None].float() / 255
        return gm.parameter_gradients(model, x, target.adv_label)
    meta = poisons.metadata  # sleeper agent: the same patched source images (fixed placement)
    sources = train.images[meta["source_indices"]].float() / 255
    assert (train.labels[meta["source_indices"]] == target.label).all()
    patched = sa.apply_trigger(sources, sa.trigger_from_metadata(poisons),
                               placement=meta["placement"])
    return gm.parameter_gradients(model, patched, target.adv_label)


# --------------------------------------------------------------------------- both attacks

def test_registered():
    assert {"gradient-matching", "sleeper-agent"} <= set(list_attacks())


def test_poisons_respect_threat_and_leave_inputs_alone(run, digits, target):
    name, before, poisons = run
    train, _ = digits
    assert torch.equal(train.images, before.images) and torch.equal(train.labels, before.labels)
    assert len(poisons) == THREAT.num_poisons and poisons.images.dtype == torch.uint8
    idx = poisons.base_indices
    assert torch.equal(idx, idx.unique()), "base indices must be sorted and unique"
    assert (train.labels[idx] == target.adv_label).all()
    assert (poisons.labels == target.adv_label).all()
    diff = (poisons.images.int() - train.images[idx].int()).abs()
    assert int(diff.max()) <= EPS and int(diff.max()) > 0
    poisons.validate(train)
    assert poisons.eps == EPS and poisons.target_label == target.label
    assert poisons.adv_label == target.adv_label and poisons.target_index == target.index
    meta = poisons.metadata
    assert meta["attack"] == name and meta["seed"] == 3 and meta["num_surrogates"] == 1
    assert meta["poison_class"] == target.adv_label
    assert meta["hyperparameters"] == create_attack(name, **ATTACKS[name]).hyperparameters()
    assert meta["result"]["steps"] == 15 and meta["result"]["restarts"] == 1
    assert meta["result"]["best_restart"] == 0


def test_alignment_loss_goes_down(run, digits, surrogate, target):
    name, _, poisons = run
    train, _ = digits
    result = poisons.metadata["result"]
    assert result["final_loss"] < result["initial_loss"]
    tgrad = _target_gradients(name, surrogate, train, target, poisons)
    base = train.images[poisons.base_indices].float() / 255
    noise = (torch.rand(base.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * EPS
    start = gm.alignment_loss(surrogate, (base + noise / 255).clamp(0, 1), poisons.labels, tgrad)
    final = gm.alignment_loss(surrogate, poisons.images.float() / 255, poisons.labels, tgrad)
    clean = gm.alignment_loss(surrogate, base, poisons.labels, tgrad)
    assert final < min(start, clean) - 0.03, (name, clean, start, final)


def test_training_on_poisons_serves_the_adversary(run, digits, surrogate, target):
    """A few SGD steps on the poisons lower the adversarial loss more than on the clean bases."""
    name, _, poisons = run
    train, _ = digits
    if name == "gradient-matching":
        goal_x = target.image[None].float() / 255
    else:
        meta = poisons.metadata
        goal_x = sa.apply_trigger(train.images[meta["source_indices"]].float() / 255,
                                  sa.trigger_from_metadata(poisons), placement="fixed")
    goal_y = torch.full((len(goal_x),), target.adv_label)

    def adversarial_loss_after(images: torch.Tensor) -> float:
        model = copy.deepcopy(surrogate).eval().requires_grad_(True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(images.float() / 255), poisons.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(goal_x), goal_y))

    on_bases = adversarial_loss_after(train.images[poisons.base_indices])
    on_poisons = adversarial_loss_after(poisons.images)
    assert on_poisons < on_bases, (name, on_bases, on_poisons)


def test_seeded(run, digits, surrogate, target):
    name, _, poisons = run
    train, _ = digits
    attack = create_attack(name, **ATTACKS[name])
    again = attack.craft(surrogate, train, target, THREAT, seed=3, device="cpu", progress=False)
    assert torch.equal(again.base_indices, poisons.base_indices)
    assert torch.equal(again.images, poisons.images)
    assert again.metadata == poisons.metadata


@pytest.mark.parametrize("fmt", ["epic", "benchmark"])
def test_round_trip(run, tmp_path, fmt):
    _, _, poisons = run
    path = poisons.save(tmp_path / "poisons", format=fmt)
    loaded = PoisonSet.load(path)
    for field in ("base_indices", "images", "labels", "target_image"):
        assert torch.equal(getattr(loaded, field), getattr(poisons, field)), field
    for field in ("target_label", "adv_label", "eps", "target_index", "metadata"):
        assert getattr(loaded, field) == getattr(poisons, field), field


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=2.5), dict(tau=0), dict(tau=-0.1),
                                 dict(tau=math.nan), dict(tau="0.1"), dict(restarts=0),
                                 dict(batch_size=0), dict(augment="yes"), dict(flip=None)])
def test_bad_hyperparameters(name, bad):
    cls = gm.GradientMatching if name == "gradient-matching" else sa.SleeperAgent
    with pytest.raises(EpicError):
        cls(**bad)


def test_create_attack_drops_none():
    attack = create_attack("gradient-matching", steps=None, tau=0.2)
    assert attack.steps == 250 and attack.tau == 0.2
    assert attack.hyperparameters() == {"steps": 250, "tau": 0.2, "restarts": 1, "augment": True,
                                        "flip": True, "batch_size": 512, "retrain_rounds": 0}


# --------------------------------------------------------------------------- gradient matching

def test_cosine_loss():
    g = [torch.randn(3, 2), torch.randn(4)]
    assert float(gm.cosine_loss(g, g)) == pytest.approx(0, abs=1e-6)
    assert float(gm.cosine_loss(g, [-t for t in g])) == pytest.approx(2, abs=1e-6)
    assert float(gm.cosine_loss(g, [3 * t for t in g])) == pytest.approx(0, abs=1e-6)
    with pytest.raises(EpicError):
        gm.cosine_loss(g, g[:1])


def test_chunked_gradient_is_exact(digits, surrogate, target):
    """More poisons than batch_size: same delta gradient as one full batch."""
    train, _ = digits
    base = train.images[:7].float() / 255
    labels = train.labels[:7]
    tgrad = [gm.parameter_gradients(surrogate, target.image[None].float() / 255, 2)]
    grads, losses = [], []
    for batch_size in (512, 3):
        delta = torch.zeros_like(base).uniform_(-0.03, 0.03, generator=torch.Generator()
                                                .manual_seed(0)).requires_grad_()
        delta.grad = torch.zeros_like(delta)
        losses.append(gm._matching_backward([surrogate], base, delta, labels, tgrad,
                                            lambda x: x, torch.Generator(), batch_size))
        grads.append(delta.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    full = gm.parameter_gradients(surrogate, base, labels)
    chunked = gm.parameter_gradients(surrogate, base, labels, batch_size=2)
    for a, b in zip(full, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ensemble_and_restarts(digits, surrogate, target):
    train, _ = digits
    attack = gm.GradientMatching(steps=3, restarts=2, batch_size=4, flip=False)
    poisons = attack.craft([surrogate, _tiny(1).eval()], train, target,
                           ThreatModel(eps=EPS, num_poisons=5), seed=0, device="cpu",
                           progress=True)
    meta = poisons.metadata
    assert meta["num_surrogates"] == 2 and meta["result"]["restarts"] == 2
    assert meta["result"]["best_restart"] in (0, 1) and 0 <= meta["result"]["final_loss"] <= 2
    poisons.validate(train)


# --------------------------------------------------------------------------- sleeper agent

def test_make_trigger():
    t = sa.make_trigger(3, 2, torch.Generator().manual_seed(0))
    assert t.shape == (2, 3, 3) and t.dtype == torch.float32
    assert set(t.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(t, sa.make_trigger(3, 2, torch.Generator().manual_seed(0)))
    u = sa.make_trigger(4, 1, torch.Generator().manual_seed(0), pattern="uniform")
    assert u.shape == (1, 4, 4) and 0 <= float(u.min()) and float(u.max()) <= 1
    with pytest.raises(EpicError):
        sa.make_trigger(0, 1, torch.Generator())
    with pytest.raises(EpicError):
        sa.make_trigger(2, 1, torch.Generator(), pattern="checker")


def test_apply_trigger_fixed_pastes_exactly_the_patch():
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    trigger = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(1))
    out = sa.apply_trigger(images, trigger, placement="fixed")
    assert torch.equal(out[:, :, 5:, 5:], trigger.expand(5, -1, -1, -1))
    rest = torch.ones(8, 8, dtype=torch.bool)
    rest[5:, 5:] = False
    assert torch.equal(out[:, :, rest], images[:, :, rest])
    assert torch.equal(images, torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)))


def test_apply_trigger_random_pastes_exactly_the_patch():
    images = torch.full((40, 1, 8, 8), 0.5)
    trigger = torch.tensor([[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])
    out = sa.apply_trigger(images, trigger, generator=torch.Generator().manual_seed(0),
                           placement="random")
    changed = out != 0.5
    assert (changed.flatten(1).sum(1) == 9).all()
    corners = set()
    for i in range(len(out)):  # a check, not a hot path
        ys, xs = changed[i, 0].nonzero(as_tuple=True)
        y, x = int(ys.min()), int(xs.min())
        assert torch.equal(out[i, :, y:y + 3, x:x + 3], trigger)
        corners.add((y, x))
    assert len(corners) > 5, "random placement should vary"
    again = sa.apply_trigger(images, trigger, generator=torch.Generator().manual_seed(0),
                             placement="random")
    assert torch.equal(out, again)


def test_apply_trigger_is_differentiable_and_checks_inputs():
    images = torch.rand(2, 1, 8, 8, requires_grad=True)
    sa.apply_trigger(images, torch.ones(1, 2, 2)).sum().backward()
    assert float(images.grad.sum()) == 2 * (64 - 4)
    with pytest.raises(EpicError):
        sa.apply_trigger(images.detach(), torch.ones(3, 2, 2))  # channel mismatch
    with pytest.raises(EpicError):
        sa.apply_trigger(images.detach(), torch.ones(1, 9, 9))  # larger than the image
    with pytest.raises(EpicError):
        sa.apply_trigger((images.detach() * 255).to(torch.uint8), torch.ones(1, 2, 2))
    with pytest.raises(EpicError):
        sa.apply_trigger(images.detach(), torch.ones(1, 2, 2), placement="center")


class _Constant(nn.Module):
    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((x.shape[0],), self.label), 10).float() + self.w


def test_backdoor_success(digits, surrogate):
    _, test = digits
    sources = test.images[test.labels == 4]
    trigger = sa.make_trigger(2, 1, torch.Generator().manual_seed(0))
    rate = sa.backdoor_success(surrogate, sources, trigger, 7, placement="random",
                               batch_size=16, generator=torch.Generator().manual_seed(0))
    assert 0 <= rate <= 1
    constant = _Constant(7).train()
    assert sa.backdoor_success(constant, sources, trigger, 7, placement="fixed") == 1.0
    assert sa.backdoor_success(constant, sources, trigger, 3, placement="fixed") == 0.0
    assert constant.training, "the model's mode must be restored"
    with pytest.raises(EpicError):
        sa.backdoor_success(surrogate, sources.float(), trigger, 7)
    with pytest.raises(EpicError):
        sa.backdoor_success(surrogate, sources[:0], trigger, 7)


def test_sleeper_metadata(digits, target):
    train, _ = digits
    attack = sa.SleeperAgent(steps=2, flip=False, source_batch=8, placement="fixed")
    poisons = attack.craft(_tiny().eval(), train, target, THREAT, seed=0, device="cpu",
                           progress=False)
    meta = poisons.metadata
    assert meta["source_class"] == target.label and meta["placement"] == "fixed"
    assert meta["patch_size"] == 2 and len(meta["source_indices"]) == 8
    trigger = sa.trigger_from_metadata(poisons)
    assert trigger.shape == (1, 2, 2) and set(trigger.unique().tolist()) <= {0.0, 1.0}
    assert set(meta["hyperparameters"]) == {"steps", "tau", "restarts", "augment", "flip",
                                            "batch_size", "patch_size", "placement", "pattern",
                                            "source_batch", "retrain_rounds"}
    with pytest.raises(EpicError):
        sa.trigger_from_metadata(PoisonSet(**{**_fields(poisons), "metadata": {}}))


def _fields(p: PoisonSet) -> dict:
    return dict(base_indices=p.base_indices, images=p.images, labels=p.labels,
                target_image=p.target_image, target_label=p.target_label,
                adv_label=p.adv_label, eps=p.eps)


def _recording_retrain() -> tuple[list[ImageTensors], object]:
    """A retrain callback that records the splits it is given and stands in for a trainer."""
    seen: list[ImageTensors] = []

    def retrain(split: ImageTensors) -> nn.Module:
        seen.append(split)
        return _tiny(len(seen))

    return seen, retrain


def test_sleeper_retrain_rounds(digits, surrogate, target):
    train, _ = digits
    seen, retrain = _recording_retrain()

    attack = sa.SleeperAgent(steps=6, flip=False, source_batch=16, retrain_rounds=2)
    assert attack.retrain_steps() == [2, 4]
    poisons = attack.craft(surrogate, train, target, THREAT, seed=0, device="cpu",
                           progress=False, retrain=retrain)
    assert len(seen) == 2
    for split in seen:
        assert isinstance(split, ImageTensors) and len(split) == len(train)
        assert torch.equal(split.labels, train.labels)
        moved = (split.images != train.images).flatten(1).any(1).nonzero().flatten()
        assert set(moved.tolist()) <= set(poisons.base_indices.tolist())
        diff = (split.images.int() - train.images.int()).abs()
        assert int(diff.max()) <= EPS
    poisons.validate(train)
    # the callback given to __init__ works too and is not recorded as a hyperparameter
    seen.clear()
    attack = sa.SleeperAgent(steps=3, flip=False, source_batch=16, retrain_rounds=1,
                             retrain=retrain)
    attack.craft(surrogate, train, target, THREAT, seed=0, device="cpu", progress=False)
    assert len(seen) == 1 and "retrain" not in attack.hyperparameters()


def test_gradient_matching_retrains_its_surrogates(digits, surrogate, target):
    train, _ = digits
    seen, retrain = _recording_retrain()

    attack = gm.GradientMatching(steps=6, augment=False, flip=False, retrain_rounds=2)
    assert attack.retrain_steps() == [2, 4]
    poisons = attack.craft([surrogate, surrogate], train, target, THREAT, seed=0, device="cpu",
                           progress=False, retrain=retrain)
    assert len(seen) == 4  # once per surrogate of the ensemble and round
    assert torch.equal(seen[0].images, seen[1].images)  # a round's split is the same
    assert not torch.equal(seen[0].images, seen[2].images)  # the poisons moved in between
    for split in seen:
        moved = (split.images != train.images).flatten(1).any(1).nonzero().flatten()
        assert set(moved.tolist()) <= set(poisons.base_indices.tolist())
        assert int((split.images.int() - train.images.int()).abs().max()) <= EPS
    poisons.validate(train)
    assert poisons.metadata["hyperparameters"]["retrain_rounds"] == 2
    # without rounds the callback is never called, and the poisons are the plain attack's
    plain = gm.GradientMatching(steps=6, augment=False, flip=False)
    again = plain.craft(surrogate, train, target, THREAT, seed=0, device="cpu", progress=False,
                        retrain=retrain)
    assert len(seen) == 4
    assert torch.equal(again.images, gm.GradientMatching(steps=6, augment=False, flip=False).craft(
        surrogate, train, target, THREAT, seed=0, device="cpu", progress=False).images)
    with pytest.raises(EpicError, match="retrain_rounds=1 needs a retrain callback"):
        gm.GradientMatching(steps=6, retrain_rounds=1).craft(surrogate, train, target, THREAT,
                                                          device="cpu", progress=False)
    with pytest.raises(EpicError, match="retrain_rounds must be less than steps=6"):
        gm.GradientMatching(steps=6, retrain_rounds=6)


def test_sleeper_checks(digits, surrogate, target):
    train, _ = digits
    with pytest.raises(EpicError, match="retrain"):
        sa.SleeperAgent(steps=3, retrain_rounds=1).craft(surrogate, train, target, THREAT,
                                                         device="cpu", progress=False)
    with pytest.raises(EpicError):
        sa.SleeperAgent(steps=3, retrain_rounds=3)
    with pytest.raises(EpicError):
        sa.SleeperAgent(placement="center")
    with pytest.raises(EpicError):
        sa.SleeperAgent(patch_size=0)
    with pytest.raises(EpicError):
        sa.SleeperAgent(retrain="train.py")
    with pytest.raises(EpicError, match="patch_size"):
        sa.SleeperAgent(steps=2, patch_size=9).craft(surrogate, train, target, THREAT,
                                                     device="cpu", progress=False)
