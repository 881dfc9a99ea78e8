"""The benchmark harness: grid expansion, resuming without redoing cells, config errors, report."""

from __future__ import annotations

import json

import pytest
import yaml

from epic import EpicError
from epic.evaluation import bench as bench_mod
from epic.evaluation import load_bench_config, read_results, run_bench, write_report

TINY = {
    "name": "tiny", "dataset": "digits", "trials": 2, "replicates": 2,
    "surrogate": {"model": "convnet", "epochs": 2, "lr": 0.05, "milestones": []},
    "victim": {"scenario": "transfer", "epochs": 3, "lr": 0.01},
    "attacks": [{"name": "bullseye-polytope", "num_poisons": 8, "eps": 32,
                 "options": {"steps": 5}}],
    "defenses": ["none", {"name": "epic", "label": "epic-0.2",
                          "options": {"subset_fraction": 0.2}},
                 {"name": "random-drop", "label": "random", "match": "epic-0.2"}],
}


def test_victim_seeds_are_distinct_across_bench_seeds_trials_and_replicates():
    cells = [bench_mod.Cell("a", "v", "none", s, t, r)
             for s in range(3) for t in range(250) for r in range(10)]
    seeds = {c.train_seed for c in cells}
    assert len(seeds) == len(cells) and not seeds & {0, 1, 2}  # nor a surrogate's
    # seed 0 keeps the seeds every stored bench trained its victims with
    assert bench_mod.Cell("a", "v", "none", 0, 7, 2).train_seed == 1072


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = run_bench(load_bench_config(TINY), out, progress=False)
    return out, rows


def test_every_cell_runs_once_with_its_config(finished):
    out, rows = finished
    assert len(rows) == 2 * (3 + 1)  # the undefended victim twice per target
    assert len({r["cell"] for r in rows}) == 8
    seeds = [r["seeds"]["train"] for r in rows if r["defense"] == "none"]
    assert len(set(seeds)) == 4 and 0 not in seeds  # never the surrogate's seed
    assert read_results(out) == json.loads(json.dumps(rows))
    for r in rows:
        assert r["config"]["poisons"].startswith(str(out / "poisons"))
        # the run's typed config as plain data: every training key, the defense and options
        train, defense = r["config"]["train"], r["config"]["defense"]
        assert train["seed"] == r["seeds"]["train"] and train["scenario"] == "transfer"
        assert train["lr"] == 0.01 and train["epochs"] == 3 and not train["progress"]
        assert defense["name"] == r["defense_name"]
        if r["defense"] == "epic-0.2":
            assert defense["options"] == {"subset_fraction": 0.2}
        if r["defense"] == "random":  # as many as EPIC, at the epoch of its first drop
            epic = next(e for e in rows if e["defense"] == "epic-0.2" and e["trial"] == r["trial"])
            first = min(e["epoch"] for e in epic["rounds"] if e["dropped_this_round"])
            assert defense["options"] == {"count": r["summary"]["poisons_dropped"]
                                          + r["summary"]["clean_dropped"], "epoch": first - 1}
            assert [e["epoch"] for e in r["rounds"]] == [first]
        assert {"bench", "train", "craft"} <= set(r["seeds"])
        assert r["env"]["torch"]
    # poisons are crafted once per trial and shared by every defense
    for trial in (0, 1):
        files = {r["config"]["poisons"] for r in rows if r["trial"] == trial}
        assert len(files) == 1
    # the random control drops exactly as many examples as EPIC on the same trial
    for trial in (0, 1):
        by = {r["defense"]: r["summary"] for r in rows if r["trial"] == trial}
        epic, rand = by["epic-0.2"], by["random"]
        assert (rand["poisons_dropped"] + rand["clean_dropped"]
                == epic["poisons_dropped"] + epic["clean_dropped"])
    assert any(r["rounds"] for r in rows if r["defense"] == "epic-0.2")
    # the surrogate takes the victim's training keys (here: a constant learning rate)
    sur = yaml.safe_load((out / "surrogates" / "seed0.pt.run" / "config.yaml").read_text())
    assert sur["train"]["milestones"] == [] and sur["train"]["epochs"] == 2


def test_resume_skips_finished_cells(finished, monkeypatch):
    out, rows = finished
    # a crash after the last cell's run but before its result line: only that cell runs again
    # (and its run resumes from its own checkpoint)
    kept = rows[:-1]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    calls = []
    real = bench_mod.run_training

    def counting(cfg, **kw):
        calls.append(cfg.out)
        return real(cfg, **kw)

    monkeypatch.setattr(bench_mod, "run_training", counting)
    again = run_bench(load_bench_config(TINY), out, progress=False)
    assert len(calls) == 1 and calls[0].endswith(rows[-1]["cell"])
    assert [r["cell"] for r in again] == [r["cell"] for r in rows]
    assert again[-1]["summary"]["clean_test_acc"] == rows[-1]["summary"]["clean_test_acc"]
    calls.clear()
    run_bench(load_bench_config(TINY), out, progress=False)
    assert calls == []


def test_clean_seeds_train_clean_victims_once_and_the_report_uses_them(finished, tmp_path,
                                                                       monkeypatch):
    import shutil

    out = tmp_path / "bench"
    shutil.copytree(finished[0], out)
    cfg = load_bench_config({**TINY, "clean_seeds": 2})
    rows = run_bench(cfg, out, progress=False)  # every cell is done: only the control runs
    control = json.loads((out / "clean_control.json").read_text())
    assert control["seeds"] == [7000, 7001] and len(control["clean_test_acc"]["victim"]) == 2
    targets = {(r["trial"], r["target_index"], r["adv_label"]) for r in rows}
    assert {(r["trial"], r["target_index"], r["adv_label"]) for r in control["rows"]} == targets
    for r in control["rows"]:
        assert len(r["clean_predictions"]) == 2 and r["undefended_runs"] == 2
        assert r["clean_adv"] == sum(p == r["adv_label"] for p in r["clean_predictions"])
    assert {r["victim"] for r in control["rows"]} == {"victim"}
    calls = []
    monkeypatch.setattr(bench_mod, "execute_run", lambda *a, **k: calls.append(a))
    run_bench(cfg, out, progress=False)  # the control covers every target: not re-run
    for r in control["rows"]:  # nor is a file from before the per-victim control
        del r["victim"]
    (out / "clean_control.json").write_text(json.dumps(control))
    run_bench(cfg, out, progress=False)
    assert calls == []
    assert "net of clean-explained" in write_report(out)["markdown"]
    with pytest.raises(EpicError, match="clean_seeds must be an integer from 0 to 10"):
        load_bench_config({**TINY, "clean_seeds": 11})


def test_each_victim_recipe_gets_its_clean_victims(tmp_path):
    victims = [{**TINY["victim"], "label": "short"},
               {**TINY["victim"], "label": "long", "epochs": 4}]
    tiny = {k: v for k, v in TINY.items() if k != "victim"}
    cfg = load_bench_config({**tiny, "trials": 1, "replicates": 1, "clean_seeds": 1,
                             "defenses": ["none"], "victims": victims})
    run_bench(cfg, tmp_path, progress=False)
    control = json.loads((tmp_path / "clean_control.json").read_text())
    assert set(control["clean_test_acc"]) == {"short", "long"}
    assert sorted(r["victim"] for r in control["rows"]) == ["long", "short"]
    epochs = {v: yaml.safe_load((tmp_path / "clean" / v / "seed7000" / "config.yaml")
                                .read_text())["train"]["epochs"] for v in ("short", "long")}
    assert epochs == {"short": 3, "long": 4}


def test_clean_seeds_with_only_other_defenses_run_no_control(finished, tmp_path):
    import shutil

    # `epic bench --defense epic-0.2` into a folder without undefended cells: the control has
    # no targets to check, so it is skipped instead of failing after every cell has run
    out = tmp_path / "bench"
    out.mkdir()
    shutil.copytree(finished[0] / "surrogates", out / "surrogates")
    shutil.copytree(finished[0] / "poisons", out / "poisons")
    only = {**TINY, "clean_seeds": 2, "defenses": [TINY["defenses"][1]]}
    rows = run_bench(load_bench_config(only), out, progress=False)
    assert {r["defense"] for r in rows} == {"epic-0.2"} and len(rows) == 2
    assert not (out / "clean_control.json").exists()


def test_report_tables_and_plots(finished, tmp_path):
    out, _ = finished
    result = write_report(out, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| epic-0.2 |" in text and "| random |" in text and "time / undefended" in text
    assert "## Per target" in text and "| seed/trial | target (class -> adversarial) |" in text
    per_target = [line for line in text.splitlines() if line.startswith("| 0/")]
    assert len(per_target) == 2  # one row per target trial, a column per defense
    assert all(line.count("HIT") + line.count("miss") == 3 for line in per_target)
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    assert "rounds" in result["paths"]
    by = {s.defense: s for s in result["scores"]}
    none, epic = by["none"], by["epic-0.2"]
    assert epic.time_ratio == pytest.approx(epic.seconds / none.seconds)
    assert none.success_se == pytest.approx((none.success * (1 - none.success) / 2) ** 0.5)


@pytest.mark.parametrize("change, message", [
    ({"defences": ["none"]}, "unknown key 'defences'"),
    ({"attacks": [{"name": "bullseye-polytope", "epsilon": 8}]}, "unknown key 'epsilon'"),
    ({"attacks": ["nope"]}, "unknown attack 'nope'"),
    ({"attacks": [{"name": "bullseye-polytope", "eps": "8"}]},
     r"attacks\[0\]: eps must be a finite number, got '8'"),
    ({"defenses": ["none", "nope"]}, "unknown defense 'nope'"),
    ({"defenses": [{"name": "random-drop", "match": "epic"}]}, "match"),
    ({"victim": {"epochs": 3, "learning_rate": 0.1}}, "unknown key 'learning_rate'"),
    ({"surrogate": {"modle": "convnet"}}, "unknown key 'modle'"),
    ({"trials": 0}, "trials"),
    ({"replicates": 0}, "replicates must be an integer from 1 to 10"),
    ({"seeds": "0"}, "seeds"),
    ({"dataset": "imagenet-1k"}, "unknown dataset"),
    ({"defenses": ["none", "none"]}, "used twice"),
    # an option that the victim's scenario rules out: fine-tuning picks the misfit score
    ({"victim": {"scenario": "finetune", "epochs": 3},
      "defenses": [{"name": "epic-plus", "options": {"spread": 5}}]},
     r"defenses\[0\] \(epic-plus\) for victims\[0\] \(victim\): spread applies to "
     r"score='group', not 'misfit'"),
])
def test_malformed_config_names_the_bad_key(change, message):
    with pytest.raises(EpicError, match=message):
        load_bench_config({**TINY, **change})


def test_config_file_errors(tmp_path):
    with pytest.raises(EpicError, match="does not exist"):
        load_bench_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(EpicError, match="not valid YAML"):
        load_bench_config(bad)
    bad.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "attacks"}))
    with pytest.raises(EpicError, match="'attacks'"):
        load_bench_config(bad)


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))  # pilots too
    assert {p.name for p in configs} >= {"cpu-mnist.yaml", "cpu-cifar10-transfer.yaml",
                                         "paper-cifar10-gm.yaml",
                                         "paper-tinyimagenet-bp.yaml", "gm-mnist60k.yaml"}
    for path in configs:
        load_bench_config(path)


def test_cli_defense_filter_errors(tmp_path, capsys):
    from epic.cli.main import main

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    assert main(["bench", str(path), "--defense", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "not in the config" in capsys.readouterr().err
    assert main(["bench", str(path), "--defense", "random", "--out", str(tmp_path / "o")]) == 2
    assert "add --defense epic-0.2" in capsys.readouterr().err
    assert main(["bench", str(path), "--attack", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "--attack 'nope' is not in the config" in capsys.readouterr().err


def _row(defense, trial, hit, replicate=0, match=None, seconds=1.0):
    return {"attack": "a", "victim": "v", "defense": defense, "seed": 0, "trial": trial,
            "replicate": replicate, "match": match,
            "summary": {"attack_success": hit, "clean_test_acc": 0.9, "poisons_total": 10,
                        "poisons_dropped": 0, "clean_dropped": 0, "train_examples": 100,
                        "wall_seconds": seconds}}


def test_score_counts_robust_hits_stops_beyond_random_and_flips():
    from epic.evaluation.report import markdown, score

    none = [(0, [True, True, True]), (1, [True, False, True]), (2, [True, True, True]),
            (3, [False, False, False]), (4, [True, True, True])]
    rows = [_row("none", t, h, r) for t, hits in none for r, h in enumerate(hits)]
    # the defense stops targets 0, 2 and 4 (robust) and 1 (not robust), flips target 3
    rows += [_row("d", t, t == 3, seconds=1.0 + t) for t in range(5)]  # mean 3 s
    # its matched random drop also stops target 2
    rows += [_row("rand", t, t != 2, match="d") for t in range(5)]
    by = {s.defense: s for s in score(rows)}
    d = by["d"]
    assert (d.trials, d.replicates, d.robust) == (5, 3, 3)  # targets 0, 2, 4
    assert d.robust_success == 0.0 and d.stopped == 3 and d.stopped_vs_random == 2
    assert d.flips == 1.0 and d.success == 0.2
    assert d.time_ratio == pytest.approx(3.0)  # over the undefended first seed's 1 s
    assert by["none"].trials == 5 and by["none"].success == 0.8  # first seed only
    assert by["none"].robust_success == 1.0 and by["rand"].stopped_vs_random is None
    assert "3 targets hit by the undefended victim with all 3" in markdown(score(rows))


def test_score_needs_every_replicate_reads_flips_from_replicate_0_and_counts_a_cell_once():
    from epic.evaluation.report import markdown, score

    def row(defense, trial, hit, replicate=0):
        return {**_row(defense, trial, hit, replicate),
                "cell": f"{defense}/{trial}/{replicate}"}

    # target 0: 3 seeds hit; target 1: only 1 of 3 seeds finished (hit); target 2: replicate 0
    # missed but its line came last; the defense's line of target 0 appears twice
    rows = [row("none", 0, True, r) for r in range(3)] + [row("none", 1, True)]
    rows += [row("none", 2, True, 2), row("none", 2, True, 1), row("none", 2, False, 0)]
    rows += [row("d", 0, False), row("d", 0, False), row("d", 1, False), row("d", 2, True)]
    by = {s.defense: s for s in score(rows)}
    d = by["d"]
    assert d.replicates == 3 and d.robust == 1 and d.stopped == 1  # target 0 only
    assert d.trials == 3 and d.success == pytest.approx(1 / 3)  # the duplicate counted once
    assert d.flips == 1.0  # target 2, missed by the first seed although listed last
    assert "1 targets hit by the undefended victim with all 3" in markdown(score(rows))


def test_a_clean_control_takes_clean_explained_targets_out_of_the_robust_hits(tmp_path):
    from epic.evaluation.report import markdown, per_target, read_clean_control, score

    def row(defense, trial, hit, replicate=0):
        r = {**_row(defense, trial, hit, replicate), "target_index": 10 + trial, "adv_label": 1}
        r["summary"].update(target_index=10 + trial, target_label=0, adv_label=1)
        return r

    # targets 0-2 are robust hits; a clean victim already sends target 2 to class 1
    rows = [row("none", t, True, r) for t in range(3) for r in range(3)]
    rows += [row("d", 0, False), row("d", 1, False), row("d", 2, True)]
    control = tmp_path / "clean_control.json"
    control.write_text(json.dumps({"rows": [
        {"seed": 0, "trial": t, "target_index": 10 + t, "adv_label": 1,
         "clean_predictions": [1, 0, 1] if t == 2 else [0, 0, 0], "clean_adv": 2 if t == 2 else 0}
        for t in range(3)]}))
    clean = read_clean_control(control)
    assert clean[None, 0, 2, 12, 1] == (2, 3)  # no victim named: it holds for every victim
    plain = {s.defense: s for s in score(rows)}
    assert plain["d"].robust == 3 and plain["d"].stopped == 2 and plain["d"].net_success is None
    by = {s.defense: s for s in score(rows, clean=clean)}
    d = by["d"]
    assert (d.robust, d.stopped, d.clean_explained) == (2, 2, 1)
    assert d.success == pytest.approx(1 / 3) and d.net_success == 0.0
    assert by["none"].net_success == 1.0
    text = markdown(score(rows, clean=clean))
    assert "net of clean-explained" in text and "(1 clean-explained target," in text
    assert "| 0/2 | 12 (" in per_target(rows, clean) and "| 2/3 |" in per_target(rows, clean)
    assert "net of clean-explained" not in markdown(score(rows))


def test_a_clean_control_is_per_victim_recipe(tmp_path):
    """A target a 40-epoch clean victim sends to the adversarial class says nothing of a
    200-epoch victim; a file from before the per-victim control applies to every victim."""
    from epic.evaluation.report import per_target, read_clean_control, score

    def row(victim, defense, trial, hit, replicate=0):
        r = {**_row(defense, trial, hit, replicate), "victim": victim,
             "target_index": 10 + trial, "adv_label": 1}
        r["summary"].update(target_index=10 + trial, target_label=0, adv_label=1)
        return r

    rows = [row(v, "none", t, True, r) for v in ("short", "long") for t in range(3)
            for r in range(3)]
    rows += [row(v, "d", t, t == 2) for v in ("short", "long") for t in range(3)]

    def control(victim):
        entry = {} if victim is None else {"victim": victim}
        return {"rows": [{**entry, "seed": 0, "trial": t, "target_index": 10 + t,
                          "adv_label": 1, "clean_predictions": [1, 0] if t == 2 else [0, 0],
                          "clean_adv": int(t == 2)} for t in range(3)]}

    path = tmp_path / "clean_control.json"
    path.write_text(json.dumps(control("short")))
    clean = read_clean_control(path)
    by = {(s.victim, s.defense): s for s in score(rows, clean=clean)}
    assert (by["short", "d"].robust, by["short", "d"].clean_explained) == (2, 1)
    assert (by["long", "d"].robust, by["long", "d"].clean_explained) == (3, 0)
    assert by["long", "d"].net_success == pytest.approx(1 / 3)
    text = per_target(rows, clean)
    assert text.count("| 0/2 | 12 (0 -> 1) | 3/3 | 1/2 |") == 1  # the short victim's row
    assert text.count("| 0/2 | 12 (0 -> 1) | 3/3 | - |") == 1    # the long one: no control
    path.write_text(json.dumps(control(None)))
    by = {(s.victim, s.defense): s for s in score(rows, clean=read_clean_control(path))}
    assert by["short", "d"].robust == by["long", "d"].robust == 2


def test_an_ensemble_of_surrogates_is_trained_with_distinct_seeds(tmp_path):
    cfg = load_bench_config({**TINY, "surrogate": {**TINY["surrogate"], "ensemble": 2}})
    paths = bench_mod._surrogates(cfg, tmp_path, None, seed=1)
    assert [p.split("/")[-1] for p in paths] == ["seed1.pt", "seed1-1.pt"]
    seeds = [yaml.safe_load(open(p + ".run/config.yaml"))["train"]["seed"] for p in paths]
    assert seeds == [1, 101]
    assert bench_mod._surrogate(cfg, tmp_path, None, seed=1) == paths[0]
    assert [str(p) for p in bench_mod.surrogate_paths(cfg, tmp_path, 1)] == paths
    fixed = load_bench_config({**TINY, "surrogate": {"checkpoint": paths[1]}})
    assert [str(p) for p in bench_mod.surrogate_paths(fixed, tmp_path, 1)] == [paths[1]]
    with pytest.raises(EpicError, match="ensemble must be an integer from 1 to 8"):
        load_bench_config({**TINY, "surrogate": {**TINY["surrogate"], "ensemble": 0}})


def test_crafting_follows_the_augmentation_all_victims_share():
    victim = {"model": "convnet", "epochs": 1}
    base = {**{k: v for k, v in TINY.items() if k != "victim"}, "dataset": "cifar10"}
    same = load_bench_config({**base, "victims": [{**victim, "label": "a", "augment": "none"},
                                                  {**victim, "label": "b", "augment": "none"}]})
    assert bench_mod._victims_augmentation(same) == "none"
    default = load_bench_config({**base, "victims": [{**victim, "label": "a"}]})
    assert bench_mod._victims_augmentation(default) == "crop-flip"  # CIFAR-10's default
    mixed = load_bench_config({**base, "victims": [{**victim, "label": "a", "augment": "none"},
                                                   {**victim, "label": "b"}]})
    assert bench_mod._victims_augmentation(mixed) is None  # the dataset's default decides


def test_bench_without_its_data_names_the_folder_and_no_download(tmp_path, capsys):
    from epic.cli.main import main

    raw = {**TINY, "dataset": "cifar10", "data_root": str(tmp_path / "missing")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["bench", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: no cifar10 data at {tmp_path / 'missing'} (`make data` builds the "
                   "CIFAR-10 copies in .cache): put the files there or point the config's "
                   "data_root at them; `epic bench` does not download")
    assert not (tmp_path / "o").exists()
    raw = {**TINY, "trials": 1, "data_root": str(tmp_path / "missing"), "defenses": ["none"],
           "replicates": 1}
    raw["surrogate"] = {**TINY["surrogate"], "epochs": 1}
    raw["victim"] = {**TINY["victim"], "epochs": 1}
    raw["attacks"] = [{**TINY["attacks"][0], "options": {"steps": 1}}]
    # digits ships with scikit-learn and reads no folder: its data_root is not checked
    assert len(run_bench(load_bench_config(raw), tmp_path / "d", progress=False)) == 1
