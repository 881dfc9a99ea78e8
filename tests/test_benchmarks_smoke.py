"""Smoke runs of the scaling and throughput benchmarks: they finish and write the expected JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from epic.evaluation.bench import default_data_root

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args,
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_selection_scaling_quick(tmp_path):
    data = run_script("selection_scaling.py", tmp_path, "--quick", "--threads", "1")
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


def test_train_throughput_quick(tmp_path):
    dataset = _throughput_dataset()
    if dataset is None:
        pytest.skip("neither CIFAR-10 ($EPIC_CACHE/cifar10, `make data`) nor MNIST "
                    "($EPIC_SHARED_DATA/mnist) is available locally")
    data = run_script("train_throughput.py", tmp_path, "--quick", "--dataset", dataset)
    assert data["benchmark"] == "train_throughput"
    assert data["config"]["epochs"] == 4 and data["config"]["train_size"] == 256
    none, epic = data["results"]["none"], data["results"]["epic"]
    for res in (none, epic):
        assert res["images_per_second"] > 0 and res["wall_seconds"] > 0
        assert 0 <= res["test_acc"] <= 1
    assert none["images"] == 4 * 256 and none["selection_seconds"] == 0
    assert epic["runs"][0]["rounds"] >= 1 and epic["selection_seconds"] > 0
    assert epic["images"] <= none["images"]
    overhead = data["overhead"]
    assert set(overhead) == {"wall", "selection_only", "target", "meets_target"}
    assert overhead["selection_only"] == pytest.approx(
        epic["selection_seconds"] / none["wall_seconds"])
