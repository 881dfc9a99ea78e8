"""The ``epic`` command line: a thin layer over the library's registries and runs.

Errors in the user's input print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train image classifiers that resist targeted data poisoning (EPIC).")


# Options shared by several commands, declared once.
DatasetOpt = Annotated[str, typer.Option(help="Dataset name (epic list datasets).")]
DataRootOpt = Annotated[Path | None, typer.Option(help="Folder with the dataset files.")]
DownloadOpt = Annotated[bool, typer.Option(help="Download the official files if absent.")]
ModelOpt = Annotated[str, typer.Option(help="Model name (epic list models).")]
WidthOpt = Annotated[int | None, typer.Option(help="Base width of ResNet/VGG models.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars.")]
# Training flags default to None: only those the user gives reach TrainConfig, whose own
# defaults (the paper's recipe) rule the rest.
EpochsOpt = Annotated[int | None, typer.Option(help="Training epochs.")]
BatchOpt = Annotated[int | None, typer.Option(help="Batch size.")]
LrOpt = Annotated[float | None, typer.Option(help="Initial learning rate.")]
AugmentOpt = Annotated[str | None, typer.Option(
    help="crop-flip, crop, flip or none (default: the dataset's).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for everything.")]
TrainDeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")]
TrainProgressOpt = Annotated[bool | None, typer.Option(help="Show progress bars.")]
AmpOpt = Annotated[str | None, typer.Option(
    help="Mixed precision on CUDA: bfloat16, float16 (with loss scaling) or off.")]


class Kind(str, Enum):
    models = "models"
    datasets = "datasets"
    defenses = "defenses"
    attacks = "attacks"


@app.command("list")
def list_cmd(kind: Annotated[Kind, typer.Argument(help="What to list.")],
             pattern: Annotated[str, typer.Argument(help="Shell-style filter.")] = "*") -> None:
    """List registered models, datasets, defenses or attacks."""
    if kind is Kind.models:
        from ..models import list_models as names
    elif kind is Kind.datasets:
        from ..data import list_datasets as names
    elif kind is Kind.attacks:
        from ..attacks import list_attacks as names
    else:
        from ..defenses import list_defenses as names
    found = names(pattern)
    if not found:
        from .._errors import EpicError
        raise EpicError(f"no {kind.value} match {pattern!r}; run `epic list {kind.value}` "
                        "to see them all")
    for name in found:
        typer.echo(name)


@app.command()
def train(
    dataset: DatasetOpt = "digits",
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    model: Annotated[str | None, typer.Option(
        help="Model name (epic list models; default convnet, or the --checkpoint's).")] = None,
    width: WidthOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    augment: AugmentOpt = None,
    defense: Annotated[str, typer.Option(help="Defense (epic list defenses).")] = "epic",
    option: Annotated[list[str] | None, typer.Option(
        help="Defense option KEY=VALUE (e.g. subset_fraction=0.2); repeatable. Unset options "
             "keep the library's defaults.")] = None,
    subset_fraction: Annotated[float | None, typer.Option(
        help="EPIC: medoid budget per class (default 0.1).")] = None,
    interval: Annotated[int | None, typer.Option(
        help="EPIC: rounds at epochs divisible by T (default 1).")] = None,
    warmup: Annotated[int | None, typer.Option(
        help="EPIC: no round before this epoch, K (default 1; epic-plus: 0 from a "
             "pretrained model).")] = None,
    until: Annotated[int | None, typer.Option(
        help="EPIC: last epoch with a round (default: the last lr decay).")] = None,
    cluster_threshold: Annotated[int | None, typer.Option(
        help="EPIC: drop clusters this small (default 1).")] = None,
    proxy: Annotated[str | None, typer.Option(
        help="EPIC gradient proxy: logits or last-layer (default logits).")] = None,
    proxy_pass: Annotated[str | None, typer.Option(
        help="EPIC: logits from an inference pass per round (separate), from the training "
             "steps of the epoch before it (training), or those steps' features through the "
             "current head (training-features). Default separate; epic-plus uses "
             "training-features for a pretrained model.")] = None,
    proxy_precision: Annotated[str | None, typer.Option(
        help="EPIC: arithmetic of the proxy pass, float32 or bfloat16 (default float32; "
             "bfloat16 needs a CPU with AVX512-BF16/AMX or a GPU to be faster).")] = None,
    poisons: Annotated[Path | None, typer.Option(
        help="Poison file (.npz) or poisoning-benchmark folder.")] = None,
    eps: Annotated[float | None, typer.Option(
        help="L-inf bound of the poisons in pixel units /255, for files that do not record "
             "it (poisoning-benchmark folders).")] = None,
    train_size: Annotated[int | None, typer.Option(
        help="Train on a seeded subset of this many examples (poisons always kept).")] = None,
    train_slice: Annotated[str | None, typer.Option(
        help="START:STOP: only these training examples (poison indices refer to them).")] = None,
    scenario: Annotated[str | None, typer.Option(
        help="scratch, transfer (frozen extractor, new linear head) or finetune.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Pretrained model file (epic pretrain); needed by transfer and finetune.")] = None,
    seed: SeedOpt = None,
    device: TrainDeviceOpt = None,
    amp: AmpOpt = None,
    stream: Annotated[bool, typer.Option(
        help="Read images from their files as needed instead of loading them into memory "
             "(tinyimagenet, imagefolder).")] = False,
    num_workers: Annotated[int | None, typer.Option(
        help="DataLoader processes decoding streamed images (0: in the training process).")]
    = None,
    image_size: Annotated[int | None, typer.Option(
        help="Resize and center-crop the images of tinyimagenet / imagefolder to this size.")]
    = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/train"),
    resume: Annotated[bool, typer.Option(help="Continue from OUT's checkpoint if any.")] = True,
    progress: TrainProgressOpt = None,
) -> None:
    """Train a model, optionally on poisoned data, with or without a defense.

    Training flags left unset keep the library's defaults (epic.training.TrainConfig).
    Writes OUT/config.yaml, OUT/metrics.jsonl, OUT/summary.json and OUT/checkpoint.pt.
    """
    from .._distributed import init_from_env, is_main
    from .._errors import EpicError
    from ..defenses import DefenseSpec
    from ..evaluation import RunConfig, run_training
    from ..training import TrainConfig

    init_from_env()  # under torchrun: one process per GPU, rank 0 prints
    _check_out(out, folder=True)
    options = _parse_options(option or [])
    epic_flags = {"subset_fraction": subset_fraction, "interval": interval, "warmup": warmup,
                  "until": until, "cluster_threshold": cluster_threshold, "proxy": proxy,
                  "proxy_pass": proxy_pass, "proxy_precision": proxy_precision}
    given = {k: v for k, v in epic_flags.items() if v is not None}
    if given and not defense.startswith("epic"):
        flag = "--" + next(iter(given)).replace("_", "-")
        raise EpicError(f"{flag} is an EPIC option; use it with --defense epic (or an epic-* "
                        "variant)" + ("" if defense == "none" else
                                      f", or pass --option KEY=VALUE to {defense}"))
    twice = sorted(set(given) & set(options))
    if twice:
        flag = "--" + twice[0].replace("_", "-")
        raise EpicError(f"{twice[0]} is given twice, by {flag} and by --option; keep one")
    options.update(given)
    if eps is not None and poisons is None:
        raise EpicError("--eps is the bound of the --poisons; give --poisons too, or leave "
                        "--eps out")
    if checkpoint is not None:
        if scenario not in ("transfer", "finetune"):
            raise EpicError("--checkpoint starts from a pretrained model: add --scenario "
                            "finetune (train all of it) or --scenario transfer (a new head on "
                            "its frozen features)")
        from .._validation import check_file
        from ..models import read_model_spec

        saved = read_model_spec(check_file(checkpoint, "--checkpoint", "a model file from "
                                           "`epic pretrain`"))[0].get("name")
        if model is not None and model != saved:
            raise EpicError(f"--model {model} differs from the --checkpoint's model {saved}; "
                            "leave --model out (the checkpoint fixes the architecture)")
        model = saved
    cfg = RunConfig(
        dataset=dataset, data_root=None if data_root is None else str(data_root),
        download=download, stream=stream, image_size=image_size, model=model or "convnet",
        width=width,
        defense=DefenseSpec(defense, options),
        poisons=None if poisons is None else str(poisons), eps=eps, train_size=train_size,
        out=str(out),
        train_slice=train_slice, checkpoint=None if checkpoint is None else str(checkpoint),
        train=TrainConfig.from_dict({  # None (unset) flags are dropped
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "augment": augment,
            "seed": seed, "device": device, "progress": progress, "scenario": scenario,
            "num_workers": num_workers, **_amp_options(amp)}),
    )
    summary = run_training(cfg, resume=resume)
    if is_main():
        _print_summary(summary, out)


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Model file to write (e.g. surrogate.pt).")],
    dataset: DatasetOpt = "digits",
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    model: ModelOpt = "convnet",
    width: WidthOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    augment: AugmentOpt = None,
    train_slice: Annotated[str | None, typer.Option(
        help="START:STOP: pretrain on these training examples only.")] = None,
    seed: SeedOpt = None,
    device: TrainDeviceOpt = None,
    progress: TrainProgressOpt = None,
) -> None:
    """Train a clean surrogate / feature extractor and save it with its config.

    Training flags left unset keep the library's defaults (epic.training.TrainConfig).
    The run's files (config.yaml, metrics.jsonl, checkpoint.pt to resume) go to OUT.run/.
    """
    from .._distributed import is_main
    from ..evaluation import RunConfig
    from ..evaluation import pretrain as run_pretrain
    from ..training import TrainConfig

    _check_out(out, folder=False)
    _check_out(Path(str(out) + ".run"), folder=True, flag="--out (its OUT.run/ folder)")
    cfg = RunConfig(dataset=dataset, data_root=None if data_root is None else str(data_root),
                    download=download, model=model, width=width, train_slice=train_slice,
                    out=str(out) + ".run",
                    train=TrainConfig.from_dict({  # None (unset) flags are dropped
                        "epochs": epochs, "batch_size": batch_size, "lr": lr,
                        "augment": augment, "seed": seed, "device": device,
                        "progress": progress}))
    summary = run_pretrain(cfg, out)
    if is_main():
        typer.echo(f"clean test accuracy: {summary['clean_test_acc']:.4f}")
        typer.echo(f"model: {out}")


def _parse_options(pairs: list[str]) -> dict:
    from .._errors import EpicError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EpicError(f"--option must look like KEY=VALUE, got {pair!r}")
        import yaml

        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        options[key.replace("-", "_")] = parsed
    return options


@app.command()
def craft(
    attack: Annotated[str, typer.Option(help="Attack name (epic list attacks).")],
    checkpoint: Annotated[list[Path], typer.Option(
        help="Surrogate model file(s) from epic pretrain; repeat for an ensemble.")],
    out: Annotated[Path, typer.Option(help="Output folder (one trial-NNN/ per target).")],
    dataset: DatasetOpt = "digits",
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    train_slice: Annotated[str | None, typer.Option(
        help="START:STOP: the victim's training examples (poison indices refer to them).")] = None,
    target_index: Annotated[int | None, typer.Option(help="Test image to attack.")] = None,
    adv_class: Annotated[int | None, typer.Option(help="Class it should be taken for.")] = None,
    targets: Annotated[int, typer.Option(help="Random targets (when no --target-index).")] = 1,
    budget: Annotated[float, typer.Option(help="Poisons as a fraction of the train set.")] = 0.01,
    num_poisons: Annotated[int | None, typer.Option(help="Exact number of poisons.")] = None,
    eps: Annotated[float, typer.Option(help="L-inf bound in pixel units /255.")] = 16.0,
    option: Annotated[list[str] | None, typer.Option(
        help="Attack hyperparameter KEY=VALUE (e.g. steps=250); repeatable.")] = None,
    benchmark_format: Annotated[bool, typer.Option(
        help="Also write the poisoning benchmark's folder format.")] = False,
    seed: Annotated[int, typer.Option(help="Seed (targets and crafting).")] = 0,
    device: DeviceOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Craft poisons against one target (--target-index, --adv-class) or N random ones."""
    from .._errors import EpicError
    from ..attacks import AttackSpec, ThreatModel
    from ..evaluation import CraftConfig, craft_poisons

    if (target_index is None) != (adv_class is None):
        raise EpicError("give --target-index and --adv-class together, or neither (random "
                        "targets)")
    if target_index is None and targets < 1:
        raise EpicError(f"--targets must be >= 1, got {targets}")
    _check_out(out, folder=True)
    pairs = [(target_index, adv_class)] if target_index is not None else []
    spec = AttackSpec(attack, ThreatModel(budget=budget, eps=eps, num_poisons=num_poisons),
                      _parse_options(option or []))
    cfg = CraftConfig(attack=spec, checkpoints=[str(p) for p in checkpoint], dataset=dataset,
                      data_root=None if data_root is None else str(data_root),
                      download=download, train_slice=train_slice, targets=pairs,
                      num_targets=targets,
                      formats=("epic", "benchmark") if benchmark_format else ("epic",),
                      seed=seed, device=device, out=str(out), progress=progress)
    for record in craft_poisons(cfg):
        typer.echo(f"trial {record['trial']}: target {record['target_index']} "
                   f"(class {record['target_label']} -> {record['adv_label']}): {record['file']}")


def _print_summary(summary: dict, out: Path) -> None:
    acc = summary.get("clean_test_acc")
    typer.echo(f"clean test accuracy: {acc:.4f}" if acc is not None else "clean test accuracy: -")
    if summary.get("poisons_total"):
        outcome = "SUCCEEDED" if summary["attack_success"] else "failed"
        typer.echo(f"target prediction: {summary['target_pred']} (adversarial label "
                   f"{summary['adv_label']}) -> attack {outcome}")
        typer.echo(f"poisons dropped: {summary['poisons_dropped']}/{summary['poisons_total']}")
    typer.echo(f"clean examples dropped: {summary['clean_dropped']}")
    typer.echo(f"wall time: {summary['wall_seconds']:.1f} s")
    typer.echo(f"results: {out}/summary.json")


def _amp_options(amp: str | None) -> dict[str, Any]:
    """``--amp`` as TrainConfig fields (none when the flag is unset)."""
    if amp is None:
        return {}
    if amp == "off":
        return {"amp": False}
    from .._validation import check_choice
    from ..training.config import AMP_DTYPES

    return {"amp": True, "amp_dtype": check_choice("--amp", amp, (*AMP_DTYPES, "off"))}


@app.command()
def demo(out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
         attack: Annotated[str, typer.Option(help="Attack to demonstrate.")] = "bullseye-polytope",
         targets: Annotated[int, typer.Option(help="Random targets.")] = 8,
         quick: Annotated[bool, typer.Option(
             help="A reduced run (2 targets, few steps) for tests and smoke checks.")] = False,
         seed: Annotated[int, typer.Option(help="Seed.")] = 0) -> None:
    """Attack and defend on scikit-learn's digits: undefended vs EPIC vs EPIC-plus, per target.

    Pretrains a surrogate, crafts poisons against random targets, trains the victim's linear
    head on the poisoned data undefended, with the paper's EPIC, with EPIC-plus and with a
    random drop of as many examples as EPIC-plus dropped (the control), prints a table and
    writes OUT/demo.png.
    """
    from dataclasses import replace

    from .._errors import EpicError
    from ..evaluation.demo import DemoConfig, run_demo

    if targets < 1:
        raise EpicError(f"--targets must be >= 1, got {targets}")
    _check_out(out, folder=True)
    cfg = DemoConfig(out=str(out), targets=targets, seed=seed)
    cfg.attack = replace(cfg.attack, name=attack)  # the demo's threat model and steps
    if quick:
        cfg.targets = 2
        cfg.surrogate = replace(cfg.surrogate, epochs=4)
        cfg.victim = replace(cfg.victim, epochs=5)
        cfg.attack = replace(cfg.attack, options={"steps": 20})
    result = run_demo(cfg)
    typer.echo(f"\nwrote {out}/demo.json and {out}/demo.png in {result['seconds']:.0f} s")


@app.command()
def bench(config: Annotated[Path, typer.Argument(help="Benchmark config (YAML), e.g. "
                                                   "configs/cpu-mnist.yaml.")],
          out: Annotated[Path | None, typer.Option(
              help="Results folder (default: the config's out, or runs/bench/NAME).")] = None,
          trials: Annotated[int | None, typer.Option(
              help="Override the config's number of targets per attack.")] = None,
          defense: Annotated[list[str] | None, typer.Option(
              "--defense", help="Run only the defenses with this label (repeatable).")] = None,
          attack: Annotated[list[str] | None, typer.Option(
              "--attack", help="Run only the attacks with this label (repeatable).")] = None,
          progress: ProgressOpt = True) -> None:
    """Score every defense against every attack on the same poisons (resumable).

    Each cell (attack x victim x defense x seed x target) is one training run and one line of
    OUT/results.jsonl; cells already there are skipped, so rerunning continues a stopped
    benchmark. Then writes the report (as `epic report` does).
    """
    from .._distributed import init_from_env, is_main
    from ..evaluation.bench import load_bench_config, run_bench
    from ..evaluation.report import write_report

    init_from_env()  # under torchrun each cell trains on every process
    cfg = load_bench_config(config)
    if trials is not None:
        if trials < 1:
            from .._errors import EpicError

            raise EpicError(f"--trials must be >= 1, got {trials}")
        cfg.trials = trials
    if attack:
        cfg.attacks = _only_labels(cfg.attacks, attack, "--attack")
    if defense:
        cfg.defenses = _only_labels(cfg.defenses, defense, "--defense")
        for d in cfg.defenses:
            if "match" in d and d["match"] not in defense:
                from .._errors import EpicError

                raise EpicError(f"defense {d['label']!r} matches {d['match']!r}; "
                                f"add --defense {d['match']}")
    target = out or Path(cfg.out or f"runs/bench/{cfg.name}")
    _check_out(target, folder=True)
    rows = run_bench(cfg, target, progress=progress and is_main())
    if not is_main():
        return
    result = write_report(target)
    typer.echo(result["markdown"])
    typer.echo(f"{len(rows)} cells in {target}/results.jsonl; report: {result['paths']['report']}")


def _only_labels(entries: list[dict[str, Any]], wanted: list[str], option: str
                 ) -> list[dict[str, Any]]:
    """The config entries whose label is in ``wanted``; an unknown label is an error."""
    from .._errors import EpicError

    known = [e["label"] for e in entries]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise EpicError(f"{option} {unknown[0]!r} is not in the config; its labels are {known}")
    return [e for e in entries if e["label"] in wanted]


@app.command()
def report(results: Annotated[Path, typer.Argument(
               help="A folder written by `epic bench` or its results.jsonl.")],
           out: Annotated[Path | None, typer.Option(
               help="Where to write report.md and the PNGs (default: beside the results).")]
           = None) -> None:
    """Markdown tables (success ± standard error, accuracy, removals, time) and PNG plots."""
    from ..evaluation.report import write_report

    if out is not None:
        _check_out(out, folder=True)
    result = write_report(results, out)
    typer.echo(result["markdown"])
    typer.echo("wrote " + ", ".join(result["paths"].values()))


def _check_out(path: Path, *, folder: bool, flag: str = "--out") -> None:
    """Refuse, before any work, an output ``path`` that cannot be written: a file where a
    folder is expected or the reverse, a file among its parents, or a parent not writable."""
    import os

    from .._errors import EpicError

    if path.exists() and folder and not path.is_dir():
        raise EpicError(f"{flag} {path} is a file; give a folder")
    if path.exists() and not folder and path.is_dir():
        raise EpicError(f"{flag} {path} is a folder; give a file path, e.g. {path / 'model.pt'}")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise EpicError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EpicError(f"{flag} {path}: cannot write in {parent}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``epic`` script: one-line errors, exit 2 on bad input.

    Typer handles usage errors itself (exit 2); errors found in the input's content raise
    :class:`~epic.EpicError`, which is printed as one line here, never as a traceback.
    """
    from .._distributed import shutdown
    from .._errors import EpicError

    try:
        app(args=argv, prog_name="epic")
    except EpicError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted; run the same command again to resume", err=True)
        return 130
    except OSError as err:  # a file the system refused (permissions, a full disk, ...)
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        typer.echo(f"error: {err.strerror or type(err).__name__}"
                   + (f": {where}" if where else ""), err=True)
        return 2
    finally:
        shutdown()  # leave the process group of a torchrun launch, if any
    return 0


if __name__ == "__main__":
    sys.exit(main())
