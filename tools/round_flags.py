r"""What does each EPIC-plus round flag? A diagnostic for stored ``epic bench`` cells.

EPIC-plus drops at most ``fraction`` of the training set in all. When its first round spends
that cap on part of a target's poisons (and some clean images), the question is whether later
rounds would find the rest: if the poisons still trained on rose into the top ``fraction``, a
rule that takes back examples whose isolation disappears could swap them in. This re-runs the
victim of stored cells (the resolved config in ``results.jsonl``: same poisons, surrogate and
seed) with its ``epic-plus`` defense recording every round's features, and reports per round
how many poisons and clean images the top ``fraction`` of the group score holds, split into
those still trained on and those already dropped.

    python tools/round_flags.py --bench runs/bench/c10-gm-ft-tf --defense epic-plus-tf --trials 0 16

The re-run is a new training run: it follows the stored one exactly only where training is
deterministic (it is on one CPU thread); its attack success is printed next to the stored one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import print_table, save  # noqa: E402
from epic import EpicError  # noqa: E402
from epic.defenses.epic_plus import top_flags  # noqa: E402
from epic.evaluation import RunConfig, execute_run, read_results  # noqa: E402
from epic.selection import group_isolation  # noqa: E402


def round_flags(row: dict, workdir: str) -> tuple[dict, list[dict]]:
    """Re-run the cell ``row`` recording its rounds; (its summary, one record per round)."""
    config = {k: v for k, v in row["config"].items() if k != "attack"}
    defense = dict(config["defense"])
    defense["options"] = {**defense.get("options", {}), "record_proxies": True}
    config.update(defense=defense, out=workdir)
    summary, trainer, _ = execute_run(RunConfig.from_dict(config), resume=False)
    plus = trainer.callbacks[0]
    poison = trainer.poison_mask.cpu()
    rounds = []
    for i, rec in enumerate(plus.proxies):
        scores = group_isolation(rec["features"], rec["labels"], k=plus.k,
                                 spread=plus.spread).cpu()
        flagged = top_flags(scores, int(plus.fraction * len(scores)))  # as the round did
        trained = rec["active"].cpu()
        rounds.append({
            "round": i + 1, "epoch": plus.rounds[i]["epoch"],
            "poisons_flagged_trained": int((flagged & poison & trained).sum()),
            "poisons_flagged_dropped": int((flagged & poison & ~trained).sum()),
            "clean_flagged_trained": int((flagged & ~poison & trained).sum()),
            "clean_flagged_dropped": int((flagged & ~poison & ~trained).sum()),
            "poisons_dropped_before": int((poison & ~trained).sum()),
            "clean_dropped_before": int((~poison & ~trained).sum())})
    return summary, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="an epic bench folder")
    parser.add_argument("--defense", default="epic-plus", help="a defense label of the bench")
    parser.add_argument("--trials", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:
        rows = read_results(args.bench)
        cells = {r["trial"]: r for r in rows if r["defense"] == args.defense
                 and r["replicate"] == 0 and r["trial"] in args.trials}
        missing = sorted(set(args.trials) - set(cells))
        if missing:
            raise EpicError(f"{args.bench} has no '{args.defense}' cell for trial(s) {missing}; "
                            "check --defense and --trials against its results.jsonl")
        for row in cells.values():
            spec = row["config"]["defense"]
            if spec["name"] != "epic-plus" or spec.get("options", {}).get("score", "group") \
                    != "group":
                raise EpicError(f"'{args.defense}' is not epic-plus with its group score; "
                                "pass --defense with the label of such a row")
        results = []
        for trial in args.trials:
            with tempfile.TemporaryDirectory() as work:
                summary, rounds = round_flags(cells[trial], work)
            stored = cells[trial]["summary"]
            print(f"trial {trial}: {int(stored['poisons_total'])} poisons; stored run: success "
                  f"{stored['attack_success']}, {stored['poisons_dropped']} poisons dropped; "
                  f"re-run: {summary['attack_success']}, {summary['poisons_dropped']}")
            print_table(["round", "epoch", "poisons flagged (trained on)",
                         "poisons flagged (dropped)", "clean flagged (trained on)",
                         "clean flagged (dropped)", "poisons out before",
                         "clean out before"], [list(r.values()) for r in rounds])
            results.append({"trial": trial, "stored": stored, "rerun": summary,
                            "rounds": rounds})
    except EpicError as err:
        sys.exit(f"error: {err}")
    path = save("round_flags", {"trials": results, "args": vars(args)},
                args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
