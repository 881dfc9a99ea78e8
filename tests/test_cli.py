"""The command line and the run writer: results on disk, resume, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from epic.cli import main
from epic.data import PoisonSet
from epic.evaluation import RunConfig, run_training


def run_cli(*args: str) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only add overhead
    proc = subprocess.run([sys.executable, "-m", "epic", *args],
                          capture_output=True, text=True, timeout=300, env=env)
    return proc.returncode, proc.stdout + proc.stderr


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


def test_list_reads_the_registries(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["list", "models", "resnet*"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.split() == ["resnet18", "resnet20", "resnet32", "resnet34",
                                               "resnet56"]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["train", "--model", "nope"], "unknown model 'nope'; choose from"),
    (["train", "--dataset", "cifar10", "--data-root", "/nonexistent"], "/nonexistent"),
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
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    code, out = run_cli(*args, "--out", str(tmp_path / "run"))
    assert code == 2, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out
    assert not (tmp_path / "run" / "summary.json").exists()


def test_train_writes_config_metrics_and_summary(tmp_path, poison_file, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--warmup", "1",
              "--interval", "1", "--poisons", str(poison_file), "--out", str(out),
              "--no-progress"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "poisons dropped:" in printed and "attack" in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["epochs"] == 3 and config["defense"] == "epic"
    assert config["train"]["augment"] == "none"  # digits' default, resolved
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
    cfg = RunConfig(out=str(tmp_path / "run"), defense="none",
                    train={"epochs": 2, "batch_size": 64, "lr": 0.05, "progress": False})
    first = run_training(cfg)
    again = run_training(cfg)  # finished checkpoint: nothing is retrained
    assert again["clean_test_acc"] == first["clean_test_acc"]
    assert again["train_seconds"] == first["train_seconds"]
    changed = RunConfig(**{**cfg.to_dict(), "train": {**cfg.train, "lr": 0.01}})
    from epic import EpicError

    with pytest.raises(EpicError, match="different config"):
        run_training(changed)


def test_train_size_keeps_every_poison(tmp_path, poison_file):
    cfg = RunConfig(out=str(tmp_path / "run"), defense="none", poisons=str(poison_file),
                    train_size=300, train={"epochs": 1, "progress": False})
    summary = run_training(cfg)
    assert summary["train_examples"] == 300 and summary["poisons_total"] == 5


def test_unknown_training_option_names_the_key(tmp_path):
    from epic import EpicError

    with pytest.raises(EpicError, match="unknown training option"):
        run_training(RunConfig(out=str(tmp_path), train={"epochz": 3}))


@pytest.mark.slow
def test_a_benchmark_folder_without_eps_asks_for_the_flag_that_exists(tmp_path, poison_file):
    folder = PoisonSet.load(poison_file)
    folder = PoisonSet(folder.base_indices, folder.images, folder.labels, folder.target_image,
                       folder.target_label, folder.adv_label, None, folder.target_index)
    bench = folder.save(tmp_path / "trial", format="benchmark")
    common = ("train", "--defense", "none", "--epochs", "1", "--poisons", str(bench),
              "--no-progress")
    code, out = run_cli(*common, "--out", str(tmp_path / "a"))
    assert code == 2 and "--eps" in out and "Traceback" not in out, out
    code, out = run_cli(*common, "--eps", "8", "--out", str(tmp_path / "b"))
    assert code == 0 and "poisons dropped: 0/5" in out, out


@pytest.mark.slow
def test_option_reaches_any_defense_and_unset_flags_keep_library_defaults(tmp_path):
    code, out = run_cli("train", "--defense", "random-drop", "--option", "count=7",
                        "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r"))
    assert code == 0, out
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["defense_options"] == {"count": 7}
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["clean_dropped"] == 7
    code, out = run_cli("train", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "e"))
    assert code == 0, out
    assert yaml.safe_load((tmp_path / "e" / "config.yaml").read_text())["defense_options"] == {}
