"""Tables and plots from a benchmark's ``results.jsonl``.

One markdown table per attack (and victim): attack success with its binomial standard error,
clean accuracy with its spread, poisons and clean examples removed, wall time and its ratio to
undefended training; plus two PNGs: success against accuracy for every defense, and the
fraction of poisons dropped after each EPIC round.

When the folder holds a ``clean_control.json`` (victims trained without poisons: a bench
config's ``clean_seeds``, or ``tools/clean_control.py`` for an existing folder), targets that
such a clean victim already sends to the adversarial class are *clean-explained*: they leave
the robust hits, and a "net" success column leaves them out.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import EpicError
from .._io import atomic_write
from .bench import CLEAN_CONTROL, _target_key, read_results

__all__ = ["DefenseScore", "score", "markdown", "per_target", "read_clean_control",
           "write_report"]


@dataclass(frozen=True)
class DefenseScore:
    """One defense's aggregate over the trials of one attack and victim.

    ``robust`` counts the targets whose undefended attack hit with every victim seed
    (``replicates`` of them); ``robust_success`` is this defense's success on those targets,
    ``stopped`` how many of them it turned into misses and ``stopped_vs_random`` how many of
    those its matched random drop (a ``random-drop`` entry with ``match`` = this defense) did
    not also stop (``None`` without such a control). ``flips`` is the share of targets the
    undefended victim got right that this defense hands to the attacker. With a clean control,
    ``clean_explained`` counts the targets a victim trained without poisons already sends to
    the adversarial class (they are not robust hits) and ``net_success`` is the success on the
    other targets.
    """

    attack: str
    victim: str
    defense: str
    trials: int
    success: float
    success_se: float
    clean_acc: float
    clean_acc_std: float
    poisons_removed: float
    clean_removed: float
    seconds: float
    time_ratio: float | None
    replicates: int = 1
    robust: int = 0
    robust_success: float | None = None
    stopped: int = 0
    stopped_vs_random: int | None = None
    flips: float = 0.0
    clean_explained: int = 0
    net_success: float | None = None


# (victim, seed, trial, target index, adversarial class) -> clean victims predicting that
# class, of how many; victim None: a file from before the per-victim control, for every victim
CleanControl = dict[tuple[str | None, int, int, int, int], tuple[int, int]]


def read_clean_control(path: str | Path) -> CleanControl:
    """A ``clean_control.json`` (:func:`~epic.evaluation.clean_control`): per victim recipe and
    target, how many victims trained without poisons predict its adversarial class, out of
    how many."""
    data = json.loads(Path(path).read_text())
    return {(r.get("victim"), int(r.get("seed", 0)), int(r["trial"]), int(r["target_index"]),
             int(r["adv_label"])): (int(r["clean_adv"]), len(r["clean_predictions"]))
            for r in data["rows"]}


def _clean_of(r: dict[str, Any], clean: CleanControl | None) -> tuple[int, int]:
    """What the clean victims of this row's victim recipe predict for its target: (those
    predicting the adversarial class, all of them); (0, 0) when not controlled."""
    if not clean:
        return (0, 0)
    key = _target_key(r)
    return clean.get((r["victim"], *key)) or clean.get((None, *key), (0, 0))


def _explained(r: dict[str, Any], clean: CleanControl | None) -> bool:
    """Whether a clean victim already sends this row's target to the adversarial class."""
    return _clean_of(r, clean)[0] > 0


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with a cell that appears twice (e.g. folders concatenated twice) kept once,
    its first line (as `epic bench` reads a matched defense's count)."""
    seen: set[str] = set()
    out = []
    for r in rows:
        key = r.get("cell")
        if key is None or key not in seen:
            out.append(r)
            seen.add(key)
    return out


def _hit(summary: dict[str, Any]) -> bool:
    return bool(summary.get("attack_success"))


def score(rows: list[dict[str, Any]], baseline: str = "none",
          clean: CleanControl | None = None) -> list[DefenseScore]:
    """Aggregate result lines per (attack, victim, defense), in the order they first appear.

    Only each defense's first victim seed enters success and accuracy; the undefended
    victim's extra seeds (``replicate`` > 0) decide which hits are robust. ``clean`` (see
    :func:`read_clean_control`) takes clean-explained targets out of the robust hits.
    """
    rows = _unique(rows)
    explained = {(r["victim"], r["seed"], r["trial"]) for r in rows if _explained(r, clean)}
    controlled = bool(clean)
    groups: dict[tuple[str, str, str], dict[tuple[int, int], dict[str, Any]]] = \
        defaultdict(dict)
    seeds: dict[tuple[str, str], dict[tuple[int, int], dict[int, bool]]] = \
        defaultdict(lambda: defaultdict(dict))
    control: dict[tuple[str, str, str], str] = {}
    for r in rows:
        target = (r["seed"], r["trial"])
        if r["defense"] == baseline:
            seeds[r["attack"], r["victim"]][target][r.get("replicate", 0)] = _hit(r["summary"])
        if r.get("match"):
            control[r["attack"], r["victim"], r["match"]] = r["defense"]
        if r.get("replicate", 0) == 0:
            groups[r["attack"], r["victim"], r["defense"]][target] = r["summary"]
    base_time = {(a, v): statistics.fmean(s["wall_seconds"] for s in runs.values())
                 for (a, v, d), runs in groups.items() if d == baseline}
    out = []
    for (attack, victim, defense), by_target in groups.items():
        runs = list(by_target.values())
        n = len(runs)
        p = sum(_hit(s) for s in runs) / n
        accs = [float(s["clean_test_acc"]) for s in runs]
        poisons = sum(s["poisons_total"] for s in runs)
        clean_total = sum(s["train_examples"] - s["poisons_total"] for s in runs)
        seconds = statistics.fmean(s["wall_seconds"] for s in runs)
        ref = base_time.get((attack, victim))
        undefended = seeds.get((attack, victim), {})
        replicates = max((len(h) for h in undefended.values()), default=0)
        # robust: hit with every replicate the folder has (a target missing one is not)
        robust = [t for t, hits in undefended.items()
                  if len(hits) == replicates and all(hits.values()) and t in by_target
                  and (victim, *t) not in explained]
        kept = [t for t in by_target if (victim, *t) not in explained]
        stopped = [t for t in robust if not _hit(by_target[t])]
        ctrl = groups.get((attack, victim, control.get((attack, victim, defense), "")))
        verified = None if ctrl is None else sum(1 for t in stopped if t in ctrl
                                                 and _hit(ctrl[t]))
        misses = [t for t, hits in undefended.items()  # missed by the first victim seed
                  if hits.get(0) is False and t in by_target]
        out.append(DefenseScore(
            attack=attack, victim=victim, defense=defense, trials=n, success=p,
            success_se=math.sqrt(p * (1 - p) / n), clean_acc=statistics.fmean(accs),
            clean_acc_std=statistics.pstdev(accs) if n > 1 else 0.0,
            poisons_removed=sum(s["poisons_dropped"] for s in runs) / max(poisons, 1),
            clean_removed=sum(s["clean_dropped"] for s in runs) / max(clean_total, 1),
            seconds=seconds, time_ratio=seconds / ref if ref else None,
            replicates=replicates,
            robust=len(robust),
            robust_success=(sum(_hit(by_target[t]) for t in robust) / len(robust)
                            if robust else None),
            stopped=len(stopped), stopped_vs_random=verified,
            flips=(sum(_hit(by_target[t]) for t in misses) / len(misses) if misses else 0.0),
            clean_explained=n - len(kept),
            net_success=(sum(_hit(by_target[t]) for t in kept) / len(kept)
                         if controlled and kept else None)))
    return out


def markdown(scores: list[DefenseScore]) -> str:
    """One markdown table per (attack, victim)."""
    parts = []
    keys = list(dict.fromkeys((s.attack, s.victim) for s in scores))
    for attack, victim in keys:
        rows = [s for s in scores if (s.attack, s.victim) == (attack, victim)]
        reps = max(s.replicates for s in rows)
        first = next((s for s in rows if s.defense == "none"), rows[0])  # the undefended row
        robust = first.robust
        net = any(s.net_success is not None for s in rows)
        k = first.clean_explained
        note = (f" ({k} clean-explained target{'' if k == 1 else 's'}, which a victim "
                "trained without poisons already sends to the adversarial class, left out)"
                if net else "")
        lines = [f"### {attack} ({victim})", "",
                 f"Robust hits: {robust} targets hit by the undefended victim with all {reps} "
                 f"of its seeds{note}.", "",
                 "| defense | trials | attack success | "
                 + ("net of clean-explained | " if net else "")
                 + "on robust hits | stopped (not by random drop) | flips miss -> hit | "
                 "clean accuracy | poisons removed | clean removed | time (s) | "
                 "time / undefended |",
                 "|---|---|---|" + ("---|" if net else "") + "---|---|---|---|---|---|---|---|"]
        for s in rows:
            ratio = f"{s.time_ratio:.2f}x" if s.time_ratio is not None else "n/a"
            on_robust = "n/a" if s.robust_success is None else f"{s.robust_success:.0%}"
            verified = "n/a" if s.stopped_vs_random is None else str(s.stopped_vs_random)
            stopped = f"{s.stopped}/{s.robust} ({verified})"
            net_cell = ("" if not net else "n/a | " if s.net_success is None
                        else f"{s.net_success:.0%} | ")
            lines.append(f"| {s.defense} | {s.trials} | {s.success:.0%} ± {s.success_se:.0%} | "
                         f"{net_cell}{on_robust} | {stopped} | {s.flips:.0%} | "
                         f"{s.clean_acc:.2%} ± {s.clean_acc_std:.2%} | "
                         f"{s.poisons_removed:.0%} | {s.clean_removed:.2%} | "
                         f"{s.seconds:.1f} | {ratio} |")
        lines += ["", "Stopped: robust hits this defense turns into misses (in brackets, those "
                  "its matched random drop does not also stop; n/a: no matched control). "
                  "Flips: targets the undefended victim got right that this defense hands "
                  "to the attacker."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def per_target(rows: list[dict[str, Any]], clean: CleanControl | None = None) -> str:
    """One markdown table per (attack, victim): a row per target trial, a column per defense,
    each cell the outcome with the poisons and clean examples that defense dropped; with a
    clean control, a column of the clean victims that predict the adversarial class."""
    parts = []
    rows = _unique(rows)
    keys = list(dict.fromkeys((r["attack"], r["victim"]) for r in rows))
    for attack, victim in keys:
        mine = [r for r in rows if (r["attack"], r["victim"]) == (attack, victim)]
        defenses = list(dict.fromkeys(r["defense"] for r in mine))
        trials: dict[tuple[int, int], dict[str, dict[str, Any]]] = defaultdict(dict)
        undefended: dict[tuple[int, int], list[bool]] = defaultdict(list)
        for r in mine:
            if r["defense"] == "none":
                undefended[r["seed"], r["trial"]].append(_hit(r["summary"]))
            if r.get("replicate", 0) == 0:
                trials[r["seed"], r["trial"]][r["defense"]] = r["summary"]
        lines = [f"### {attack} ({victim}): per target", "",
                 "| seed/trial | target (class -> adversarial) | undefended seeds hit | "
                 + ("clean victims hit | " if clean else "") + " | ".join(defenses) + " |",
                 "|---|---|---|" + ("---|" if clean else "") + "---|" * len(defenses)]
        for (seed, trial), by in sorted(trials.items()):
            first = next(iter(by.values()))
            cells = []
            for d in defenses:
                s = by.get(d)
                if s is None:
                    cells.append("-")
                    continue
                cell = "HIT" if s.get("attack_success") else "miss"
                if s["poisons_dropped"] or s["clean_dropped"]:
                    cell += f" ({s['poisons_dropped']}/{s['poisons_total']}, {s['clean_dropped']})"
                cells.append(cell)
            hits = undefended.get((seed, trial), [])
            control = ""
            if clean:
                adv, total = _clean_of({**first, "victim": victim, "seed": seed,
                                        "trial": trial}, clean)
                control = f"{adv}/{total} | " if total else "- | "
            lines.append(f"| {seed}/{trial} | {first['target_index']} ({first['target_label']} -> "
                         f"{first['adv_label']}) | {sum(hits)}/{len(hits)} | {control}"
                         + " | ".join(cells) + " |")
        lines += ["", "Cells: outcome (poisons dropped / poisons, clean examples dropped)."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _plot_tradeoff(scores: list[DefenseScore], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((s.attack, s.victim) for s in scores))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (attack, victim) in zip(axes[0], keys, strict=True):
        for s in (s for s in scores if (s.attack, s.victim) == (attack, victim)):
            ax.errorbar(s.clean_acc, s.success, xerr=s.clean_acc_std, yerr=s.success_se,
                        fmt="o", capsize=3, label=s.defense)
        ax.set(xlabel="clean test accuracy", ylabel="attack success", title=f"{attack}",
               ylim=(-0.05, 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def _plot_rounds(rows: list[dict[str, Any]], path: Path) -> bool:
    """Mean fraction of poisons dropped after each selection round, per EPIC variant."""
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for e in r.get("rounds", []):
            if e.get("event") == "selection" and e.get("poisons_total"):
                label = f"{r['attack']} / {r['defense']}"
                curves[label][int(e["epoch"])].append(e["poisons_dropped"] / e["poisons_total"])
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_epoch in curves.items():
        epochs = sorted(by_epoch)
        ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker=".",
                label=label)
    ax.set(xlabel="epoch of the selection round", ylabel="poisons dropped (fraction)",
           ylim=(-0.05, 1.05), title="EPIC: poisons dropped per round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)
    return True


def write_report(results: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``tradeoff.png`` and ``rounds.png`` next to the results (or in
    ``out``); returns the paths and the scores."""
    rows = read_results(results)
    if not rows:
        raise EpicError(f"{results} holds no finished cells yet; run `epic bench` first")
    folder = Path(out) if out is not None else (Path(results) if Path(results).is_dir()
                                                 else Path(results).parent)
    control = folder / CLEAN_CONTROL
    if not control.exists() and Path(results).is_dir():
        control = Path(results) / CLEAN_CONTROL
    clean = read_clean_control(control) if control.exists() else None
    scores = score(rows, clean=clean)
    text = markdown(scores)
    full = text + "\n## Per target\n\n" + per_target(rows, clean)
    report = atomic_write(folder / "report.md", lambda f: f.write(full))
    paths = {"report": str(report), "tradeoff": str(folder / "tradeoff.png")}
    _plot_tradeoff(scores, folder / "tradeoff.png")
    if _plot_rounds(rows, folder / "rounds.png"):
        paths["rounds"] = str(folder / "rounds.png")
    return {"paths": paths, "scores": scores, "markdown": text}
