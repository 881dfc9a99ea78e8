"""Shared benchmark plumbing: environment record, timing stats, a table, and atomic JSON output."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from epic._io import write_json


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def timed(fn, repeats: int, warmup: int = 1) -> tuple[list[float], Any]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` timed; return seconds, result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def stats(times: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(times), "std": statistics.pstdev(times), "n": len(times)}


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def save(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    """Write ``payload`` to ``runs/<name>-<timestamp>/result.json`` (or ``out``) atomically,
    with what every result records: ``benchmark`` (``name``), the ``command`` that ran and the
    ``env`` (:func:`environment`; a payload's own ``env`` wins). Return the path."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out) if out else Path("runs") / f"{name}-{stamp}" / "result.json"
    write_json(path, {"benchmark": name, "command": shlex.join(sys.argv), "env": environment(),
                      **payload})
    return path
