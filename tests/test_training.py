"""The trainer: augmentation, hyperparameters, learning, checkpoints, and EPIC as a callback."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from conftest import small_model, straight_and_resumed
from epic._errors import EpicError
from epic.data import ImageTensors
from epic.data.augment import random_crop, random_flip
from epic.defenses import EpicDefense, create_defense, list_defenses
from epic.models.features import find_classifier
from epic.training import TrainConfig, Trainer

FAST = dict(batch_size=64, lr=0.05, augment="none", progress=False)


def test_random_crop_shifts_content_within_padding():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for b in range(2):  # each output is a window of the zero-padded image
        padded = torch.nn.functional.pad(x[b], (2,) * 4)
        windows = padded.unfold(1, 6, 1).unfold(2, 6, 1).reshape(1, -1, 6, 6)
        assert any(torch.equal(out[b, 0], w) for w in windows[0])


def test_random_flip_flips_about_half():
    x = torch.arange(1000 * 4, dtype=torch.float32).reshape(1000, 1, 1, 4)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out != x).any(3).squeeze()
    assert 400 < int(flipped.sum()) < 600
    assert torch.equal(out[flipped], x[flipped].flip(3))


def test_config_validation_and_milestones():
    cfg = TrainConfig(epochs=40)
    assert cfg.milestone_epochs() == [15, 25, 35]
    with pytest.raises(EpicError, match="augment"):
        TrainConfig(augment="rotate")
    with pytest.raises(EpicError, match="milestones"):
        TrainConfig(milestones=(0.5, 1.5))
    with pytest.raises(EpicError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(EpicError, match="amp_dtype.*bfloat16"):
        TrainConfig(amp_dtype="fp8")
    # a string from YAML is named as such (type before range), never a TypeError
    for key, value, message in [("lr", "0.1", "lr must be a finite number"),
                                ("momentum", 1.0, "momentum must be >= 0 and < 1"),
                                ("milestones", "0.5", "milestones must be a list of numbers"),
                                ("amp", "yes", "amp must be true or false")]:
        with pytest.raises(EpicError, match=message):
            TrainConfig(**{key: value})


def test_augment_defaults_to_the_datasets_and_the_trainer_needs_a_value(digits):
    assert TrainConfig().augment is None  # run_training fills in the dataset's default
    with pytest.raises(EpicError, match=r"augment is None.*'crop-flip'"):
        Trainer(small_model(), digits[0], config=TrainConfig(epochs=1, progress=False))


def test_config_from_and_to_plain_data():
    cfg = TrainConfig.from_dict({"epochs": 3, "milestones": [0.5, 0.25], "lr": None})
    assert cfg == TrainConfig(epochs=3, milestones=(0.25, 0.5))  # None keeps the default
    data = cfg.to_dict()
    assert data["milestones"] == [0.25, 0.5] and data["augment"] is None
    assert TrainConfig.from_dict(data) == cfg
    with pytest.raises(EpicError, match=r"unknown training option\(s\) \['epochz'\]"):
        TrainConfig.from_dict({"epochz": 3})


def test_autocast_and_fp16_loss_scaling_only_on_cuda(digits):
    """amp_dtype picks autocast's dtype on CUDA, and float16 turns on a GradScaler there; on
    the CPU autocast is off (a nullcontext, whatever the dtype) and the scaler a pass-through."""
    cfg = dict(epochs=1, **FAST)
    fp16 = Trainer(small_model(), digits[0], config=TrainConfig(amp_dtype="float16", **cfg))
    assert fp16.scaler.is_enabled() == torch.cuda.is_available()
    bf16 = Trainer(small_model(), digits[0], config=TrainConfig(**cfg))
    off = Trainer(small_model(), digits[0], config=TrainConfig(amp=False, **cfg))
    assert not bf16.scaler.is_enabled() and not off.scaler.is_enabled()
    for trainer in (fp16, bf16, off):
        if trainer.device.type == "cpu":
            assert isinstance(trainer._autocast(), contextlib.nullcontext)
    # what each setting asks for on a CUDA device (torch.autocast keeps its dtype even where
    # CUDA is missing and it disables itself, with a warning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for trainer, dtype in ((fp16, torch.float16), (bf16, torch.bfloat16)):
            trainer.cuda = True
            autocast = trainer._autocast()
            assert isinstance(autocast, torch.autocast)
            assert autocast.device == "cuda" and autocast.fast_dtype == dtype
        off.cuda = True
        assert isinstance(off._autocast(), contextlib.nullcontext)


def test_weight_decay_skips_norm_and_bias(digits):
    trainer = Trainer(small_model(), digits[0], config=TrainConfig(epochs=1, **FAST))
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"])
    assert trainer.optimizer.param_groups[0]["nesterov"]


def test_trainer_learns_digits(digits):
    train, test = digits
    trainer = Trainer(small_model(), train, test=test, config=TrainConfig(epochs=4, **FAST))
    history = trainer.fit()
    assert len(history) == 4
    assert history[-1]["test_acc"] > 0.85
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_channels_last_and_the_inference_batch_on_cpu(digits):
    """Channels-last is the default on a CPU too (faster there); the inference batch resolves
    to 128 on a CPU; both layouts learn the same model up to float rounding."""
    train, test = digits
    seen = []
    results = {}
    for channels_last in (True, False):
        torch.manual_seed(0)
        model = small_model()
        trainer = Trainer(model, train, test=test,
                          config=TrainConfig(epochs=2, channels_last=channels_last, **FAST))
        assert trainer.eval_batch_size == 128
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        hook = conv.register_forward_hook(lambda m, args, out, cl=channels_last: seen.append(
            (cl, out.is_contiguous(memory_format=torch.channels_last))))
        trainer.fit()
        hook.remove()
        results[channels_last] = trainer.predict()[0]
        weights = [p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1]
        assert weights and all(
            p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in weights)
    assert {layout for cl, layout in seen if cl} == {True}
    assert {layout for cl, layout in seen if not cl} == {False}
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=0.05)
    assert Trainer(small_model(), train, config=TrainConfig(eval_batch_size=7, **FAST)
                   ).eval_batch_size == 7


@pytest.mark.parametrize("scenario, make", [
    ("scratch", lambda: EpicDefense(warmup=1, interval=1)),
    # the training steps' logits of the epoch before a round are in the checkpoint
    ("scratch", lambda: EpicDefense(warmup=1, interval=1, proxy_pass="training")),
    # and its features, and epic-plus's first-layer statistics of the last separate pass
    ("finetune", lambda: create_defense("epic-plus", fraction=0.05, patience=2, interval=2,
                                        stem="always")),
], ids=["separate", "training", "epic-plus-training-features"])
def test_resume_reproduces_an_uninterrupted_run(digits, tmp_path, scenario, make):
    train, test = digits
    cfg = TrainConfig(epochs=4, scenario=scenario, milestones=(), **FAST)
    straight, resumed = straight_and_resumed(train, cfg, lambda: [make()], tmp_path)
    assert torch.equal(resumed.active, straight.active)
    assert [e["event"] for e in resumed.events] == [e["event"] for e in straight.events]
    def no_time(rounds):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]

    assert no_time(resumed.callbacks[0].rounds) == no_time(straight.callbacks[0].rounds)


@pytest.mark.parametrize("proxy_pass", ["separate", "training", "training-features"])
def test_epic_callback_drops_isolated_mislabelled_examples_far_above_chance(digits, proxy_pass):
    train, test = digits
    g = torch.Generator().manual_seed(0)
    bad = torch.randperm(len(train), generator=g)[:20]
    labels = train.labels.clone()
    labels[bad] = (labels[bad] + 1 + torch.randint(0, 9, (20,), generator=g)) % 10
    noisy = ImageTensors(train.images, labels, train.classes)
    mask = torch.zeros(len(train), dtype=torch.bool)
    mask[bad] = True
    defense = create_defense("epic", subset_fraction=0.1, warmup=3, interval=1,
                             proxy_pass=proxy_pass)
    trainer = Trainer(small_model(), noisy, test=test, poison_mask=mask,
                      config=TrainConfig(epochs=6, **FAST), callbacks=[defense])
    trainer.fit()
    rounds = [e for e in trainer.events if e["event"] == "selection"]
    assert rounds and rounds[-1]["poisons_total"] == 20
    dropped = ~trainer.active
    poison_rate = float(dropped[mask].float().mean())
    clean_rate = float(dropped[~mask].float().mean())
    assert poison_rate >= 0.5 and poison_rate > 5 * clean_rate
    # dropped examples stay dropped: the active set only shrinks
    kept = [r["kept"] for r in rounds]
    assert kept == sorted(kept, reverse=True)


def test_training_pass_reuses_the_epochs_logits_and_predicts_only_the_dropped(digits):
    """proxy_pass='training': the logits of the epoch before a round come from its training
    steps; the round's own inference covers only the examples not trained on."""
    train, _ = digits
    defense = create_defense("epic", subset_fraction=0.3, warmup=1, interval=1, until=3,
                             proxy_pass="training")
    trainer = Trainer(small_model(), train, config=TrainConfig(epochs=5, **FAST),
                      callbacks=[defense])
    calls, real = [], trainer.predict

    def counting(indices=None, **kw):
        calls.append(len(train.labels) if indices is None else len(indices))
        return real(indices, **kw)

    trainer.predict = counting
    trainer.fit()
    rounds = [e for e in trainer.events if e["event"] == "selection"]
    assert len(rounds) == 3
    # round 1 (epoch 1) and later: the recorded epoch covered the then-active examples, so
    # inference ran on the ones dropped before that epoch only (none before round 1)
    dropped_before = [0] + [len(train) - r["kept"] for r in rounds[:-1]]
    assert calls == [d for d in dropped_before if d]
    assert defense._recorded == []  # nothing recorded after the last round
    with pytest.raises(EpicError, match="proxy_pass='training'"):
        create_defense("epic", proxy="last-layer", proxy_pass="training")


@pytest.mark.parametrize("proxy", ["logits", "last-layer"])
def test_training_features_pass_equals_the_separate_pass_with_a_frozen_extractor(digits, proxy):
    """proxy_pass='training-features' puts the features the training steps saw through the
    head as it is at the round: with a frozen extractor and no augmentation those are the
    separate pass's proxies, row for row, also for the examples dropped (predicted)."""
    train, _ = digits
    cfg = TrainConfig(epochs=5, scenario="transfer", **{**FAST, "lr": 0.5})
    runs = {}
    for proxy_pass in ("separate", "training-features"):
        defense = create_defense("epic", subset_fraction=0.3, warmup=1, interval=1, until=4,
                                 proxy=proxy, proxy_pass=proxy_pass, record_proxies=True)
        Trainer(small_model(), train, config=cfg, callbacks=[defense]).fit()
        runs[proxy_pass] = defense.proxies
    assert len(runs["separate"]) == 4 and runs["separate"][-1]["keep"].sum() < len(train) - 20
    for a, b in zip(runs["separate"], runs["training-features"], strict=True):
        torch.testing.assert_close(a["vectors"], b["vectors"], rtol=1e-5, atol=1e-6)
        assert torch.equal(a["keep"], b["keep"])


def test_training_features_pass_predicts_only_the_dropped_and_unhooks(digits):
    train, _ = digits
    defense = create_defense("epic", subset_fraction=0.3, warmup=1, interval=1, until=3,
                             proxy="last-layer", proxy_pass="training-features")
    trainer = Trainer(small_model(), train, config=TrainConfig(epochs=5, **FAST),
                      callbacks=[defense])
    calls, real = [], trainer.predict

    def counting(indices=None, **kw):
        calls.append((len(train.labels) if indices is None else len(indices),
                      kw.get("features")))
        return real(indices, **kw)

    trainer.predict = counting
    trainer.fit()
    rounds = [e for e in trainer.events if e["event"] == "selection"]
    assert len(rounds) == 3 and rounds[-1]["dropped_total"] > 0
    dropped_before = [0] + [len(train) - r["kept"] for r in rounds[:-1]]
    assert calls == [(d, True) for d in dropped_before if d]
    assert defense._hook is None and not find_classifier(trainer.model)._forward_hooks


def test_each_round_logs_the_pass_it_used(digits):
    """A round with nothing recorded before it (here: before the first epoch) runs the
    separate pass and says so; the later ones reuse the training steps' features."""
    train, _ = digits
    defense = create_defense("epic", subset_fraction=0.3, warmup=0, interval=1, until=2,
                             proxy="last-layer", proxy_pass="training-features")
    trainer = Trainer(small_model(), train, config=TrainConfig(epochs=3, **FAST),
                      callbacks=[defense])
    trainer.fit()
    rounds = [e for e in trainer.events if e["event"] == "selection"]
    assert [r["proxy_pass"] for r in rounds] == ["separate", "training-features",
                                                 "training-features"]


def test_predict_precision_runs_the_model_in_that_dtype_and_returns_float32(digits):
    train, _ = digits
    trainer = Trainer(small_model(), train, config=TrainConfig(epochs=1, **FAST))
    trainer.fit()
    seen = []
    hook = find_classifier(trainer.model).register_forward_hook(
        lambda m, i, out: seen.append(out.dtype))
    full, _ = trainer.predict(precision="float32")
    half, _ = trainer.predict(precision="bfloat16")
    hook.remove()
    assert set(seen[:len(seen) // 2]) == {torch.float32}
    assert set(seen[len(seen) // 2:]) == {torch.bfloat16}
    assert full.dtype == half.dtype == torch.float32
    assert torch.allclose(full, half, atol=0.2) and not torch.equal(full, half)
    with pytest.raises(EpicError, match="precision.*float32"):
        trainer.predict(precision="float16")


def test_epic_proxy_precision_reaches_the_proxy_pass(digits):
    train, _ = digits
    defense = create_defense("epic", warmup=1, interval=1, until=2,
                             proxy_precision="bfloat16")
    trainer = Trainer(small_model(), train, config=TrainConfig(epochs=3, **FAST),
                      callbacks=[defense])
    asked, real = [], trainer.predict

    def spy(indices=None, **kw):
        asked.append(kw.get("precision"))
        return real(indices, **kw)

    trainer.predict = spy
    trainer.fit()
    assert asked == ["bfloat16", "bfloat16"] and len(defense.rounds) == 2
    assert create_defense("epic").proxy_precision == "float32"  # the authors' arithmetic
    with pytest.raises(EpicError, match="proxy_precision"):
        create_defense("epic-plus", proxy_precision="half")


def test_epic_runs_up_to_and_including_the_last_lr_decay(digits):
    defense = EpicDefense(warmup=1, interval=2)
    trainer = Trainer(small_model(), digits[0], config=TrainConfig(epochs=8, **FAST),
                      callbacks=[defense])
    trainer.fit()
    # decays at 3, 5, 7 (3/8, 5/8, 7/8 of 8): rounds at even epochs >= 1, up to 7 included
    assert [r["epoch"] - 1 for r in defense.rounds] == [2, 4, 6]
    defense = EpicDefense(warmup=1, interval=1)
    Trainer(small_model(), digits[0], config=TrainConfig(epochs=8, **FAST),
            callbacks=[defense]).fit()
    assert [r["epoch"] - 1 for r in defense.rounds] == [1, 2, 3, 4, 5, 6, 7]


def test_epic_without_decay_runs_to_the_end_and_a_late_warmup_means_no_round(digits):
    flat = {**FAST, "milestones": ()}
    defense = EpicDefense(warmup=2, interval=2)
    Trainer(small_model(), digits[0], config=TrainConfig(epochs=7, **flat),
            callbacks=[defense]).fit()
    assert [r["epoch"] - 1 for r in defense.rounds] == [2, 4, 6]
    late = EpicDefense(warmup=6, interval=1)  # the last decay (epoch 5) comes first
    trainer = Trainer(small_model(), digits[0], config=TrainConfig(epochs=8, **{
        **FAST, "milestones": (0.25, 0.625)}), callbacks=[late])
    trainer.fit()
    assert late.rounds == [] and bool(trainer.active.all())


def test_dropped_this_round_counts_only_new_drops(digits):
    defense = EpicDefense(warmup=1, interval=1, subset_fraction=0.3)
    Trainer(small_model(), digits[0], config=TrainConfig(epochs=6, **FAST),
            callbacks=[defense]).fit()
    totals = [r["dropped_total"] for r in defense.rounds]
    news = [r["dropped_this_round"] for r in defense.rounds]
    assert news == [totals[0]] + [b - a for a, b in zip(totals, totals[1:], strict=False)]
    assert any(r["flagged"] > r["dropped_this_round"] for r in defense.rounds[1:])


def test_last_layer_proxy_runs_through_the_trainer(digits):
    defense = EpicDefense(warmup=1, interval=1, proxy="last-layer")
    Trainer(small_model(), digits[0], config=TrainConfig(epochs=2, **FAST),
            callbacks=[defense]).fit()
    assert len(defense.rounds) == 1 and defense.rounds[0]["medoids"] > 0


def test_defense_registry():
    assert {"none", "epic"} <= set(list_defenses())
    with pytest.raises(EpicError, match="unknown defense 'nope'; choose from"):
        create_defense("nope")
    with pytest.raises(EpicError, match="proxy"):
        create_defense("epic", proxy="hessian")


def test_bad_splits_are_rejected(digits):
    train, _ = digits
    bad = ImageTensors.__new__(ImageTensors)
    object.__setattr__(bad, "images", train.images.float())
    object.__setattr__(bad, "labels", train.labels)
    with pytest.raises(EpicError, match="uint8"):
        Trainer(small_model(), bad, config=TrainConfig(epochs=1, **FAST))


def test_corrupt_checkpoint_gives_a_clear_error(digits, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    trainer = Trainer(small_model(), digits[0], config=TrainConfig(epochs=1, **FAST),
                      out_dir=tmp_path)
    with pytest.raises(EpicError, match="cannot resume"):
        trainer.fit()


def test_resuming_with_other_defenses_names_both(digits, tmp_path):
    cfg = TrainConfig(epochs=2, **FAST)
    Trainer(small_model(), digits[0], config=cfg, out_dir=tmp_path,
            callbacks=[EpicDefense(warmup=1)]).fit()
    other = Trainer(small_model(), digits[0], config=TrainConfig(epochs=3, **FAST),
                    out_dir=tmp_path, callbacks=[create_defense("random-drop", count=3)])
    with pytest.raises(EpicError, match=r"written with the defense\(s\) \['epic'\], this run "
                                        r"has \['random-drop'\]"):
        other.fit()
