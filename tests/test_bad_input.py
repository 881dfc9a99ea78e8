"""Bad input found by a fuzz run: one clear EpicError line each, and nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from epic import EpicError
from epic.data import ImageTensors, PoisonSet, load_split
from epic.evaluation import bench as bench_mod
from epic.evaluation import load_bench_config, read_results, run_bench, write_report
from epic.evaluation.run import parse_slice
from epic.models import load_model

TINY = {
    "name": "tiny", "dataset": "digits", "trials": 1,
    "surrogate": {"model": "convnet", "epochs": 1, "lr": 0.05},
    "victim": {"scenario": "transfer", "epochs": 1, "lr": 0.1},
    "attacks": [{"name": "bullseye-polytope", "num_poisons": 4, "eps": 128,
                 "options": {"steps": 5}}],
    "defenses": ["none"],
}


# ------------------------------------------------------------------ results.jsonl (item 1)

def _row(label: str = "bullseye-polytope", eps: float = 128, num_poisons: int = 4,
         trial: int = 0) -> dict:
    """A result row as `epic bench` writes it (the keys a reader needs)."""
    summary = {"attack_success": False, "clean_test_acc": 0.9, "train_examples": 100,
               "poisons_total": num_poisons, "poisons_dropped": 0, "clean_dropped": 0,
               "wall_seconds": 1.0, "target_index": 5, "target_label": 2, "adv_label": 1}
    return {"cell": f"{label}/victim/none/seed0/trial{trial:03d}", "attack": label,
            "victim": "victim", "defense": "none", "seed": 0, "trial": trial, "replicate": 0,
            "attack_name": "bullseye-polytope", "defense_name": "none", "match": None,
            "target_index": 5, "adv_label": 1, "summary": summary, "rounds": [],
            "config": {"attack": {"name": "bullseye-polytope", "label": label, "eps": eps,
                                  "num_poisons": num_poisons, "options": {"steps": 5}}}}


@pytest.mark.parametrize("line, message", [
    ('{"foo": 1}', r"results.jsonl line 2 is not a result row of `epic bench` \(no cell, "
                   "attack, "),
    ("[1, 2]", "line 2 is not a result row of `epic bench`"),
    ('{"cell": "x", "attack": "a", "victim": "v", "defense": "d", "seed": 0, "trial": 0, '
     '"defense_name": "none", "target_index": 1, "adv_label": 2, "summary": 3}',
     "line 2 is not a result row .*'summary' is not an object"),
])
def test_report_names_the_line_that_is_not_a_result_row(tmp_path, line, message):
    (tmp_path / "results.jsonl").write_text(json.dumps(_row()) + "\n" + line + "\n")
    with pytest.raises(EpicError, match=message):
        read_results(tmp_path)
    with pytest.raises(EpicError, match="is not a result row"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_report_of_bytes_that_are_not_utf8(tmp_path):
    (tmp_path / "results.jsonl").write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(EpicError, match="results.jsonl is not UTF-8 JSON lines"):
        write_report(tmp_path)


def test_a_valid_row_is_read_and_reported(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(_row()) + "\n")
    assert read_results(tmp_path)[0]["cell"] == _row()["cell"]
    assert "bullseye-polytope" in write_report(tmp_path)["markdown"]


@pytest.mark.parametrize("content", [b'{"foo": 1}\n', b"\xf1\xbc\xfa\x87\xaa\x99"])
def test_bench_does_not_resume_from_a_damaged_results_file(tmp_path, content):
    (tmp_path / "results.jsonl").write_bytes(content)
    (tmp_path / "config.yaml").write_text("kept: true\n")
    with pytest.raises(EpicError, match="results.jsonl (line 1 is not a result row|is not UTF-8)"):
        run_bench(load_bench_config(TINY), tmp_path, progress=False)
    assert (tmp_path / "config.yaml").read_text() == "kept: true\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "results.jsonl"]


# ------------------------------------------------------------------ poison files (item 2)

@pytest.mark.parametrize("content", [b"hello, I am text\n", bytes(range(256)), b""])
def test_a_file_named_npz_that_is_no_zip(tmp_path, content):
    path = tmp_path / "p.npz"
    path.write_bytes(content)
    with pytest.raises(EpicError) as info:
        PoisonSet.load(path)
    text = str(info.value)
    assert text.startswith(f"cannot read poisons from {path}: not a poison file written by "
                           "`epic craft` (an .npz) or a poisoning-benchmark folder")
    assert "pickle" not in text and "\n" not in text


# ------------------------------------------------------------------ model files (items 3, 4)

@pytest.mark.parametrize("content", [bytes(range(256)) * 3, b"", b"PK\x03\x04" + b"\0" * 40])
def test_a_model_file_that_is_not_one(tmp_path, content):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(EpicError) as info:
        load_model(path)
    text = str(info.value)
    assert text.startswith(f"cannot read model file {path}: not a model written by "
                           "`epic pretrain`")
    assert "weights_only" not in text and "\n" not in text
    if not content:
        assert "empty" in text


def test_a_pickled_module_is_named_not_loaded(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(EpicError, match=r"not a model written by `epic pretrain` \(it holds a "
                                        r"pickled torch.nn.modules.linear.Linear\)$") as info:
        load_model(path)
    assert "weights_only" not in str(info.value)


def test_a_folder_for_a_file(tmp_path):
    with pytest.raises(EpicError, match="model checkpoint .* is a folder; give a model file "
                                        "written by `epic pretrain"):
        load_model(tmp_path)
    with pytest.raises(EpicError, match="bench config .* is a folder; give a YAML config file"):
        load_bench_config(tmp_path)
    with pytest.raises(EpicError, match="surrogate.checkpoint .* is a folder"):
        run_bench(load_bench_config({**TINY, "surrogate": {"checkpoint": str(tmp_path)}}),
                  tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ data folder (item 5)

def test_a_missing_data_folder_names_the_flag_and_the_argument():
    with pytest.raises(EpicError) as info:
        load_split("mnist", None, train=True)
    text = str(info.value)
    assert "--data-root DIR" in text and "root=DIR" in text and "root=..." not in text


# ------------------------------------------------------------------ YAML errors (item 6)

def test_yaml_error_says_what_and_where(tmp_path):
    path = tmp_path / "syntax.yaml"
    path.write_text("name: tiny\ndataset: digits\ntrials: [1\nseeds: [0]\n")
    with pytest.raises(EpicError, match=r"not valid YAML: expected ',' or '\]', but got ':' "
                                        r"at line 4, column 6"):
        load_bench_config(path)


# ------------------------------------------------------------------ train slices (item 7)

@pytest.mark.parametrize("text", ["10:5", "5:5", ":0"])
def test_a_reversed_or_empty_slice(text):
    with pytest.raises(EpicError, match=f"train_slice '{text}' selects nothing: START must be "
                                        "< STOP"):
        parse_slice(text, 1347)
    with pytest.raises(EpicError, match="START must be < STOP"):
        load_bench_config({**TINY, "train_slice": text})


def test_a_slice_past_the_end():
    with pytest.raises(EpicError, match="outside the 1347 training examples"):
        parse_slice("0:2000", 1347)


# ------------------------------------------------------------------ bench config (item 8)

@pytest.mark.parametrize("change, message", [
    ({"defenses": ["none", {"name": "epic", "options": {"subset_fraction": 7}}]},
     r"defenses\[1\] \(epic\): subset_fraction must be in \(0, 1\], got 7"),
    ({"defenses": [{"name": "jpeg", "label": "j", "options": {"quality": "abc"}}]},
     r"defenses\[0\] \(j\): quality must be an integer"),
    ({"defenses": [{"name": "epic", "options": {"nosuch": 1}}]},
     r"defenses\[0\] \(epic\): defense 'epic' has no option"),
    ({"victim": {"scenario": "transfer", "epochs": "x"}},
     r"victims\[0\] \(victim\): epochs must be an integer, got 'x'"),
    ({"victim": {"model": "nosuch"}}, r"victims\[0\] \(victim\): unknown model 'nosuch'"),
    ({"surrogate": {"model": "convnet", "lr": -1}}, r"surrogate: lr must be > 0"),
    ({"victim": {"defense_options": {"epic": {"interval": 0}}}, "defenses": ["none", "epic"]},
     r"defenses\[1\] \(epic\) with the defense_options.epic of victims\[0\] \(victim\): "
     r"interval must be >= 1"),
    ({"attacks": [{"name": "bullseye-polytope", "options": {"steps": -3}}]},
     r"attacks\[0\] \(bullseye-polytope\): steps must be >= 1"),
])
def test_bad_entries_fail_when_the_config_is_read(change, message):
    with pytest.raises(EpicError, match=message):
        load_bench_config({**TINY, **change})


def test_bad_defense_options_leave_nothing_behind(tmp_path, monkeypatch):
    from epic.cli import main

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "badopt.yaml"
    config.write_text(yaml.safe_dump({**TINY, "defenses": [
        {"name": "epic", "options": {"subset_fraction": 7}}]}))
    assert main(["bench", str(config), "--out", "b", "--no-progress"]) == 2
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ stored poisons (item 9)

def _stored_poisons(folder: Path, eps: float, count: int) -> Path:
    """A poison file as bench stores it, crafted with ``eps`` and ``count`` poisons."""
    images = torch.randint(0, 256, (40, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    base = ImageTensors(images, torch.arange(40) % 10, [str(k) for k in range(10)])
    idx = torch.arange(1, 1 + 10 * count, 10)
    poisons = PoisonSet(base_indices=idx, images=base.images[idx], labels=base.labels[idx],
                        target_image=base.images[2], target_label=2, adv_label=1, eps=eps,
                        target_index=5, metadata={})
    return poisons.save(folder / "trial-000" / "poisons.npz")


def _targets_json(folder: Path, attack: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "targets.json").write_text(json.dumps({
        "config": {"attack": attack},
        "trials": [{"trial": 0, "file": str(folder / "trial-000" / "poisons.npz")}]}))


class _Checked(Exception):
    """Raised where run_bench goes on past its checks of stored files."""


@pytest.fixture
def stops_after_checks(monkeypatch):
    def stop(*args, **kwargs):
        raise _Checked

    monkeypatch.setattr(bench_mod, "load_split", stop)


def _changed(eps: float = 64, num_poisons: int = 4) -> dict:
    return {**TINY, "attacks": [{**TINY["attacks"][0], "eps": eps, "num_poisons": num_poisons}]}


def test_stored_results_of_another_eps_are_refused(tmp_path, stops_after_checks):
    (tmp_path / "results.jsonl").write_text(json.dumps(_row(eps=128)) + "\n")
    (tmp_path / "config.yaml").write_text("kept: true\n")
    with pytest.raises(EpicError, match="attack 'bullseye-polytope': the results in .* were "
                                        "made with eps 128, but the config says eps 64; give a "
                                        r"new output folder \(--out\)"):
        run_bench(load_bench_config(_changed(eps=64)), tmp_path, progress=False)
    assert (tmp_path / "config.yaml").read_text() == "kept: true\n"


@pytest.mark.parametrize("listed", [True, False])
def test_stored_poisons_of_another_threat_model_are_refused(tmp_path, stops_after_checks,
                                                            listed):
    folder = tmp_path / "poisons" / "bullseye-polytope" / "seed0"
    _stored_poisons(folder, eps=128, count=4)
    if listed:
        _targets_json(folder, {"name": "bullseye-polytope", "budget": 0.01, "eps": 128,
                               "poison_class": None, "num_poisons": 4, "options": {}})
    with pytest.raises(EpicError, match="the poisons in .* were crafted with eps 128, but the "
                                        r"config says eps 64; .*or delete .*bullseye-polytope"):
        run_bench(load_bench_config(_changed(eps=64)), tmp_path, progress=False)
    with pytest.raises(EpicError, match="crafted with num_poisons 4, but the config says "
                                        "num_poisons 3"):
        run_bench(load_bench_config(_changed(eps=128, num_poisons=3)), tmp_path,
                  progress=False)
    assert not (tmp_path / "config.yaml").exists()
    with pytest.raises(_Checked):  # the same threat model: the stored poisons are reused
        run_bench(load_bench_config(_changed(eps=128)), tmp_path, progress=False)


def test_a_folder_may_grow(tmp_path, stops_after_checks):
    """More trials, another defense, another attack label, and an older targets.json (the
    threat model beside the attack's name) all pass the checks."""
    folder = tmp_path / "poisons" / "bullseye-polytope" / "seed0"
    _stored_poisons(folder, eps=128, count=4)
    _targets_json(folder, "bullseye-polytope")
    data = json.loads((folder / "targets.json").read_text())
    data["config"].update(eps=128, budget=0.01, num_poisons=4)  # the older layout
    (folder / "targets.json").write_text(json.dumps(data))
    (tmp_path / "results.jsonl").write_text(json.dumps(_row(eps=128)) + "\n")
    grown = {**TINY, "trials": 3, "defenses": ["none", "epic"],
             "attacks": [*TINY["attacks"], {"name": "bullseye-polytope", "label": "bp-64",
                                            "eps": 64, "num_poisons": 4}]}
    with pytest.raises(_Checked):
        run_bench(load_bench_config(grown), tmp_path, progress=False)
    data["config"]["eps"] = 16
    (folder / "targets.json").write_text(json.dumps(data))
    with pytest.raises(EpicError, match="crafted with eps 16, but the config says eps 128"):
        run_bench(load_bench_config(grown), tmp_path, progress=False)


def _defense_row(label: str, name: str, options: dict, match: str | None = None) -> dict:
    row = _row(eps=128)
    row.update(cell=f"bullseye-polytope/victim/{label}/seed0/trial000", defense=label,
               defense_name=name, match=match)
    row["config"]["defense"] = {"name": name, "options": options}
    return row


def test_stored_rows_of_a_defense_run_with_other_options_are_refused(tmp_path,
                                                                      stops_after_checks):
    """A label whose options changed since its rows were run would pool two defenses under
    one name in the report; unchanged labels, a matched drop's count and epoch (set by the
    harness) and a victim's defense_options (merged as a cell merges them) pass."""
    stored = [_defense_row("epic", "epic", {"interval": 2, "subset_fraction": 0.1}),
              _defense_row("random-drop-epic", "random-drop", {"count": 7, "epoch": 3},
                           match="epic")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stored))
    defenses = [{"name": "epic", "options": {"subset_fraction": 0.1}},
                {"name": "random-drop", "label": "random-drop-epic", "match": "epic"}]
    victim = {**TINY["victim"], "defense_options": {"epic": {"interval": 2}}}
    same = {**TINY, "victim": victim, "defenses": defenses}
    with pytest.raises(_Checked):
        run_bench(load_bench_config(same), tmp_path, progress=False)
    changed = {**same, "defenses": [{"name": "epic", "options": {"subset_fraction": 0.2}},
                                    defenses[1]]}
    with pytest.raises(EpicError, match=r"defense 'epic': the results in .*results.jsonl were "
                                        r"run as epic\(interval=2, subset_fraction=0.1\), but "
                                        r"the config now gives epic\(interval=2, "
                                        r"subset_fraction=0.2\); give a new output folder "
                                        r"\(--out\) or a new label"):
        run_bench(load_bench_config(changed), tmp_path, progress=False)
    with pytest.raises(EpicError, match=r"run as epic\(interval=2, subset_fraction=0.1\), but "
                                        r"the config now gives epic\(subset_fraction=0.1\)"):
        run_bench(load_bench_config({**same, "victim": TINY["victim"]}), tmp_path,
                  progress=False)
    pinned = {**same, "defenses": [defenses[0], {**defenses[1], "options": {"epoch": 5}}]}
    with pytest.raises(EpicError, match=r"defense 'random-drop-epic': .* run as "
                                        r"random-drop\(epoch=3\), but the config now gives "
                                        r"random-drop\(epoch=5\)"):
        run_bench(load_bench_config(pinned), tmp_path, progress=False)
    assert not (tmp_path / "config.yaml").exists()


def test_a_defense_option_the_scenario_rules_out_is_refused_before_anything_is_written(
        tmp_path):
    """Fine-tuning picks EPIC-plus's misfit score, which has no ``spread``: the run says so
    before it writes its folder (a bench config says so when it loads, test_bench.py)."""
    from epic.defenses import DefenseSpec
    from epic.evaluation import RunConfig
    from epic.evaluation.run import execute_run

    out = tmp_path / "run"
    cfg = RunConfig(defense=DefenseSpec("epic-plus", {"spread": 5}),
                    checkpoint=str(tmp_path / "model.pt"), out=str(out),
                    train={"scenario": "finetune", "epochs": 1})
    with pytest.raises(EpicError, match="spread applies to score='group', not 'misfit' "
                                        r"\(fine-tuning picks it\)"):
        execute_run(cfg)
    assert not out.exists() or not any(out.iterdir())
