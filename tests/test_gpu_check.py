"""benchmarks/gpu_check.sh and the scripts it runs, on the CPU: the no-GPU exit, the whole
script at toy sizes (GPU_CHECK_SMOKE=1: one selection round, synthetic training data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
NO_GPU = "gpu_check: no GPU found (torch.cuda.is_available() is False); nothing to check"
STEPS = ("pytest_cuda", "train_throughput", "selection_round", "torchrun")


def run_check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "OUT": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, json.loads((tmp_path / "gpu_check.json").read_text())


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_says_so_and_exits_0(tmp_path):
    proc, data = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert NO_GPU in proc.stdout.splitlines()
    assert data["cuda"] is False and data["ok"] is True and data["smoke"] is False
    assert data["torch"] == torch.__version__ and data["gpu"] is None
    assert data["steps"]["probe"]["status"] == "ok"
    for step in STEPS:
        assert data["steps"][step] == {"status": "skipped", "rc": None, "seconds": 0.0,
                                       "limit_seconds": 0, "note": "no GPU"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_packed_output_is_few_files_and_the_json_holds_each_logs_tail(tmp_path):
    """For the device tool, which brings back at most 8 files from OUT."""
    import tarfile

    proc, data = run_check(tmp_path, GPU_CHECK_PACK="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "logs.tar.gz"]
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert {"logs/steps.tsv", "logs/probe.log"} <= set(tar.getnames())
    assert data["steps"]["probe"]["log_tail"]


@pytest.mark.slow
def test_every_step_at_toy_sizes_on_cpu(tmp_path):
    proc, data = run_check(tmp_path, GPU_CHECK_SMOKE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = data["steps"]
    assert data["smoke"] is True and data["ok"] is True
    assert {k: s["status"] for k, s in steps.items()} == dict.fromkeys(("probe", *STEPS), "ok")
    assert all((tmp_path / s["log"]).is_file() for s in steps.values())
    tests = steps["pytest_cuda"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0
    tt = steps["train_throughput"]
    assert tt["config"]["synthetic"] is True and tt["config"]["resolved_device"] == "cpu"
    assert tt["none"]["images_per_second"] > 0 and tt["epic_rounds"] >= 1
    assert [r["optimizer"] for r in steps["selection_round"]["rounds"]] == ["stochastic", "lazy"]
    assert steps["torchrun"]["summary"]["defense_summary"]["rounds"] >= 1
    # the scripts' own results, next to the JSON
    full = json.loads((tmp_path / "train_throughput.json").read_text())
    assert full["config"]["channels_last"] is True
    none, epic = full["results"]["none"], full["results"]["epic"]
    assert none["images"] > 0 and epic["runs"][0]["rounds"] >= 1 and 0 <= none["test_acc"] <= 1
    sel = json.loads((tmp_path / "gpu_selection_round.json").read_text())
    assert sel["benchmark"] == "gpu_selection_round"
    assert sel["config"]["resolved_device"] == "cpu"
    assert sel["proxies"]["n"] == 2000 and sel["proxies"]["dim"] == 20
    for r in sel["results"]:  # 10% of each class's 100 proxies
        assert r["mean_seconds"] > 0 and r["medoids"] == 200 and 0 <= r["dropped"] <= 200
        assert r["result_device"] == "cpu" and "peak_gpu_mib" not in r


def test_device_proxies_are_softmax_minus_onehot():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_selection_round import device_proxies
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    proxies, labels = device_proxies(300, 5, device=torch.device("cpu"), seed=0)
    assert proxies.shape == (300, 5) and torch.equal(labels, torch.arange(300) % 5)
    assert torch.allclose(proxies.sum(1), torch.zeros(300), atol=1e-5)  # softmax - onehot
    assert (proxies[torch.arange(300), labels] <= 0).all()
    again, _ = device_proxies(300, 5, device=torch.device("cpu"), seed=0)
    assert torch.equal(proxies, again)
    projected, _ = device_proxies(300, 5, device=torch.device("cpu"), seed=0, dim=3)
    assert projected.shape == (300, 3)
