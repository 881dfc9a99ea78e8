#!/usr/bin/env bash
# gpu_check.sh: everything worth checking on a GPU, in one short slot (under 8 minutes).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # writes /some/dir/gpu_check.json and logs/
#   bash benchmarks/gpu_check.sh                 # writes runs/gpu_check/gpu_check.json
#
# Steps, each time-boxed with `timeout` (a failing or hanging step is recorded, the next runs;
# status ok, failed, timeout, skipped, or no_time when the budget was spent before it):
#   probe             torch version, CUDA availability, GPU names and memory, bf16, a matmul.
#                     Without CUDA: prints "gpu_check: no GPU found ...", writes the JSON with
#                     "cuda": false and exits 0.
#   pytest_cuda       `pytest -m cuda -q tests` (tests/test_cuda.py): pass / fail / skip counts.
#   train_throughput  benchmarks/train_throughput.py --device cuda --amp (bf16, channels-last),
#                     ResNet-18 on 5,000 CIFAR-10-sized images, 40 epochs, undefended vs EPIC-0.1:
#                     the real CIFAR-10 if $EPIC_CACHE/cifar10 has it, else --synthetic images.
#   selection_round   benchmarks/gpu_selection_round.py: one EPIC-0.1 round on 1.28M proxies of
#                     dimension 1,000 in 1,000 classes, built on the GPU; stochastic then lazy
#                     greedy; seconds and peak GPU memory.
#   torchrun          with 2+ GPUs: `torchrun --standalone --nproc_per_node 2 -m epic train` on
#                     digits, 4 epochs, EPIC every epoch; skipped (with a note) on one GPU.
# It downloads nothing. The JSON holds every step's status, return code, seconds and figures;
# each step's output is in logs/<step>.log next to it. Exit status: 0 when no step failed (or
# there is no GPU), 1 otherwise.
#
# Environment:
#   PYTHON             interpreter (default .venv/bin/python, then python3: the first that
#                      imports torch); src/ is put on PYTHONPATH, so epic need not be installed.
#   OUT                output folder (default runs/gpu_check).
#   GPU_CHECK_BUDGET   seconds for all steps together (default 450); each step's timeout is its
#                      own cap or what is left of the budget, whichever is smaller.
#   GPU_CHECK_TRAIN_SIZE, GPU_CHECK_EPOCHS   train_throughput's size (default 5000, 40).
#   GPU_CHECK_SMOKE=1  run every step on the CPU at toy sizes (tests this script without a GPU).
#   GPU_CHECK_PACK=1   pack logs/ (and torchrun's run folder) into logs.tar.gz at the end, so
#                      OUT holds 4 files (the device tool brings back at most 8); every step's
#                      log tail is in the JSON too.

set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 1  # OUT relative to the caller
cd "$ROOT" || exit 1

LOGS="$OUTDIR/logs"
JSON="$OUTDIR/gpu_check.json"
BUDGET="${GPU_CHECK_BUDGET:-450}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
RESERVE=15  # seconds kept for writing the JSON
START=$SECONDS
# this script's files only (a result left by an earlier run must not pass for this one's)
rm -rf "$LOGS" "$OUTDIR/torchrun_train"
rm -f "$JSON" "$OUTDIR/train_throughput.json" "$OUTDIR/gpu_selection_round.json" \
  "$OUTDIR/logs.tar.gz"
mkdir -p "$LOGS" || exit 1
STEPS="$LOGS/steps.tsv"
: > "$STEPS"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
HAVE_TIMEOUT=1
command -v timeout > /dev/null || HAVE_TIMEOUT=0

now() { date +%s.%N; }

# record NAME STATUS RC SECONDS LIMIT NOTE: one line of logs/steps.tsv
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >> "$STEPS"
}

# run_step NAME CAP CMD...: run CMD under `timeout` (CAP seconds or what is left of the
# budget), output to logs/NAME.log; records the step and returns CMD's status.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    record "$name" no_time "" 0 0 "not run: the budget of ${BUDGET} s is spent"
    echo "gpu_check: $name not run (the budget of ${BUDGET} s is spent)"
    return 124
  fi
  local t0 t1 rc status seconds
  t0=$(now)
  if ((HAVE_TIMEOUT)); then
    timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  else
    "$@" > "$LOGS/$name.log" 2>&1
  fi
  rc=$?
  t1=$(now)
  seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$seconds" "$limit" ""
  echo "gpu_check: $name $status (rc $rc, ${seconds} s of at most ${limit} s; log $LOGS/$name.log)"
  return $rc
}

skip() {  # skip NAME NOTE
  record "$1" skipped "" 0 0 "$2"
  echo "gpu_check: $1 skipped ($2)"
}

# ------------------------------------------------------------------------ the interpreter
PROBE="$LOGS/probe.json"
PROBE_PY='
import json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
import torch
info.update(torch=torch.__version__, cuda_build=torch.version.cuda,
            cuda=torch.cuda.is_available(), device_count=0, gpus=[])
try:
    import epic
    info["epic"] = epic.__file__
except Exception as exc:  # the steps will fail; say why here
    info["epic_import_error"] = repr(exc)
if info["cuda"]:
    try:  # a broken driver or device: recorded, and the steps will show it
        n = torch.cuda.device_count()
        info["device_count"] = n
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "capability": [p.major, p.minor],
                                 "memory_gib": round(p.total_memory / 2**30, 1)})
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["cudnn"] = torch.backends.cudnn.version()
        x = torch.randn(1024, 1024, device="cuda")
        info["matmul_ok"] = bool(torch.isfinite(x @ x).all())
    except Exception as exc:
        info["cuda_error"] = repr(exc)
json.dump(info, open(sys.argv[1], "w"), indent=1)
print("cuda available:", info["cuda"], "devices:", info["device_count"])
'
CANDIDATES=("${PYTHON:-.venv/bin/python}")
[[ "${CANDIDATES[0]}" != python3 ]] && CANDIDATES+=(python3)
PY=""
for cand in "${CANDIDATES[@]}"; do
  if ! command -v "$cand" > /dev/null; then
    echo "gpu_check: no interpreter at $cand"
    continue
  fi
  rm -f "$PROBE"
  if run_step probe 90 "$cand" -c "$PROBE_PY" "$PROBE" && [[ -s "$PROBE" ]]; then
    PY=$cand
    break
  fi
  echo "gpu_check: $cand cannot import torch (see $LOGS/probe.log)"
done

# assemble: the JSON from logs/ (no torch import); falls back to a minimal one without Python
assemble() {
  local py=${PY:-python3}
  if ! GPU_CHECK_TOTAL=$((SECONDS - START)) "$py" - "$OUTDIR" "$BUDGET" "$SMOKE" "$PY" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

out, budget, smoke, py = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
logs = out / "logs"

def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

probe = load(logs / "probe.json") or {}
steps = {}
for line in (logs / "steps.tsv").read_text().splitlines():
    name, status, rc, seconds, limit, note = line.split("\t")
    step = {"status": status, "rc": int(rc) if rc else None, "seconds": float(seconds),
            "limit_seconds": int(limit)}
    if note:
        step["note"] = note
    if (logs / f"{name}.log").exists():
        step["log"] = f"logs/{name}.log"
        text = (logs / f"{name}.log").read_text(errors="replace")
        step["log_tail"] = text[-3000:]  # the JSON alone tells what went wrong
    steps[name] = step  # a retried probe: the last try

def attach(name, path, figures):
    """Add ``figures(path)`` to step ``name`` if ``path`` exists; never raises."""
    if name not in steps or not path.exists():
        return
    try:
        steps[name].update(figures(path))
    except Exception as exc:  # a partial or malformed result: keep the rest of the JSON
        steps[name]["figures_error"] = repr(exc)

def pytest_counts(path):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    count = {k: sum(int(s.get(k, 0)) for s in suites)
             for k in ("tests", "failures", "errors", "skipped")}
    count["passed"] = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    return count

def throughput(path):
    tt = json.loads(path.read_text())
    res, keep = tt["results"], ("images", "wall_seconds", "train_seconds", "selection_seconds",
                                "images_per_second", "end_to_end_images_per_second", "test_acc")
    last = res["epic"]["runs"][-1]
    return {"config": {k: tt["config"].get(k) for k in (
                "model", "dataset", "synthetic", "train_size", "epochs", "batch_size", "amp",
                "amp_dtype", "channels_last", "resolved_device", "schedule")},
            **{name: {k: res[name].get(k) for k in keep} for name in ("none", "epic")},
            "epic_rounds": last["rounds"], "epic_dropped": last["dropped"],
            "round_breakdown": last["round_breakdown"], "overhead": tt["overhead"],
            "result": "train_throughput.json"}

def selection(path):
    sel = json.loads(path.read_text())
    return {"proxies": sel["proxies"], "rounds": sel["results"],
            "result": "gpu_selection_round.json"}

def torchrun(path):
    summary = json.loads(path.read_text())
    return {"summary": {k: summary.get(k) for k in (
        "dataset", "model", "defense", "epochs", "train_examples", "clean_test_acc",
        "clean_dropped", "defense_summary", "wall_seconds")}}

attach("pytest_cuda", logs / "pytest_cuda.xml", pytest_counts)
attach("train_throughput", out / "train_throughput.json", throughput)
attach("selection_round", out / "gpu_selection_round.json", selection)
attach("torchrun", out / "torchrun_train" / "summary.json", torchrun)

gpus = probe.get("gpus") or []
payload = {
    "check": "gpu_check", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    "cuda": probe.get("cuda"), "smoke": smoke, "interpreter": py or None,
    "python": probe.get("python"), "torch": probe.get("torch"),
    "cuda_build": probe.get("cuda_build"), "cudnn": probe.get("cudnn"),
    "gpu": gpus[0]["name"] if gpus else None, "gpus": gpus,
    "device_count": probe.get("device_count"), "bf16": probe.get("bf16"),
    "matmul_ok": probe.get("matmul_ok"), "cuda_error": probe.get("cuda_error"),
    "epic": probe.get("epic"), "epic_import_error": probe.get("epic_import_error"),
    "budget_seconds": budget, "total_seconds": int(os.environ["GPU_CHECK_TOTAL"]),
    "ok": all(s["status"] in ("ok", "skipped") for s in steps.values()) and bool(probe),
    "steps": steps,
}
tmp = out / "gpu_check.json.tmp"
tmp.write_text(json.dumps(payload, indent=1) + "\n")
os.replace(tmp, out / "gpu_check.json")
try:
    for name, step in steps.items():  # the headline figures
        if "passed" in step:
            print(f"gpu_check: {name}: {step['passed']} passed, {step['failures']} failed, "
                  f"{step['errors']} errors, {step['skipped']} skipped")
        if "none" in step:
            print(f"gpu_check: {name}: {step['config']['model']}, undefended "
                  f"{step['none']['images_per_second']:,.0f} images/s, EPIC "
                  f"{step['epic']['images_per_second']:,.0f} images/s; EPIC's rounds "
                  f"{step['overhead']['selection_only']:.1%} of the undefended wall time, "
                  f"{step['overhead']['wall']:+.1%} end to end")
        for r in step.get("rounds", []):
            peak = f", peak {r['peak_gpu_mib'] / 1024:.2f} GiB" if "peak_gpu_mib" in r else ""
            print(f"gpu_check: {name}: {r['optimizer']} {r['mean_seconds']:.2f} s on "
                  f"{step['proxies']['n']:,} proxies{peak}")
except Exception as exc:  # the JSON is written; the summary is a courtesy
    print(f"gpu_check: (no summary: {exc!r})")
EOF
  then
    printf '{"cuda": null, "error": "the JSON could not be assembled (%s)"}\n' "$py" > "$JSON"
  fi
  echo "gpu_check: wrote $JSON"
}

finish() {  # finish EXIT_STATUS
  assemble
  if [[ "${GPU_CHECK_PACK:-0}" == 1 ]]; then  # few files: logs/ (and torchrun's run) in one
    local extra=()
    [[ -d "$OUTDIR/torchrun_train" ]] && extra=(torchrun_train)
    tar -czf "$OUTDIR/logs.tar.gz" -C "$OUTDIR" logs "${extra[@]}" \
      && rm -rf "$LOGS" "$OUTDIR/torchrun_train" && echo "gpu_check: packed logs/ into $OUTDIR/logs.tar.gz"
  fi
  exit "$1"
}

if [[ -z "$PY" ]]; then
  echo "gpu_check: no interpreter imports torch (tried ${CANDIDATES[*]}); nothing to check"
  finish 1
fi
CUDA=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["cuda"])' "$PROBE")
NGPU=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["device_count"])' "$PROBE")
if [[ "$SMOKE" == 1 ]]; then
  echo "gpu_check: GPU_CHECK_SMOKE=1: every step on the CPU at toy sizes"
  DEVICE=cpu
elif [[ "$CUDA" != True ]]; then
  echo "gpu_check: no GPU found (torch.cuda.is_available() is False); nothing to check"
  for step in pytest_cuda train_throughput selection_round torchrun; do
    record "$step" skipped "" 0 0 "no GPU"
  done
  finish 0
else
  DEVICE=cuda
  command -v nvidia-smi > /dev/null && timeout 20 nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1
fi

# ------------------------------------------------------------------------------ the steps
PYTEST_TARGET=tests
[[ "$SMOKE" == 1 ]] && PYTEST_TARGET=tests/test_cuda.py
run_step pytest_cuda 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider \
  --junitxml "$LOGS/pytest_cuda.xml" "$PYTEST_TARGET"

if [[ "$SMOKE" == 1 ]]; then
  TT_ARGS=(--device cpu --model convnet --synthetic --quick)
else
  TT_ARGS=(--device cuda --amp --amp-dtype bfloat16 --model resnet18
           --train-size "${GPU_CHECK_TRAIN_SIZE:-5000}" --epochs "${GPU_CHECK_EPOCHS:-40}"
           --test-size 1000)
  [[ -f "${EPIC_CACHE:-.cache}/cifar10/cifar-10-batches-py/data_batch_1" ]] \
    || TT_ARGS+=(--synthetic)
fi
run_step train_throughput 210 "$PY" benchmarks/train_throughput.py "${TT_ARGS[@]}" \
  --out "$OUTDIR/train_throughput.json"

if [[ "$SMOKE" == 1 ]]; then
  SEL_ARGS=(--n 2000 --num-classes 20)
else
  SEL_ARGS=(--n 1280000 --num-classes 1000)
fi
run_step selection_round 120 "$PY" benchmarks/gpu_selection_round.py --device "$DEVICE" \
  "${SEL_ARGS[@]}" --optimizer stochastic lazy --out "$OUTDIR/gpu_selection_round.json"

if [[ "$SMOKE" == 1 || "$NGPU" -ge 2 ]]; then
  run_step torchrun 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
    -m epic train --dataset digits --epochs 4 --batch-size 64 --lr 0.05 --warmup 1 \
    --interval 1 --device "$DEVICE" --no-progress --no-resume --out "$OUTDIR/torchrun_train"
else
  skip torchrun "$NGPU GPU: a 2-process run needs 2"
fi

FAILED=$(awk -F '\t' '$2 != "ok" && $2 != "skipped" { print $1 "(" $2 ")" }' "$STEPS" \
  | tr '\n' ' ')
if [[ -n "$FAILED" ]]; then
  echo "gpu_check: not passed: $FAILED(see $LOGS/)"
  finish 1
fi
echo "gpu_check: every step passed or was skipped, in $((SECONDS - START)) s"
finish 0
