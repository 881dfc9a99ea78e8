"""The attack-and-defend demo on scikit-learn's bundled digits (no download, CPU, minutes).

1. Pretrain a small ConvNet on the digits training split: the surrogate and the victim's
   frozen feature extractor (the poisoning benchmark's white-box transfer setting).
2. For each of several random targets (a test image and a wrong class), craft poisons with the
   chosen attack on training images of that wrong class.
3. Train the victim's new linear head per target undefended, with the paper's EPIC, with an
   EPIC variant (``epic-plus`` by default) and with a random drop of as many examples as the
   variant dropped (the control that tells removing poisons from training on less data), and
   score attack success (the target takes the wrong class), clean accuracy and drops.
   The head is trained to fit its data (lr 1, no weight decay, 300 epochs): a linear head's
   logits on the target are the mean of its logits on the bullseye poisons, so the attack
   wins exactly when the head fits the poisons, which a regularised head on these well
   separated features does not (1/8 hits at lr 0.01, weight decay 5e-4, 20 epochs). EPIC
   selects every epoch after one warm-up epoch until the last learning-rate decay.
4. Print a table and write ``demo.png``: the first EPIC round's gradient proxies of one
   target's poison class in two dimensions, poisons and dropped examples marked, and the
   per-target outcome.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from .._errors import EpicError
from .._io import write_json
from ..attacks import AttackSpec, ThreatModel
from ..defenses import DEFENSES, DefenseSpec
from ..training import TrainConfig
from .craft import CraftConfig, choose_targets, craft_poisons
from .run import RunConfig, execute_run, pretrain

__all__ = ["DemoConfig", "run_demo"]


def _surrogate_recipe() -> TrainConfig:
    # lr 0.05 diverged for one seed in six (test accuracy 0.83-0.99); 0.02 reached 0.989-0.996
    return TrainConfig(epochs=15, batch_size=64, lr=0.02, progress=False)


def _victim_recipe() -> TrainConfig:
    # The victim's new linear head on the surrogate's frozen features, trained to fit its data.
    return TrainConfig(epochs=300, batch_size=64, lr=1.0, weight_decay=0.0,
                       scenario="transfer", progress=False)


def _epic_spec() -> DefenseSpec:
    # Selection every epoch from epoch 1 up to and including the last learning-rate decay
    # (the paper's rule; T=1 in transfer). ``until: 9`` is the authors' transfer script
    # (epochs 1-9), which stopped fewer attacks in `configs/cpu-digits.yaml`.
    return DefenseSpec("epic", {"subset_fraction": 0.1, "warmup": 1, "interval": 1})


def _variant_spec() -> DefenseSpec:
    # Ours, with its defaults (a pretrained extractor: it drops at the first flag).
    return DefenseSpec("epic-plus")


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the defaults are what ``make demo`` runs), made of the
    pieces a run is made of.

    Args:
        out: output folder.
        attack: the attack; default bullseye polytope, 13 poisons (1% of the 1,347 training
            images), eps 128 (8x8 digits with 17 grey levels: at 64 the poisons do not work),
            1000 steps. A name or a mapping becomes an :class:`~epic.attacks.AttackSpec`.
        targets: number of random targets.
        surrogate: training recipe of the surrogate ConvNet (the victim's feature extractor).
        victim: training recipe of the victim's new linear head (``scenario="transfer"``).
        defense: the paper's EPIC, compared with undefended training.
        variant: an EPIC variant (a defense named ``epic-*``) run next to it, with a random drop
            of as many examples as the variant dropped in each run; ``None`` runs neither.
        seed: seeds the targets, the crafting and both training recipes (it replaces their
            ``seed``).
        progress: show the crafting's progress bars.
        threads: intra-op threads while the demo runs (restored after). The models are tiny,
            so one thread is as fast on an idle machine, far faster on a busy one, and gives
            the same numbers on every machine (float sums differ with the thread count).
    """

    out: str = "runs/demo"
    attack: AttackSpec = field(default_factory=lambda: AttackSpec(
        "bullseye-polytope", ThreatModel(eps=128.0, num_poisons=13), {"steps": 1000}))
    targets: int = 8
    surrogate: TrainConfig = field(default_factory=_surrogate_recipe)
    victim: TrainConfig = field(default_factory=_victim_recipe)
    defense: DefenseSpec = field(default_factory=_epic_spec)
    variant: DefenseSpec | None = field(default_factory=_variant_spec)
    seed: int = 0
    progress: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        self.attack = AttackSpec.parse(self.attack)
        self.defense = DefenseSpec.parse(self.defense)
        if self.defense.name != "epic":
            raise EpicError(f"the demo compares undefended training with EPIC; defense must "
                            f"be an 'epic' spec, got {self.defense.name!r}")
        if self.variant is not None:
            self.variant = DefenseSpec.parse(self.variant)
            if not self.variant.name.startswith("epic-"):
                raise EpicError(f"the demo's variant must be an EPIC variant (a defense named "
                                f"'epic-*'), got {self.variant.name!r}")
        for name in ("surrogate", "victim"):
            recipe = getattr(self, name)
            if not isinstance(recipe, TrainConfig):
                setattr(self, name, TrainConfig.from_dict(recipe))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``demo.json``: each piece by its own ``to_dict``."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in data.items()}

    def columns(self) -> list[tuple[str, str]]:
        """(key in a row of ``demo.json``, title) of every training run per target."""
        columns = [("none", "undefended"),
                   ("epic", f"EPIC-{_option(self.defense, 'subset_fraction'):g}")]
        if self.variant is not None:
            columns += [(self.variant.name, "EPIC" + self.variant.name[4:]),
                        ("random-drop", "random drop")]
        return columns


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``out/demo.json``) the table's rows and totals."""
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg)
    finally:
        torch.set_num_threads(previous)


def _run_demo(cfg: DemoConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    surrogate = out / "surrogate.pt"
    if not surrogate.exists():
        pretrain(RunConfig(dataset="digits", model="convnet", out=str(out / "surrogate.run"),
                           train=replace(cfg.surrogate, seed=cfg.seed)), surrogate)
    head = replace(cfg.victim, seed=cfg.seed)
    from ..data import load_split

    test = load_split("digits", None, train=False)
    pairs = choose_targets(test, cfg.targets, cfg.seed)
    trials = craft_poisons(CraftConfig(
        attack=cfg.attack, checkpoints=[str(surrogate)], dataset="digits", targets=pairs,
        seed=cfg.seed, out=str(out / "poisons"), progress=cfg.progress))

    rows: list[dict[str, Any]] = []
    first_round: dict[str, Any] | None = None
    for trial in trials:
        row: dict[str, Any] = {"target": trial["target_index"], "true": trial["target_label"],
                               "adv": trial["adv_label"]}
        epic = DefenseSpec(cfg.defense.name,
                           {**cfg.defense.options, "record_proxies": first_round is None})
        runs = [("none", DefenseSpec("none")), ("epic", epic)]
        if cfg.variant is not None:
            runs.append((cfg.variant.name, cfg.variant))
        for key, spec in runs:
            summary, trainer = _train(cfg, trial, surrogate, head, key, spec)
            row[key] = summary
            if key == "epic" and first_round is None and trainer.callbacks[0].proxies:
                first_round = {"proxies": trainer.callbacks[0].proxies[0],
                               "poison_mask": trainer.poison_mask, "adv": trial["adv_label"]}
        if cfg.variant is not None:  # the control: as many examples, chosen at random
            ref = row[cfg.variant.name]
            control = DefenseSpec("random-drop", {
                "count": ref["poisons_dropped"] + ref["clean_dropped"], "seed": cfg.seed})
            row["random-drop"], _ = _train(cfg, trial, surrogate, head, "random-drop", control)
        rows.append(row)

    totals = _totals(rows, cfg)
    result = {"config": cfg.to_dict(), "rows": rows, "totals": totals,
              "seconds": time.perf_counter() - t_start}
    write_json(out / "demo.json", result)
    _print_table(rows, totals, cfg)
    _plot(out / "demo.png", rows, first_round, cfg.columns())
    return result


_SCORES = ("attack_success", "clean_test_acc", "poisons_dropped", "poisons_total",
           "clean_dropped", "wall_seconds")


def _train(cfg: DemoConfig, trial: dict[str, Any], surrogate: Path, head: TrainConfig,
           key: str, spec: DefenseSpec) -> tuple[dict[str, Any], Any]:
    """One victim run on a trial's poisons; the summary's scores and the trainer."""
    run_cfg = RunConfig(dataset="digits", checkpoint=str(surrogate), defense=spec,
                        poisons=trial["file"], train=head,
                        out=str(Path(cfg.out) / f"trial-{trial['trial']:03d}-{key}"))
    summary, trainer, _ = execute_run(run_cfg, resume=False)
    return {k: summary[k] for k in _SCORES}, trainer


def _totals(rows: list[dict[str, Any]], cfg: DemoConfig) -> dict[str, Any]:
    totals = {}
    for defense, _ in cfg.columns():
        runs = [r[defense] for r in rows]
        totals[defense] = {
            "attack_success": sum(r["attack_success"] for r in runs) / len(runs),
            "clean_test_acc": sum(r["clean_test_acc"] for r in runs) / len(runs),
            "poisons_dropped": sum(r["poisons_dropped"] for r in runs),
            "poisons_total": sum(r["poisons_total"] for r in runs),
            "clean_dropped": sum(r["clean_dropped"] for r in runs) / len(runs),
            "seconds": sum(r["wall_seconds"] for r in runs) / len(runs),
        }
    return totals


def _option(spec: DefenseSpec, key: str) -> Any:
    """The value of a defense option: the spec's, else the defense's default."""
    if key in spec.options:
        return spec.options[key]
    return inspect.signature(DEFENSES.get(spec.name)).parameters[key].default


def _print_table(rows: list[dict[str, Any]], totals: dict[str, Any], cfg: DemoConfig) -> None:
    head, until = cfg.victim, _option(cfg.defense, "until")
    columns = cfg.columns()
    print(f"\n{cfg.attack.name}, {rows[0]['epic']['poisons_total']} poisons per "
          f"target, eps {cfg.attack.threat.eps:g}/255, transfer learning on digits (linear "
          f"head: {head.epochs} epochs, lr {head.lr:g}, weight decay {head.weight_decay:g}); "
          f"{columns[1][1]}: selection every epoch from epoch 1 until "
          + ("the last learning-rate decay" if until is None else f"epoch {until}")
          + (f"; {columns[2][1]} with its defaults; random drop: as many examples as "
             f"{columns[2][1]} dropped, chosen at random" if cfg.variant is not None else ""))
    print("each column: attack outcome, clean accuracy, poisons dropped, clean images dropped")
    width = 24
    print(f"{'target':>6} {'class':>8} | " + " | ".join(f"{t[:width]:<{width}}"
                                                      for _, t in columns).rstrip())

    def cell(r: dict[str, Any], outcome: str, dropped: str) -> str:
        return f"{outcome:>4} {r['clean_test_acc']:.3f} {dropped}"[:width].ljust(width)

    for r in rows:
        cells = [cell(r[key], "HIT" if r[key]["attack_success"] else "miss",
                      "" if key == "none" else f"{r[key]['poisons_dropped']:>3}/"
                      f"{r[key]['poisons_total']:<3} {r[key]['clean_dropped']:>5}")
                 for key, _ in columns]
        print(f"{r['target']:>6} {r['true']:>3} -> {r['adv']:<1} | " + " | ".join(cells).rstrip())
    cells = [cell(totals[key], f"{totals[key]['attack_success']:.0%}",
                  "" if key == "none" else f"{totals[key]['poisons_dropped']:>3}/"
                  f"{totals[key]['poisons_total']:<3} {totals[key]['clean_dropped']:>5.1f}")
             for key, _ in columns]
    print(f"{'all':>15} | " + " | ".join(cells).rstrip())
    print("attack success = share of targets classified as the attacker's class (all: clean "
          "images dropped per run); seconds per training run: "
          + ", ".join(f"{title} {totals[key]['seconds']:.1f}" for key, title in columns))


def _plot(path: Path, rows: list[dict[str, Any]], first_round: dict[str, Any] | None,
          columns: list[tuple[str, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    if first_round is not None:
        # What EPIC saw in its first round: each example of the poisons' class by the size of
        # its gradient proxy (log scale: most clean examples are fit, so theirs is tiny), in
        # four groups, with what EPIC dropped.
        rec = first_round["proxies"]
        cls = rec["labels"] == first_round["adv"]
        norm = rec["vectors"][cls].norm(dim=1).clamp(min=1e-6).numpy()
        poison = first_round["poison_mask"][rec["indices"][cls]].numpy()
        dropped = (~rec["keep"][cls]).numpy()
        groups = [("clean, kept", ~poison & ~dropped, "0.55"),
                  ("clean, dropped", ~poison & dropped, "tab:orange"),
                  ("poison, kept", poison & ~dropped, "tab:red"),
                  ("poison, dropped", poison & dropped, "tab:green")]
        jitter = torch.rand(len(norm), generator=torch.Generator().manual_seed(0)).numpy()
        for k, (_, mask, colour) in enumerate(groups):
            ax.scatter(k + 0.6 * (jitter[mask] - 0.5), norm[mask], s=14, c=colour, alpha=0.7)
        ax.set_xticks(range(4), [f"{name}\n({int(mask.sum())})" for name, mask, _ in groups],
                      fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("|softmax - onehot| (log scale, floor 1e-6)")
        ax.set_title(f"class {first_round['adv']} in EPIC's first round")
    # Outcome per target: a cell per (defense, target), red for a hit, green for a miss.
    ax = axes[1]
    names = [(title, key) for key, title in columns]
    grid = [[int(r[key]["attack_success"]) for r in rows] for _, key in names]
    ax.imshow(grid, cmap=matplotlib.colors.ListedColormap(["#8fd18f", "#e8827a"]), vmin=0,
              vmax=1, aspect="auto")
    for y, row in enumerate(grid):
        for x, hit in enumerate(row):
            ax.text(x, y, "HIT" if hit else "miss", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{r['target']}\n{r['true']}->{r['adv']}" for r in rows],
                  fontsize=7)
    ax.set_yticks(range(len(names)), [name for name, _ in names])
    ax.set_title("attack outcome per target (class -> attacker's)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    plt.close(fig)
