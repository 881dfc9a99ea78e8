r"""Which of a bench's targets does a victim trained *without poisons* already send to the
attacker's class? Those "hits" are not the attack's doing, and no defense can stop them.

``epic bench`` picks targets at random among the test images, so some are images the clean
model gets wrong, and some of those it gets wrong in exactly the attacker's class. Neither
three undefended seeds nor a matched random drop rule that out; a clean run does. This runs
:func:`epic.evaluation.clean_control` on an existing bench folder: each undefended victim's
recipe (the resolved config of its first ``none`` cell) trained on the clean training split,
once per ``--seeds`` seed (7000, 7001, ...), and for every target the clean victims'
predictions; a target is *clean-explained* when a clean victim predicts its adversarial class.
A bench config with ``clean_seeds: N`` does the same at the end of ``epic bench``.

    python tools/clean_control.py --bench runs/bench/c10-fc-g-final [--seeds 3]

It writes ``clean_control.json`` into the bench folder (or ``--out``); ``epic report`` then
leaves the clean-explained targets out of the robust hits and adds a "net" success column.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import print_table, save  # noqa: E402
from epic import EpicError  # noqa: E402
from epic.evaluation import clean_control, read_results  # noqa: E402
from epic.evaluation.bench import CLEAN_CONTROL  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="an epic bench folder")
    parser.add_argument("--seeds", type=int, default=3, help="clean victims to train")
    parser.add_argument("--out", default=None, help="default: BENCH/clean_control.json")
    args = parser.parse_args()
    try:
        rows = read_results(args.bench)
        with tempfile.TemporaryDirectory() as tmp:
            control = clean_control(rows, args.seeds, tmp)
    except EpicError as err:
        sys.exit(f"error: {err}")
    for victim, accs in control["clean_test_acc"].items():
        for seed, acc in zip(control["seeds"], accs, strict=True):
            print(f"clean victim {victim!r} seed {seed}: test accuracy {acc:.4f}")
    out_rows = control["rows"]
    explained = [r for r in out_rows if r["clean_adv"]]
    robust = [r for r in out_rows if r["undefended_hits"] == r["undefended_runs"]]
    print(f"{len(out_rows)} (attack, victim, target) rows; {len(explained)} clean-explained (a "
          f"clean victim predicts the adversarial class), "
          f"{sum(r['clean_adv'] > 0 for r in robust)} of the {len(robust)} robust hits")
    print_table(["attack", "victim", "seed/trial", "target", "adv", "clean predictions",
                 "undefended hits"],
                [[r["attack"], r["victim"], f"{r['seed']}/{r['trial']}", r["target_index"],
                  r["adv_label"], r["clean_predictions"],
                  f"{r['undefended_hits']}/{r['undefended_runs']}"] for r in explained])
    path = save("clean_control", {**control, "bench": str(args.bench)},
                args.out or str(Path(args.bench) / CLEAN_CONTROL))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
