"""The command line and the run writer: results on disk, resume, one-line errors."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import typer
import yaml

from epic import DefenseSpec, EpicError
from epic.cli import main
from epic.cli.main import app
from epic.data import PoisonSet
from epic.defenses import DEFENSES, list_defenses
from epic.evaluation import RunConfig, run_training
from epic.training import TrainConfig


def run_cli(*args: str) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only add overhead
    proc = subprocess.run([sys.executable, "-m", "epic", *args],
                          capture_output=True, text=True, timeout=300, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def run_main(capsys, *args: str) -> tuple[int, str]:
    """The command line in this process (no ~9 s of imports per call): exit code and output."""
    try:
        code = main(list(args))
    except SystemExit as exit_:  # typer's usage errors, and the commands' own exits
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def poison_file(digits, tmp_path):
    train, test = digits
    adv, target_index = 3, int((test.labels == 8).nonzero()[0])
    base = (train.labels == adv).nonzero().squeeze(1)[:5]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(-8, 9, train.images[base].shape, generator=gen)
    images = (train.images[base].int() + noise).clamp(0, 255).to(torch.uint8)
    poisons = PoisonSet(base_indices=base, images=images, labels=train.labels[base],
                        target_image=test.images[target_index], target_label=8, adv_label=adv,
                        eps=8.0, target_index=target_index, metadata={"attack": "test-noise"})
    return poisons.save(tmp_path / "poisons.npz")


def test_help_lists_the_commands():
    code, out = run_cli("--help")
    assert code == 0
    for command in ("train", "list", "demo"):
        assert command in out


def test_the_command_line_starts_without_torchvision():
    """torchvision takes seconds to import; `epic --help` and bad input should not wait."""
    code = ("import sys, epic.cli.main, epic.data; "
            "assert 'torchvision' not in sys.modules; "
            "assert 'cifar10' in epic.data.list_datasets(); "
            "assert 'torchvision' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_list_reads_the_registries(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["list", "models", "resnet*"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.split() == ["resnet18", "resnet20", "resnet32", "resnet34",
                                               "resnet56"]


def test_list_with_a_pattern_that_matches_nothing_says_so(capsys):
    code, out = run_main(capsys, "list", "models", "zz*")
    assert code == 2
    assert out.strip() == "error: no models match 'zz*'; run `epic list models` to see them all"


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "nope"], "unknown model 'nope'; choose from"),
    (["train", "--dataset", "cifar10", "--data-root", "/nonexistent"], "/nonexistent"),
    (["pretrain", "--dataset", "cifar10", "--data-root", "/nonexistent"],
     "or pass download=True (--download on the command line)"),
    (["craft", "--attack", "bullseye-polytope", "--checkpoint", "m.pt", "--dataset", "cifar10",
      "--data-root", "/nonexistent"], "or pass download=True (--download on the command line)"),
    (["train", "--epochs", "0"], "epochs must be >= 1"),
    (["train", "--poisons", "/nonexistent/p.npz"], "cannot load poisons"),
    (["train", "--subset-fraction", "1.5"], "subset_fraction must be in (0, 1]"),
    (["train", "--defense", "magic"], "unknown defense 'magic'"),
    (["train", "--amp", "fp8"], "unknown value 'fp8' for --amp"),
    (["train", "--device", "cuda:0"] if not torch.cuda.is_available() else
     ["train", "--device", "tpu"], "device"),
    (["train", "--defense", "deep-knn", "--subset-fraction", "0.2"],
     "--subset-fraction is an EPIC option"),
    (["train", "--defense", "deep-knn", "--option", "k"], "KEY=VALUE"),
    (["train", "--proxy-precision", "half"], "unknown value 'half' for proxy_precision"),
    (["train", "--defense", "none", "--option", "k=3"], "'none' has no option(s) ['k']"),
    (["train", "--defense", "none", "--subset-fraction", "0.2"], "EPIC option; use it with "
     "--defense epic (or an epic-* variant)"),  # and no --option advice: none takes none
    (["train", "--eps", "8"], "--eps is the bound of the --poisons"),
    (["train", "--option", "subset_fraction=0.2", "--subset-fraction", "0.3"], "given twice"),
    (["train", "--checkpoint", "model.pt"], "add --scenario finetune"),
    (["train", "--train-size", "99999"], "train_size 99999 is more than the 1347 training"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    # in process: the entry point's own handling (one subprocess test below)
    code, out = run_main(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 2, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out
    assert not (tmp_path / "run" / "summary.json").exists()


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        (["train", "--out", str(afile)], "is a file; give a folder"),
        (["train", "--out", str(afile / "sub")], "is a file, not a folder"),
        (["pretrain", "--out", str(tmp_path / "adir")], "is a folder; give a file path"),
        (["report", str(tmp_path), "--out", str(afile)], "is a file; give a folder"),
        (["craft", "--attack", "bullseye-polytope", "--checkpoint", "m.pt", "--targets", "0",
          "--out", str(tmp_path / "c")], "--targets must be >= 1"),
        (["demo", "--targets", "-1", "--out", str(tmp_path / "d")], "--targets must be >= 1"),
    ]
    for args, message in cases:
        code, out = run_main(capsys, *args)
        lines = [line for line in out.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # nothing written


def test_a_file_the_system_refuses_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    import epic.evaluation

    def refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(tmp_path / "run" / "x"))

    monkeypatch.setattr(epic.evaluation, "run_training", refused)
    code, out = run_main(capsys, "train", "--out", str(tmp_path / "run"))
    assert code == 2 and out.strip() == f"error: Operation not permitted: {tmp_path}/run/x"


@pytest.mark.slow
def test_bad_input_through_the_installed_entry_point_is_one_line(tmp_path):
    code, out = run_cli("train", "--model", "nope", "--out", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'nope'"), out


def test_train_writes_config_metrics_and_summary(tmp_path, poison_file, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--warmup", "1",
              "--interval", "1", "--proxy-precision", "bfloat16", "--poisons", str(poison_file),
              "--out", str(out), "--no-progress"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "poisons dropped:" in printed and "attack" in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["epochs"] == 3 and config["defense"]["name"] == "epic"
    assert config["defense"]["options"] == {"warmup": 1, "interval": 1,
                                            "proxy_precision": "bfloat16"}
    assert config["train"]["augment"] == "none"  # digits' default, resolved
    # what "auto" and None became here, kept apart from the options (a resume may move device)
    assert config["train"]["device"] == "auto" and config["train"]["eval_batch_size"] is None
    assert config["runtime"] == {"device": "cpu", "eval_batch_size": 128, "world_size": 1}
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    assert any(e["event"] == "selection" and "poisons_dropped" in e for e in events)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["poisons_total"] == 5
    assert 0 <= summary["poisons_dropped"] <= 5
    assert summary["target_pred"] in range(10)
    assert summary["attack_success"] == (summary["target_pred"] == 3)
    assert 0.0 <= summary["clean_test_acc"] <= 1.0
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind


def test_rerun_resumes_from_the_checkpoint_and_a_changed_config_is_refused(tmp_path):
    cfg = RunConfig(out=str(tmp_path / "run"), defense=DefenseSpec("none"),
                    train=TrainConfig(epochs=2, batch_size=64, lr=0.05, progress=False))
    first = run_training(cfg)
    again = run_training(cfg)  # finished checkpoint: nothing is retrained
    assert again["clean_test_acc"] == first["clean_test_acc"]
    assert again["train_seconds"] == first["train_seconds"]
    changed = replace(cfg, train=replace(cfg.train, lr=0.01))
    with pytest.raises(EpicError, match="different config"):
        run_training(changed)


def test_train_size_keeps_every_poison(tmp_path, poison_file):
    cfg = RunConfig(out=str(tmp_path / "run"), defense=DefenseSpec("none"),
                    poisons=str(poison_file), train_size=300,
                    train=TrainConfig(epochs=1, progress=False))
    summary = run_training(cfg)
    assert summary["train_examples"] == 300 and summary["poisons_total"] == 5


def test_a_yaml_shaped_run_config_is_typed_and_round_trips():
    raw = {"dataset": "digits", "out": "runs/x",
           "defense": {"name": "epic", "options": {"warmup": 1, "subset_fraction": 0.2}},
           "train": {"epochs": 3, "milestones": [0.5, 0.25], "augment": None}}
    cfg = RunConfig(**raw)
    assert cfg.train == TrainConfig(epochs=3, milestones=(0.25, 0.5))
    assert cfg.train.augment is None  # the dataset's default, filled in by run_training
    assert cfg.defense == DefenseSpec("epic", {"warmup": 1, "subset_fraction": 0.2})
    data = cfg.to_dict()
    assert data["train"]["milestones"] == [0.25, 0.5]
    assert data["defense"] == raw["defense"]
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # plain data only
    assert RunConfig(**data) == cfg == RunConfig.from_dict(json.loads(json.dumps(data)))
    assert RunConfig(defense="jpeg").defense == DefenseSpec("jpeg")
    assert RunConfig().to_dict()["defense"] is None


def test_a_config_yaml_written_before_defense_specs_is_still_read():
    old = {"dataset": "digits", "defense": "random-drop", "defense_options": {"count": 7},
           "train": {"epochs": 1}, "versions": {"epic": "0.1.0"}}
    cfg = RunConfig.from_dict(old)
    assert cfg.defense == DefenseSpec("random-drop", {"count": 7})
    assert cfg.train.epochs == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"train": {"epochz": 3}}, "unknown training option(s) ['epochz']; valid options are"),
    ({"train": {"epochs": "3"}}, "epochs must be an integer, got '3'"),
    ({"train": ["epochs"]}, "training options must be a mapping"),
    ({"train": {"milestones": "0.5"}}, "milestones must be a list of numbers"),
    ({"defense": "magic"}, "unknown defense 'magic'; choose from: "),
    ({"defense": {"name": "magic"}}, "unknown defense 'magic'; choose from: "),
    ({"defense": {"name": "epic", "opts": {}}}, "a defense is a name or a mapping"),
    ({"defense": {"name": "epic", "options": [1]}}, "options of defense 'epic' must be"),
    ({"defense": 3}, "a defense is a name or a mapping"),
])
def test_bad_run_config_shapes_are_one_line_errors(kwargs, message):
    with pytest.raises(EpicError) as err:
        RunConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_training_option_names_the_key(tmp_path):
    with pytest.raises(EpicError, match="unknown training option"):
        run_training(RunConfig(out=str(tmp_path), train={"epochz": 3}))
    with pytest.raises(EpicError, match="unknown run option"):
        RunConfig.from_dict({"epochs": 3})


def test_a_defense_option_it_does_not_take_is_named(tmp_path):
    with pytest.raises(EpicError, match=r"defense 'random-drop' has no option\(s\) \['cnt'\]"):
        run_training(RunConfig(out=str(tmp_path), defense=DefenseSpec("random-drop", {"cnt": 1})))


def test_a_defense_spec_passes_the_run_seed_unless_its_options_set_one():
    assert DefenseSpec("random-drop", {"count": 3}).create(seed=5).seed == 5
    assert DefenseSpec("random-drop", {"count": 3, "seed": 2}).create(seed=5).seed == 2
    assert DefenseSpec("jpeg").create(seed=5).name == "jpeg"  # takes no seed: not given one


@pytest.mark.parametrize("name", [n for n in list_defenses() if n != "none"])
def test_option_builds_every_defense_and_unset_training_flags_stay_unset(name, monkeypatch):
    """``--option KEY=VALUE`` reaches any defense (here: one numeric option at its default),
    and the run gets only the training flags given."""
    params = inspect.signature(DEFENSES.get(name)).parameters
    key, value = next((k, p.default) for k, p in params.items()
                      if isinstance(p.default, (int, float)) and not isinstance(p.default, bool))
    if name == "random-drop":
        key, value = "count", 7
    seen = []
    monkeypatch.setattr("epic.evaluation.run_training", lambda cfg, resume: seen.append(cfg) or
                        {"clean_test_acc": None, "clean_dropped": 0, "wall_seconds": 0.0})
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--defense", name, "--option", f"{key.replace('_', '-')}={value}",
              "--epochs", "2"])
    assert exit_.value.code == 0
    (cfg,) = seen
    assert cfg.defense == DefenseSpec(name, {key: value})
    assert cfg.defense.create(seed=cfg.train.seed).name == name
    assert cfg.train == TrainConfig(epochs=2)  # the rest are the library's defaults


def test_a_benchmark_folder_without_eps_asks_for_the_flag_that_exists(tmp_path, poison_file,
                                                                     capsys):
    folder = PoisonSet.load(poison_file)
    folder = PoisonSet(folder.base_indices, folder.images, folder.labels, folder.target_image,
                       folder.target_label, folder.adv_label, None, folder.target_index)
    bench = folder.save(tmp_path / "trial", format="benchmark")
    common = ("train", "--defense", "none", "--epochs", "1", "--poisons", str(bench),
              "--no-progress")
    code, out = run_main(capsys, *common, "--out", str(tmp_path / "a"))
    assert code == 2 and "--eps" in out and "Traceback" not in out, out
    code, out = run_main(capsys, *common, "--eps", "8", "--out", str(tmp_path / "b"))
    assert code == 0 and "poisons dropped: 0/5" in out, out


def test_option_reaches_any_defense_and_unset_flags_keep_library_defaults(tmp_path, capsys):
    code, out = run_main(capsys, "train", "--defense", "random-drop", "--option", "count=7",
                         "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r"))
    assert code == 0, out
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["defense"] == {"name": "random-drop", "options": {"count": 7}}
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["clean_dropped"] == 7
    code, out = run_main(capsys, "train", "--epochs", "1", "--no-progress",
                         "--out", str(tmp_path / "e"))
    assert code == 0, out
    config = yaml.safe_load((tmp_path / "e" / "config.yaml").read_text())
    assert config["defense"] == {"name": "epic", "options": {}}
    # every training option the command was not given is the library's default
    assert config["train"] == TrainConfig(epochs=1, progress=False, augment="none").to_dict()


def test_the_defaults_that_train_help_states_are_the_librarys():
    """The EPIC flags pass ``None`` so that the library's defaults rule; their help states
    those defaults in words, which must not drift from the signature (they once did)."""
    train = typer.main.get_command(app).commands["train"]
    params = inspect.signature(DEFENSES.get("epic")).parameters
    stated = {}
    for p in train.params:
        found = re.search(r"[Dd]efault ([\w.]+)[;).]", p.help or "")  # a value, not words
        if (p.help or "").startswith("EPIC") and found and p.name in params:
            stated[p.name] = found.group(1)
    assert len(stated) == 7, stated  # every EPIC flag but --until ("the last lr decay")
    for name, text in stated.items():
        assert text == str(params[name].default), (name, text, params[name].default)


@pytest.mark.parametrize("command", ["train", "pretrain", "craft"])
def test_every_command_that_reads_a_dataset_offers_the_download_its_errors_name(command, capsys):
    code, out = run_main(capsys, command, "--help")
    assert code == 0 and "--download" in out
