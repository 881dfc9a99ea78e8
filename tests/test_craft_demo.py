"""epic craft and epic demo end to end, on digits, in their reduced sizes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from epic import AttackSpec, DefenseSpec, EpicError
from epic.attacks import ThreatModel
from epic.cli import main
from epic.data import PoisonSet, load_split
from epic.evaluation import (
    CraftConfig,
    RunConfig,
    choose_targets,
    craft_poisons,
    pretrain,
    run_training,
)
from epic.evaluation.craft import retrainer
from epic.evaluation.demo import DemoConfig
from epic.training import TrainConfig


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory):
    path = tmp_path_factory.mktemp("sur") / "s.pt"
    pretrain(RunConfig(out=str(path) + ".run",
                       train=TrainConfig(epochs=3, batch_size=64, lr=0.05, progress=False)), path)
    return path


def test_an_attack_spec_reads_the_yaml_layout_and_round_trips():
    raw = {"name": "gradient-matching", "budget": 0.02, "eps": 8, "options": {"steps": 3}}
    spec = AttackSpec.parse(raw)
    assert spec == AttackSpec("gradient-matching", ThreatModel(budget=0.02, eps=8), {"steps": 3})
    data = spec.to_dict()
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # plain data only
    assert AttackSpec.parse(data) == spec == AttackSpec.parse(spec)
    assert AttackSpec.parse("bullseye-polytope") == AttackSpec("bullseye-polytope")
    assert AttackSpec.parse({"name": "bullseye-polytope", "num_poisons": None}).threat == \
        ThreatModel()  # None keeps the default
    assert spec.create().steps == 3
    cfg = CraftConfig(attack=raw, checkpoints=[])  # digits: crafting does not augment either
    resolved = AttackSpec("gradient-matching", ThreatModel(budget=0.02, eps=8),
                          {"steps": 3, "augment": False, "flip": False})
    assert cfg.attack == resolved and AttackSpec.parse(cfg.to_dict()["attack"]) == resolved


@pytest.mark.parametrize("value, message", [
    ("magic", "unknown attack 'magic'; choose from: "),
    ({"name": "bullseye-polytope", "epsilon": 8}, "unknown key(s) ['epsilon'] of attack"),
    ({"name": "bullseye-polytope", "eps": "8"}, "eps must be a finite number, got '8'"),
    ({"name": "bullseye-polytope", "budget": 2}, "budget must be a fraction in (0, 1]"),
    ({"name": "bullseye-polytope", "poison_class": 1.5}, "poison_class must be an integer"),
    ({"name": "bullseye-polytope", "options": [1]}, "options of attack 'bullseye-polytope'"),
    ({"eps": 8}, "an attack is a name or a mapping"),
    (3, "an attack is a name or a mapping"),
])
def test_bad_attack_specs_are_one_line_errors(value, message):
    with pytest.raises(EpicError) as err:
        AttackSpec.parse(value)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_choose_targets_never_picks_the_true_class(digits):
    _, test = digits
    pairs = choose_targets(test, 50, seed=3)
    assert len({i for i, _ in pairs}) == 50
    assert all(int(test.labels[i]) != adv for i, adv in pairs)
    assert pairs == choose_targets(test, 50, seed=3)


def test_craft_cli_writes_valid_poisons_and_resumes(surrogate, tmp_path, capsys):
    out = tmp_path / "poisons"
    args = ["craft", "--attack", "bullseye-polytope", "--checkpoint", str(surrogate),
            "--out", str(out), "--targets", "2", "--num-poisons", "5", "--eps", "16",
            "--option", "steps=5", "--benchmark-format", "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    listing = json.loads((out / "targets.json").read_text())
    assert len(listing["trials"]) == 2
    train = load_split("digits", None, train=True)
    for trial in listing["trials"]:
        poisons = PoisonSet.load(trial["file"])
        poisons.validate(train)  # in range, clean label, within eps
        assert (poisons.target_index, poisons.adv_label) == (trial["target_index"],
                                                             trial["adv_label"])
        bench = PoisonSet.load(out / f"trial-{trial['trial']:03d}" / "benchmark")
        assert torch.equal(bench.images, poisons.images)
    stamp = (out / "trial-000" / "poisons.npz").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        main(args)  # rerun: existing trials are kept, not recrafted
    assert (out / "trial-000" / "poisons.npz").stat().st_mtime_ns == stamp
    # another seed draws other targets: the stored trials are refused, not reused
    capsys.readouterr()
    assert main([*args, "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "trial-000/poisons.npz holds poisons for test image" in err and "--out" in err
    assert (out / "trial-000" / "poisons.npz").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("extra, message", [
    (["--attack", "nope"], "unknown attack 'nope'"),
    (["--attack", "bullseye-polytope", "--option", "stepz=3"], "has no option(s) ['stepz']"),
    (["--attack", "bullseye-polytope", "--eps", "300"], "eps must be in (0, 255]"),
    (["--attack", "bullseye-polytope", "--target-index", "3"], "together"),
])
def test_craft_bad_input(surrogate, tmp_path, capsys, extra, message):
    code = main(["craft", "--checkpoint", str(surrogate), "--out", str(tmp_path / "p"),
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p" / "trial-000" / "poisons.npz").exists()


def test_craft_with_missing_checkpoint(tmp_path):
    with pytest.raises(EpicError, match="does not exist"):
        craft_poisons(CraftConfig(attack="feature-collision", checkpoints=[str(tmp_path / "x")],
                                  out=str(tmp_path / "p"), progress=False))


def test_the_retrainer_trains_like_the_checkpoint(surrogate, tmp_path):
    from epic.models import load_model, save_model

    split = load_split("digits", None, train=True)
    retrain = retrainer(surrogate)
    first, second = retrain(split), retrain(split)  # two members of an ensemble
    assert not first.training and not second.training
    assert type(first) is type(load_model(surrogate))

    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert not torch.equal(flat(first), flat(second))  # distinct seeds within a round
    assert torch.equal(flat(first), flat(retrainer(surrogate)(split)))  # a resumed run
    bare = tmp_path / "bare.pt"  # a model file without the recipe of `epic pretrain`
    save_model(bare, first, {"name": "convnet", "num_classes": 10, "in_channels": 1})
    with pytest.raises(EpicError, match="records no training recipe"):
        retrainer(bare)


def test_craft_retrains_the_surrogate_from_its_recipe(surrogate, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["craft", "--checkpoint", str(surrogate), "--attack", "gradient-matching",
              "--option", "steps=4", "--option", "retrain_rounds=1", "--target-index", "3",
              "--adv-class", "5", "--out", str(tmp_path / "p"), "--no-progress"])
    assert exit_.value.code == 0, capsys.readouterr().err
    poisons = PoisonSet.load(tmp_path / "p" / "trial-000" / "poisons.npz")
    assert poisons.metadata["hyperparameters"]["retrain_rounds"] == 1


def test_the_demo_config_is_made_of_run_pieces():
    cfg = DemoConfig(attack={"name": "feature-collision", "eps": 64},
                     victim={"epochs": 5, "scenario": "transfer"},
                     defense={"name": "epic", "options": {"until": 9}})
    assert cfg.attack == AttackSpec("feature-collision", ThreatModel(eps=64))
    assert cfg.victim == TrainConfig(epochs=5, scenario="transfer")
    data = cfg.to_dict()
    assert data["defense"] == {"name": "epic", "options": {"until": 9}}
    assert json.loads(json.dumps(data)) == data  # plain data for demo.json
    assert data["variant"] == {"name": "epic-plus", "options": {}}
    with pytest.raises(EpicError, match="defense must be an 'epic' spec, got 'jpeg'"):
        DemoConfig(defense="jpeg")
    with pytest.raises(EpicError, match="variant must be an EPIC variant .* got 'deep-knn'"):
        DemoConfig(variant="deep-knn")
    assert [key for key, _ in DemoConfig(variant=None).columns()] == ["none", "epic"]


def test_demo_quick_mode(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert all(title in printed for title in ("undefended", "EPIC-0.1", "EPIC-plus",
                                              "random drop"))
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        for defense in ("none", "epic", "epic-plus", "random-drop"):
            r = row[defense]
            assert r["poisons_total"] == 13 and 0 <= r["poisons_dropped"] <= 13
            assert 0.5 < r["clean_test_acc"] <= 1.0
        plus, control = row["epic-plus"], row["random-drop"]  # the control drops as many
        assert plus["poisons_dropped"] + plus["clean_dropped"] > 0
        assert (control["poisons_dropped"] + control["clean_dropped"]
                == plus["poisons_dropped"] + plus["clean_dropped"])
    assert result["totals"]["none"]["poisons_dropped"] == 0  # undefended drops nothing
    png = (tmp_path / "demo" / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_sleeper_agent_runs_are_scored_on_patched_source_images(surrogate, tmp_path):
    spec = AttackSpec("sleeper-agent", ThreatModel(eps=16, num_poisons=13),
                      {"steps": 3, "flip": False})
    trials = craft_poisons(CraftConfig(attack=spec, checkpoints=[str(surrogate)],
                                       targets=[(0, 3)], out=str(tmp_path / "p"),
                                       progress=False))
    summary = run_training(RunConfig(out=str(tmp_path / "run"), poisons=trials[0]["file"],
                                     defense=DefenseSpec("none"),
                                     train=TrainConfig(epochs=1, progress=False)))
    assert 0.0 <= summary["backdoor_success"] <= 1.0
    assert summary["attack_success"] == (summary["backdoor_success"] > 0.5)


def test_crafting_augments_as_the_victim_trains_unless_the_options_say_otherwise():
    def options(attack, **kw):
        return CraftConfig(attack=attack, checkpoints=["s.pt"], **kw).attack.options

    # digits victims train without augmentation: no crops or flips while crafting
    assert options("gradient-matching", dataset="digits") == {"augment": False, "flip": False}
    assert options("gradient-matching", dataset="cifar10") == {"augment": True, "flip": True}
    assert options("sleeper-agent", dataset="mnist") == {"augment": True, "flip": False}
    # a bench whose victims train without augmentation on CIFAR-10
    assert options("gradient-matching", dataset="cifar10", augmentation="none") == {
        "augment": False, "flip": False}
    # a victim that only flips: the attack cannot flip without cropping, so it does neither
    assert options("gradient-matching", dataset="cifar10", augmentation="flip")["augment"] is False
    # options given explicitly win; attacks without these options keep theirs
    assert options({"name": "gradient-matching", "options": {"augment": True}},
                   dataset="digits") == {"augment": True, "flip": False}
    assert options({"name": "bullseye-polytope", "options": {"steps": 5}},
                   dataset="digits") == {"steps": 5}
    with pytest.raises(EpicError, match="augmentation"):
        options("gradient-matching", dataset="digits", augmentation="rotate")
