"""Smoke runs of the speed benchmarks in ``benchmarks/`` and the diagnostics in ``tools/``: they
finish and write the expected JSON (tiny sizes; the diagnostics read small ``epic bench`` folders
on digits)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from epic.evaluation import load_bench_config, read_results, run_bench
from epic.evaluation.bench import default_data_root

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, tmp_path: Path, *args: str) -> dict:
    """Run ``script`` (a path from the repository root) with ``--out``; return its JSON."""
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args,
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_selection_scaling_quick(tmp_path):
    data = run_script("benchmarks/selection_scaling.py", tmp_path, "--quick", "--threads", "1")
    assert data["benchmark"] == "selection_scaling"
    assert data["threads"] == 1 and data["env"]["threads"] == 1
    series = {(r["mode"], r["optimizer"]): r for r in data["results"]}
    assert set(series) == {("classes", "stochastic"), ("one-class", "stochastic"),
                           ("one-class", "lazy")}
    for r in series.values():
        assert isinstance(r["growth_exponent"], float)
        assert len(r["local_exponents"]) == len(r["points"]) - 1
        for p in r["points"]:
            assert p["status"] == "ok", p
            assert p["mean_seconds"] > 0 and len(p["seconds"]) == 1
            assert p["peak_rss_mib"] >= p["proxies_mib"] > 0
            assert p["medoids"] == p["n"] // 10 and 0 <= p["dropped"] <= p["medoids"]
            assert p["dim"] == r["num_classes"]
    assert series[("classes", "stochastic")]["points"][0]["classes"] == 20
    assert series[("one-class", "lazy")]["points"][0]["classes"] == 1


def _throughput_dataset() -> str | None:
    """cifar10 if its local copy is there, else mnist, else None."""
    for name, probe in (("cifar10", "cifar-10-batches-py/data_batch_1"),
                        ("mnist", "train-labels-idx1-ubyte.gz")):
        root = Path(default_data_root(name))
        root = root if root.is_absolute() else ROOT / root  # the script runs in ROOT
        if (root / probe).exists() or (root / probe.removesuffix(".gz")).exists():
            return name
    return None


@pytest.mark.slow
def test_train_throughput_quick(tmp_path):
    dataset = _throughput_dataset()
    if dataset is None:
        pytest.skip("neither CIFAR-10 ($EPIC_CACHE/cifar10, `make data`) nor MNIST "
                    "($EPIC_SHARED_DATA/mnist) is available locally")
    data = run_script("benchmarks/train_throughput.py", tmp_path, "--quick", "--dataset", dataset)
    assert data["benchmark"] == "train_throughput"
    assert data["config"]["epochs"] == 4 and data["config"]["train_size"] == 256
    none, epic = data["results"]["none"], data["results"]["epic"]
    for res in (none, epic):
        assert res["images_per_second"] > 0 and res["wall_seconds"] > 0
        assert 0 <= res["test_acc"] <= 1
    assert none["images"] == 4 * 256 and none["selection_seconds"] == 0
    assert epic["runs"][0]["rounds"] >= 1 and epic["selection_seconds"] > 0
    assert epic["images"] <= none["images"]
    run = epic["runs"][0]
    assert run["epoch_seconds_full_set"] > 0  # the epochs before the first drop
    assert (run["epoch_seconds_after_drops"] is None) == (run["final_active"] == 256)
    overhead = data["overhead"]
    assert set(overhead) == {"wall", "selection_only", "target", "meets_target"}
    assert overhead["selection_only"] == pytest.approx(
        epic["selection_seconds"] / none["wall_seconds"])


def test_benchmarks_and_tools_use_public_trainer_api():
    for path in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tools").glob("*.py")]:
        assert not re.search(r"\btrainer\._\w", path.read_text()), path.name


@pytest.fixture(scope="module")
def proxy_pass_bench(tmp_path_factory) -> Path:
    """configs/cpu-digits-proxy-pass.yaml shrunk: one target, a few epochs and steps."""
    raw = yaml.safe_load((ROOT / "configs" / "cpu-digits-proxy-pass.yaml").read_text())
    raw.update(trials=1, seeds=[0])
    raw["surrogate"]["epochs"] = 2
    raw["victim"]["epochs"] = 5
    raw["attacks"][0]["options"]["steps"] = 2
    out = tmp_path_factory.mktemp("proxy-pass")
    run_bench(load_bench_config(raw), out, progress=False)
    return out


@pytest.mark.slow
def test_proxy_pass_config_runs_both_passes(proxy_pass_bench):
    rows = {r["defense"]: r for r in read_results(proxy_pass_bench)}
    assert set(rows) == {"none", "epic-0.1-separate", "epic-0.1-training"}
    for label in ("epic-0.1-separate", "epic-0.1-training"):
        assert rows[label]["config"]["defense"]["options"]["proxy_pass"] == \
            label.split("-")[-1]
        assert rows[label]["summary"]["defense_summary"]["rounds"] >= 1
        assert rows[label]["summary"]["defense_summary"]["selection_seconds"] > 0


@pytest.mark.slow
def test_round_flags_reruns_an_epic_plus_cell_and_counts_each_rounds_flags(proxy_pass_bench,
                                                                          tmp_path):
    """A bench folder whose one row runs epic-plus (the stored EPIC row with its defense
    swapped); the tool re-runs it and splits each round's top 3% into poisons and clean."""
    bench = tmp_path / "bench"
    bench.mkdir()
    (row,) = [r for r in read_results(proxy_pass_bench) if r["defense"] == "epic-0.1-separate"]
    row["config"]["defense"] = {"name": "epic-plus", "options": {}}
    row["defense"] = "epic-plus"
    (bench / "results.jsonl").write_text(json.dumps(row) + "\n")
    data = run_script("tools/round_flags.py", tmp_path, "--bench", str(bench))
    (trial,) = data["trials"]
    n = len(trial["rounds"])
    assert n == trial["rerun"]["defense_summary"]["rounds"] >= 3
    for r in trial["rounds"]:
        flagged = sum(v for k, v in r.items() if "flagged" in k)
        assert flagged == int(0.03 * 1347)  # digits' training split, top 3% each round
        assert r["poisons_flagged_dropped"] <= r["poisons_dropped_before"] <= 13
    proc = subprocess.run([sys.executable, str(ROOT / "tools/round_flags.py"), "--bench",
                           str(proxy_pass_bench), "--defense", "epic-0.1-separate"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: 'epic-0.1-separate' is not epic-plus with its group score; pass --defense "
        "with the label of such a row"]


@pytest.mark.slow
def test_gm_alignment_reads_a_bench_folder(proxy_pass_bench, tmp_path):
    data = run_script("tools/gm_alignment.py", tmp_path, "--bench", str(proxy_pass_bench))
    assert data["benchmark"] == "gm_alignment"
    assert data["config"]["attack"] == "gradient-matching" and data["config"]["seed"] == 0
    (r,) = data["results"]
    assert r["trial"] == 0
    for model in ("surrogate", "victim"):
        assert 0 <= r[f"{model}_poisons"] <= 2 and 0 <= r[f"{model}_bases"] <= 2
        assert 0 <= r[f"{model}_p_adv"] <= 1


def one_trial_bench(out: Path, name: str, victim: dict, attack: dict) -> Path:
    """Run an undefended one-target bench on digits (a surrogate of 2 epochs) into ``out``."""
    cfg = load_bench_config({
        "name": name, "dataset": "digits", "trials": 1,
        "surrogate": {"model": "convnet", "epochs": 2, "lr": 0.05, "batch_size": 64},
        "victim": {"batch_size": 64, "eval_every": 0, **victim}, "attacks": [attack],
        "defenses": ["none"]})
    run_bench(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def transfer_bench(tmp_path_factory):
    """A one-trial bullseye bench in transfer on digits (what the tools read)."""
    return one_trial_bench(
        tmp_path_factory.mktemp("transfer") / "bench", "tiny-transfer",
        {"scenario": "transfer", "epochs": 4, "lr": 0.1},
        {"name": "bullseye-polytope", "num_poisons": 5, "eps": 128, "options": {"steps": 2}})


@pytest.mark.slow
def test_poison_clusters_reads_a_transfer_bench(transfer_bench, tmp_path):
    data = run_script("tools/poison_clusters.py", tmp_path, "--bench", str(transfer_bench),
                      "--epochs", "0", "2", "--fractions", "0.1", "0.3")
    assert data["benchmark"] == "poison_clusters"
    assert "tools/poison_clusters.py --bench" in data["command"] and data["env"]["torch"]
    assert [(r["epoch"], r["fraction"]) for r in data["rows"]] == [
        (0, 0.1), (0, 0.3), (2, 0.1), (2, 0.3)]
    for r in data["rows"]:
        assert 1 <= r["poison_clusters"] <= 5 and 0 <= r["poison_singletons"] <= 5


@pytest.mark.slow
def test_feature_isolation_reads_a_transfer_bench(transfer_bench, tmp_path):
    data = run_script("tools/feature_isolation.py", tmp_path, "--bench", str(transfer_bench),
                      "--top", "0.1", "--label-scores", "--squeeze", "70", "70+90")
    assert data["benchmark"] == "feature_isolation"
    rows = {r["score"]: r for r in data["rows"]}
    assert {"iso10", "ratio30", "drop5-50", "disagree10", "head-loss", "oof-loss",
            "reference-loss", "group30+reference", "squeeze70",
            "group30+squeeze70", "group30+squeeze70+90"} <= set(rows)
    assert "squeeze90" not in rows  # a quality only in a combination is not ranked alone
    for r in rows.values():
        (count,) = r["per_trial"]
        assert 0 <= count <= 5
    (trial,) = data["trials"]
    assert 0 <= trial["group30_flagged"] <= 5 and 0 <= trial["poisons_off_label"] <= 1
    assert 0 <= trial["poison_median_percentile"] <= 1
    assert trial["poison_move"] > 0 and trial["target_to_adv_class"] > 0  # 2 steps at eps 128
    assert trial["poison_mean_to_target"] >= 0


def test_label_scores_rank_a_mislabelled_example_first():
    sys.path.insert(0, str(ROOT / "tools"))
    from feature_isolation import label_scores

    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(60, 4, generator=g) + 4, torch.randn(60, 4, generator=g) - 4])
    labels = torch.cat([torch.zeros(60), torch.ones(60)]).long()
    labels[5] = 1  # sits among class 0
    logits = torch.stack([feats.sum(1), -feats.sum(1)], 1)  # a head that reads the clusters
    for name, score in label_scores(feats, logits, labels).items():
        assert int(score.argmax()) == 5, name


def test_feature_isolation_ranks_a_tight_far_group_first():
    sys.path.insert(0, str(ROOT / "tools"))
    from feature_isolation import scores

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(400, 8, generator=g)
    labels = torch.arange(400) % 2
    group = torch.arange(0, 40, 2)[:12]  # 12 examples of class 0 ...
    feats[group] = 6.0 + 0.05 * torch.randn(12, 8, generator=g)  # ... packed far away
    s = scores(feats, labels)
    for name in ("iso30", "drop5-30"):
        assert set(s[name].topk(12).indices.tolist()) == set(group.tolist()), name


@pytest.mark.slow
def test_poisons_alone_reads_a_bench(transfer_bench, tmp_path):
    data = run_script("tools/poisons_alone.py", tmp_path, "--bench", str(transfer_bench),
                      "--steps", "3")
    assert data["benchmark"] == "poisons_alone" and data["steps"] == 3
    (row,) = data["rows"]
    assert row["trial"] == "trial-000" and row["adv_label"] != row["target_label"]
    for kind in ("poisons", "bases"):
        assert row[f"{kind}_adv_loss"] >= 0 and isinstance(row[f"{kind}_flipped"], bool)


@pytest.mark.slow
def test_clean_control_trains_clean_victims_and_predicts_every_target(transfer_bench, tmp_path):
    data = run_script("tools/clean_control.py", tmp_path, "--bench", str(transfer_bench),
                      "--seeds", "2")
    assert data["benchmark"] == "clean_control" and data["seeds"] == [7000, 7001]
    (row,) = data["rows"]
    assert row["trial"] == 0 and row["undefended_runs"] >= 1
    assert len(row["clean_predictions"]) == 2 and all(0 <= p < 10 for p in row["clean_predictions"])
    assert row["clean_adv"] == sum(p == row["adv_label"] for p in row["clean_predictions"])
    assert row["seed"] == 0
    (tmp_path / "result.json").replace(transfer_bench / "clean_control.json")
    from epic.evaluation import write_report

    try:  # the report reads the control from the bench folder
        text = write_report(transfer_bench)["markdown"]
        assert "net of clean-explained" in text
    finally:
        (transfer_bench / "clean_control.json").unlink()


@pytest.mark.slow
def test_stem_texture_reads_a_transfer_bench(transfer_bench, tmp_path):
    data = run_script("tools/stem_texture.py", tmp_path, "--bench", str(transfer_bench),
                      "--top", "0.1")
    assert data["benchmark"] == "stem_texture"
    (row,) = data["rows"]
    assert row["poisons"] == 5 and row["log10_tail"] <= 0
    for key in ("texture", "group", "epic-plus"):
        assert 0 <= row[key] <= 5


def test_stem_texture_class_test_is_epic_plus_concentrated_class():
    sys.path.insert(0, str(ROOT / "tools"))
    from epic.defenses.epic_plus import concentrated_class
    from stem_texture import class_test

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3000) % 10
    for planted in (0, 5, 12, 25):  # of the top 1% (30) put in class 4
        scores = torch.rand(3000, generator=g)
        scores[(labels == 4).nonzero().squeeze(1)[:planted]] += 1
        named, count, tail = class_test(scores, labels)
        fired = concentrated_class(scores, labels)
        assert (tail < -5) == (fired is not None), planted
        if fired is not None:
            assert named == fired == 4 and count >= planted
        assert (fired is None) == (planted <= 5), planted  # chance puts 3 there


@pytest.fixture(scope="module")
def finetune_gm_bench(tmp_path_factory):
    """A one-trial gradient-matching bench fine-tuning its surrogate on digits."""
    return one_trial_bench(
        tmp_path_factory.mktemp("finetune") / "bench", "tiny-finetune",
        {"scenario": "finetune", "epochs": 2, "lr": 0.02, "augment": "none"},
        {"name": "gradient-matching", "budget": 0.02, "eps": 128,
         "options": {"steps": 2, "restarts": 1}})


@pytest.mark.slow
def test_poison_contribution_ranks_and_retrains_a_finetune_bench(finetune_gm_bench, tmp_path):
    data = run_script("tools/poison_contribution.py", tmp_path, "--bench",
                      str(finetune_gm_bench), "--retrain", "0")
    assert data["benchmark"] == "poison_contribution" and data["top"] == 0.03
    (r,) = data["trials"]
    assert r["trial"] == 0 and 0 < r["top10_share"] <= 1
    for name in ("group", "loss", "misfit", "misfit-plain", "group+misfit"):
        assert 0 <= r[f"{name}_share"] <= 1 and 0 <= r[f"{name}_poisons"] <= 27
    assert isinstance(r["hit_without_group_top"], bool)
    assert isinstance(r["hit_without_as_many_by_contribution"], bool)


def test_true_pixel_accuracy_finds_each_image_in_a_shuffled_compressed_copy():
    sys.path.insert(0, str(ROOT / "tools"))
    from true_pixel_accuracy import match

    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 4
    order = torch.randperm(40, generator=g)
    noise = torch.randint(-6, 7, true.shape, generator=g)
    copy = (true[order].int() + noise).clamp(0, 255).to(torch.uint8)  # shuffled, "compressed"
    index, error = match(true, labels, copy, labels[order])
    assert torch.equal(order[index], torch.arange(40))
    assert bool((error > 0).all()) and float(error.max()) <= 6


@pytest.mark.slow
def test_true_pixel_accuracy_rebuilds_each_victim_of_a_bench(transfer_bench, tmp_path):
    """Each stored victim (undefended replicates included) is found and rebuilt: on the test
    split it scores the clean accuracy its run recorded."""
    import shutil

    sys.path.insert(0, str(ROOT / "tools"))
    from epic.data import load_split
    from true_pixel_accuracy import evaluate, victims

    bench = tmp_path / "bench"
    shutil.copytree(transfer_bench, bench)
    trial = bench / "runs/bullseye-polytope/victim/none/seed0/trial000"
    shutil.copytree(trial, tmp_path / "rep1")  # a replicate, as a bench with replicates: 2
    shutil.move(tmp_path / "rep1", trial / "rep1")
    found = victims(bench, None)
    assert [(d, r) for d, _, r in found] == [("none", trial), ("none", trial / "rep1")]
    assert {k for _, k, _ in found} == {"bullseye-polytope/seed0/trial000"}
    test = load_split("digits", None, train=False)
    cache: dict = {}
    for _, _, run in found:
        (acc,) = evaluate(run, cache, [(test.images, test.labels)])
        recorded = json.loads((run / "summary.json").read_text())["clean_test_acc"]
        assert abs(acc - recorded) <= 0.01, run
    assert len(cache) == 1  # one surrogate read once


@pytest.mark.slow
def test_true_pixel_accuracy_refuses_a_bench_of_another_dataset(transfer_bench, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/true_pixel_accuracy.py"), "--bench",
                           str(transfer_bench), "--out", str(tmp_path / "r.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    shared = Path(os.environ.get("EPIC_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (shared / "cifar10" / "cifar10-exact-subset.npz").is_file():
        assert proc.returncode == 1 and "pass --shared" in proc.stderr
    else:
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
            f"error: {transfer_bench} is a digits bench; this tool reads CIFAR-10 ones"]
    assert not (tmp_path / "r.json").exists()


def test_cifar10_lossless_overlays_the_true_pixels(tmp_path):
    """tools/cifar10_lossless.py: the first --count training images become the shared lossless
    subset's (same labels), the rest of the copy stays byte for byte; a bad --count is one line."""
    source = Path(default_data_root("cifar10"))
    shared = Path(os.environ.get("EPIC_SHARED_DATA", ROOT.parent / "shared" / "data"))
    subset = shared / "cifar10" / "cifar10-exact-subset.npz"
    if not (source / "cifar-10-batches-py" / "data_batch_1").is_file() or not subset.is_file():
        pytest.skip("needs the CIFAR-10 copy of `make data` and the shared lossless subset")
    import numpy as np

    from epic.data import load_split

    script = [sys.executable, str(ROOT / "tools/cifar10_lossless.py"), "--source", str(source),
              "--shared", str(shared), "--out", str(tmp_path / "c10")]
    proc = subprocess.run([*script, "--count", "30"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    new = load_split("cifar10", tmp_path / "c10", train=True)
    old = load_split("cifar10", source, train=True)
    exact = torch.from_numpy(np.load(subset)["x_train"][:31]).permute(0, 3, 1, 2)
    assert torch.equal(new.images[:30], exact[:30]) and not torch.equal(new.images[30], exact[30])
    assert torch.equal(new.images[30:], old.images[30:]) and torch.equal(new.labels, old.labels)
    assert not torch.equal(old.images[:30], exact[:30])  # the built copy is JPEG-compressed
    proc = subprocess.run([*script, "--count", "5000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --count must be between 1 and 4000 (the lossless subset's size)"]
