"""Training-time defenses: DP-SGD (Opacus) and friendly noise (FRIENDS), through the trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import straight_and_resumed, tiny_model
from epic._callback import TrainingParts
from epic._errors import EpicError
from epic.defenses import DPSGD, FriendlyNoise, create_defense, list_defenses
from epic.defenses.friendly_noise import friendly_perturbation
from epic.training import TrainConfig, Trainer

# Opacus's hooks warn that the first layer's input needs no gradient; that is expected.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

FAST = dict(batch_size=64, lr=0.05, augment="none", progress=False)


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def pretrained(digits):
    """A tiny model trained 3 epochs without defense (a surrogate for the pretrained cases)."""
    trainer = Trainer(tiny_model(), digits[0], config=TrainConfig(epochs=3, **FAST))
    trainer.fit()
    return trainer.model.state_dict()


def from_pretrained(state):
    model = tiny_model(seed=5)
    model.load_state_dict(state)
    return model


def resume_matches(train, cfg, make_defense, tmp_path):
    """An interrupted and resumed run ends as the straight one, with the same learning rates."""
    straight, resumed = straight_and_resumed(train, cfg, lambda: [make_defense()], tmp_path,
                                             model=tiny_model)
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in straight.history]
    return straight, resumed


# ------------------------------------------------------------------------------------ DP-SGD
def test_training_defenses_are_registered():
    assert {"dp-sgd", "friendly-noise"} <= set(list_defenses())
    assert isinstance(create_defense("dp-sgd", noise_multiplier=None), DPSGD)
    assert isinstance(create_defense("friendly-noise"), FriendlyNoise)


@pytest.mark.parametrize("name, options, match", [
    ("dp-sgd", {"noise_multiplier": -0.1}, "noise_multiplier"),
    ("dp-sgd", {"max_grad_norm": 0}, "max_grad_norm"),
    ("dp-sgd", {"max_grad_norm": "4"}, "max_grad_norm"),
    ("friendly-noise", {"friendly_eps": 0}, "friendly_eps"),
    ("friendly-noise", {"friendly_eps": 200}, "friendly_eps"),
    ("friendly-noise", {"friendly_lambda": -1}, "friendly_lambda"),
    ("friendly-noise", {"friendly_steps": 0}, "friendly_steps"),
    ("friendly-noise", {"friendly_lr": 0}, "friendly_lr"),
    ("friendly-noise", {"noise": "gaussian"}, "noise"),
    ("friendly-noise", {"noise_eps": -1}, "noise_eps"),
    ("friendly-noise", {"epoch": -1}, "epoch"),
])
def test_bad_options_are_rejected(name, options, match):
    with pytest.raises(EpicError, match=match):
        create_defense(name, **options)


def test_dp_sgd_trains_a_group_norm_model_differently(digits):
    train, test = digits
    cfg = TrainConfig(epochs=2, **FAST)
    plain = Trainer(tiny_model(), train, test=test, config=cfg)
    plain.fit()
    defense = DPSGD()
    trainer = Trainer(tiny_model(), train, test=test, config=cfg, callbacks=[defense])
    start = weights(trainer.model)
    history = trainer.fit()
    # batch norm (which mixes examples) was replaced; the rest of the model is the same
    modules = dict(trainer.model.named_modules())
    assert isinstance(modules["net.features.1"], nn.GroupNorm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trainer.model.modules())
    assert defense.summary() == {"noise_multiplier": 0.01, "max_grad_norm": 4.0,
                                 "replaced_layers": 2}
    assert [e["event"] for e in trainer.events][0] == "dp-sgd"
    after = weights(trainer.model)
    assert not torch.equal(after, start)
    assert not torch.equal(after, weights(plain.model))
    assert history[-1]["test_acc"] > 0.5
    assert history[-1]["lr"] == plain.history[-1]["lr"]  # the schedule still drives the step
    # unwrapped after training: plain optimizer, and no Opacus hooks left on the model
    assert type(trainer.optimizer) is torch.optim.SGD and trainer.train_module is trainer.model
    trainer.model.eval()
    x = train.images[:4].float().div(255).requires_grad_(True)
    trainer.model(x).sum().backward()
    assert x.grad is not None


def dp_batch(train, defense):
    trainer = Trainer(tiny_model(), train, config=TrainConfig(epochs=1, **FAST),
                      callbacks=[defense])
    defense.on_train_start(trainer)
    parts = defense.configure_training(trainer, TrainingParts(
        trainer.model, trainer.train_module, trainer.optimizer))  # wrapped, Opacus style
    x = train.images[:64].float() / 255
    loss = F.cross_entropy(parts.module(x), train.labels[:64])
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = parts.optimizer.params
    plain = torch.cat([p.grad.flatten() for p in params])
    parts.optimizer.pre_step()  # clip per example, add noise, average
    return plain, torch.cat([p.grad.flatten() for p in params])


def test_dp_sgd_without_clipping_or_noise_is_the_ordinary_gradient(digits):
    plain, shaped = dp_batch(digits[0], DPSGD(noise_multiplier=0.0, max_grad_norm=1e6))
    torch.testing.assert_close(shaped, plain, rtol=1e-4, atol=1e-6)


def test_dp_sgd_clips_every_example(digits):
    plain, shaped = dp_batch(digits[0], DPSGD(noise_multiplier=0.0, max_grad_norm=1e-3))
    assert plain.norm() > 0.1
    assert shaped.norm() <= 1e-3 * (1 + 1e-4)  # a mean of vectors of norm <= 1e-3
    _, noisy = dp_batch(digits[0], DPSGD(noise_multiplier=1.0, max_grad_norm=1e-3))
    assert noisy.norm() > 2 * shaped.norm()  # noise of std 1e-3 / 64 on every coordinate


def test_dp_sgd_in_transfer_trains_only_the_head(digits, pretrained):
    train, test = digits
    cfg = TrainConfig(epochs=2, scenario="transfer", **{**FAST, "lr": 0.01})
    trainer = Trainer(from_pretrained(pretrained), train, test=test, config=cfg,
                      callbacks=[DPSGD()])
    trainer.fit()
    after = trainer.model.state_dict()
    for name, value in pretrained.items():
        if name.startswith("net.fc."):
            assert not torch.equal(value, after[name]), name
        else:
            assert torch.equal(value, after[name]), name  # extractor and its batch norm kept
    assert trainer.train_module is trainer.head  # (unwrapped again after training)
    assert [e["replaced_layers"] for e in trainer.events if e["event"] == "dp-sgd"] == [[]]
    assert trainer.history[-1]["test_acc"] > 0.5


def test_dp_sgd_rejects_in_place_layer_outputs_clearly(digits):
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.norm = nn.GroupNorm(1, 2)
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            out = self.norm(self.conv(x))
            out += x
            return self.fc(out.flatten(1))

    trainer = Trainer(InPlace(), digits[0], config=TrainConfig(epochs=1, **FAST),
                      callbacks=[DPSGD()])
    with pytest.raises(EpicError, match="in place"):
        trainer.fit()


def test_dp_sgd_resume_reproduces_an_uninterrupted_run(digits, tmp_path):
    cfg = TrainConfig(epochs=4, **FAST)
    straight, resumed = resume_matches(digits[0], cfg, DPSGD, tmp_path)
    assert isinstance(dict(resumed.model.named_modules())["net.features.1"], nn.GroupNorm)


# ------------------------------------------------------------------------------ friendly noise
def test_friendly_perturbation_is_large_but_keeps_predictions(digits, pretrained):
    train, _ = digits
    model = from_pretrained(pretrained)
    images = train.images[:512]
    delta, agreement = friendly_perturbation(model, images, eps=16, steps=10,
                                             generator=torch.Generator().manual_seed(0))
    assert delta.dtype == torch.int8 and delta.shape == images.shape
    assert int(delta.abs().max()) <= 16
    moved = images.to(torch.int16) + delta
    assert int(moved.min()) >= 0 and int(moved.max()) <= 255
    # it grew beyond its start (uniform noise of half the budget: mean |delta| = 4 levels)
    assert float(delta.float().abs().mean()) > 6
    model.eval()
    with torch.no_grad():
        before = model(images.float() / 255).argmax(1)
        after = model(moved.float() / 255).argmax(1)
    assert float((before == after).float().mean()) >= 0.9
    assert agreement == pytest.approx(float((before == after).float().mean()))


@pytest.mark.parametrize("noise", ["bernoulli", "uniform"])
def test_friendly_noise_stays_within_its_budgets(digits, pretrained, noise):
    train, _ = digits
    original = train.images.clone()
    defense = FriendlyNoise(epoch=0, friendly_eps=8, friendly_steps=3, noise=noise,
                            noise_eps=4)
    trainer = Trainer(from_pretrained(pretrained), train,
                      config=TrainConfig(epochs=1, **FAST), callbacks=[defense])
    defense.on_train_start(trainer)
    defense.on_epoch_start(trainer, 0)
    images = defense.training_images(trainer, 0)  # handed to the trainer, once
    assert defense.training_images(trainer, 0) is None
    assert torch.equal(train.images, original)  # the split itself is not modified
    shift = images.to(torch.int16) - original.to(torch.int16)
    assert int(shift.abs().max()) <= 8 and float(shift.float().abs().mean()) > 0
    assert torch.equal(shift.to(torch.int8), defense.delta)
    idx = torch.arange(200)
    x = images[idx].float() / 255
    out = defense.transform_batch(trainer, idx, x)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - original[idx].float() / 255).abs().max() <= (8 + 4) / 255 + 1e-6
    noise_part = (out - x).abs()
    assert noise_part.max() <= 4 / 255 + 1e-6 and noise_part.mean() > 0.5 / 255
    if noise == "bernoulli":  # +-4/255 exactly wherever [0, 1] did not clip
        inside = (x > 4 / 255) & (x < 1 - 4 / 255)
        torch.testing.assert_close(noise_part[inside], torch.full_like(noise_part[inside],
                                                                       4 / 255))


def test_friendly_noise_end_to_end_from_scratch(digits):
    train, test = digits
    defense = FriendlyNoise(friendly_steps=3)
    trainer = Trainer(tiny_model(), train, test=test, config=TrainConfig(epochs=2, **FAST),
                      callbacks=[defense])
    trainer.fit()
    assert defense.at == 1  # the first learning-rate decay of a 2-epoch schedule
    event = next(e for e in trainer.events if e["event"] == "friendly-noise")
    assert event["epoch"] == 2 and event["mean_abs_delta"] > 0
    assert defense.summary()["agreement"] == event["agreement"]
    assert not torch.equal(trainer.images, train.images)
    assert trainer.history[-1]["test_acc"] > 0.5


def test_friendly_noise_in_transfer_recomputes_the_feature_cache(digits, pretrained):
    train, test = digits
    cfg = TrainConfig(epochs=2, scenario="transfer", **{**FAST, "lr": 0.01})
    defense = FriendlyNoise(friendly_steps=3)
    trainer = Trainer(from_pretrained(pretrained), train, test=test, config=cfg,
                      callbacks=[defense])
    clean_cache = trainer.cache
    trainer.fit()
    assert defense.at == 0
    assert trainer.cache.shape == clean_cache.shape
    assert not torch.equal(trainer.cache, clean_cache)
    assert torch.equal(trainer.images, train.images)  # images untouched, only features
    x = trainer.cache[:4]
    assert defense.transform_batch(trainer, torch.arange(4), x) is x
    assert trainer.history[-1]["test_acc"] > 0.5


def test_friendly_noise_resume_reproduces_an_uninterrupted_run(digits, tmp_path):
    cfg = TrainConfig(epochs=3, **FAST)
    straight, resumed = resume_matches(
        digits[0], cfg, lambda: FriendlyNoise(epoch=1, friendly_steps=2), tmp_path)
    assert torch.equal(resumed.images, straight.images)  # the perturbation was re-applied
