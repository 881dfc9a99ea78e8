"""The benchmark harness: every defense against every attack, on the same poisons.

``epic bench CONFIG.yaml`` expands a config into cells (attack x victim x defense x seed x
target trial). Poisons are crafted once per (attack, seed, trial) and reused by every defense;
each cell is one training run in its own folder and one line in ``results.jsonl``. A cell whose
line exists is skipped, and an interrupted cell resumes from its checkpoint, so a benchmark
stopped by a crash or Ctrl-C continues where it was.

Config keys (see ``configs/*.yaml``)::

    name: cpu-mnist
    dataset: mnist            # registered dataset; data_root defaults to the shared copy
    train_slice: "0:10000"    # the victim's training images
    trials: 5                 # targets per attack and seed
    seeds: [0]
    replicates: 3             # undefended victims per target, each with its own seed
    clean_seeds: 3            # victims trained without poisons: which targets they already
                              # send to the adversarial class (clean_control.json; default 0)
    surrogate: {model: convnet, epochs: 6, train_slice: "0:10000", lr: 0.05}  # or {checkpoint: F}
                              # (any training key; ensemble: N crafts on N surrogates)
    victim: {model: convnet, epochs: 6, lr: 0.05}       # or victims: [{label: ..., ...}, ...]
    attacks: [{name: gradient-matching, budget: 0.01, eps: 16, options: {steps: 250}}]
    defenses: [none, {name: epic, label: epic-0.1, options: {subset_fraction: 0.1}}]
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from .. import __version__
from .. import _distributed as dist
from .._errors import EpicError
from .._io import write_json, write_jsonl, write_yaml
from .._validation import check_file
from ..attacks import AttackSpec, ThreatModel
from ..data import PoisonSet, dataset_info, load_split
from ..defenses import DefenseSpec
from ..training import TrainConfig
from .craft import CraftConfig, choose_targets, craft_poisons, craft_seed
from .run import RunConfig, execute_run, pretrain, run_training, slice_bounds

__all__ = ["BenchConfig", "Cell", "TRAIN_KEYS", "clean_control", "default_data_root",
           "load_bench_config", "read_results", "run_bench", "surrogate_paths"]

RESULTS = "results.jsonl"
# A victim's training keys are TrainConfig's fields; the bench sets seed and progress itself.
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name not in ("seed", "progress"))


def default_data_root(dataset: str) -> str | None:
    """Where tests and benchmarks find a dataset locally: ``$EPIC_CACHE/cifar10`` (built by
    ``make data``) for CIFAR-10, ``$EPIC_SHARED_DATA/<name>`` for the others."""
    if dataset == "digits":
        return None
    if dataset == "cifar10":
        return str(Path(os.environ.get("EPIC_CACHE", ".cache")) / "cifar10")
    return str(Path(os.environ.get("EPIC_SHARED_DATA", "../shared/data")) / dataset)


@dataclass
class BenchConfig:
    """A validated benchmark config (see the module docstring for the YAML layout)."""

    name: str
    dataset: str
    attacks: list[dict[str, Any]]
    defenses: list[dict[str, Any]]
    victims: list[dict[str, Any]]
    surrogate: dict[str, Any]
    data_root: str | None = None
    train_slice: str | None = None
    trials: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    replicates: int = 1
    clean_seeds: int = 0
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)


@dataclass(frozen=True)
class Cell:
    """One training run of the grid; ``replicate`` > 0 for the undefended victim's extra
    seeds (is a hit robust to the victim's training run?)."""

    attack: str
    victim: str
    defense: str
    seed: int
    trial: int
    replicate: int = 0

    @property
    def key(self) -> str:
        key = f"{self.attack}/{self.victim}/{self.defense}/seed{self.seed}/trial{self.trial:03d}"
        return key + (f"/rep{self.replicate}" if self.replicate else "")

    @property
    def train_seed(self) -> int:
        """The victim's training seed: never the surrogate's (``seed``), distinct for every
        (seed, trial, replicate) below 999,900 trials (``1000 * (seed + 1)`` gave seed 0's
        trial 100 and seed 1's trial 0 one seed); unchanged for seed 0."""
        return 10_000_000 * self.seed + 1000 + 10 * self.trial + self.replicate


_TOP_KEYS = {"name", "dataset", "data_root", "train_slice", "trials", "seeds", "replicates",
             "clean_seeds", "surrogate", "victim", "victims", "attacks", "defenses", "out"}
# an attack entry: the AttackSpec's flat keys, plus the bench's label and defense options
_ATTACK_KEYS = {"name", "options", *(f.name for f in fields(ThreatModel)), "label",
                "defense_options"}
_DEFENSE_KEYS = {"name", "label", "options", "match"}
_SURROGATE_KEYS = {"checkpoint", "model", "width", "train_slice", *TRAIN_KEYS, "seed",
                   "ensemble"}
_VICTIM_KEYS = {"label", "model", "width", "train_size", "defense_options", *TRAIN_KEYS}


def _check_keys(where: str, given: dict[str, Any], valid: set[str]) -> None:
    unknown = sorted(set(given) - valid)
    if unknown:
        raise EpicError(f"unknown key {unknown[0]!r} in {where}; valid keys are "
                        f"{sorted(valid)}")


def _as_entries(where: str, value: Any, valid: set[str]) -> list[dict[str, Any]]:
    """A list of names or dicts, each becoming a dict with ``name`` and a unique ``label``."""
    if not isinstance(value, list) or not value:
        raise EpicError(f"{where} must be a non-empty list")
    entries, labels = [], set()
    for k, item in enumerate(value):
        entry = {"name": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise EpicError(f"{where}[{k}] must be a name or a mapping with a 'name'")
        _check_keys(f"{where}[{k}]", entry, valid)
        entry = {"options": {}, **entry}
        entry["label"] = str(entry.get("label") or entry["name"])
        if entry["label"] in labels:
            raise EpicError(f"{where}[{k}]: label {entry['label']!r} is used twice; give each "
                            "entry its own 'label'")
        labels.add(entry["label"])
        if not isinstance(entry["options"], dict):
            raise EpicError(f"{where}[{k}].options must be a mapping")
        entries.append(entry)
    return entries


def _yaml_problem(err: yaml.YAMLError) -> str:
    """yaml's problem and where (1-based line and column), on one line."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if not problem:
        problem = (str(err).strip().splitlines() or [type(err).__name__])[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(err, "context", None)
    cmark = getattr(err, "context_mark", None)
    if context and cmark is not None:
        context += f" started at line {cmark.line + 1}, column {cmark.column + 1}"
    return f"{problem}{where}" + (f" ({context})" if context else "")


def load_bench_config(source: str | Path | dict[str, Any]) -> BenchConfig:
    """Read and validate a benchmark config; errors name the offending key."""
    from ..data import list_datasets
    from ..defenses import list_defenses

    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        path = check_file(source, "bench config",
                          "a YAML config file such as configs/cpu-mnist.yaml")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise EpicError(f"bench config {path} is not a UTF-8 text file; pass a YAML file "
                            "such as configs/cpu-mnist.yaml") from None
        except yaml.YAMLError as err:
            raise EpicError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise EpicError("a bench config must be a mapping of keys to values")
    _check_keys("the bench config", raw, _TOP_KEYS)
    for key in ("dataset", "attacks", "defenses", "surrogate"):
        if key not in raw:
            raise EpicError(f"the bench config lacks the required key {key!r}")
    if raw["dataset"] not in list_datasets():
        raise EpicError(f"unknown dataset {raw['dataset']!r}; choose from {list_datasets()}")
    if "victim" in raw and "victims" in raw:
        raise EpicError("give either 'victim' or 'victims', not both")
    victims_raw = raw.get("victims", [raw.get("victim", {})])
    if not isinstance(victims_raw, list) or not all(isinstance(v, dict) for v in victims_raw):
        raise EpicError("'victims' must be a list of mappings (or give one 'victim' mapping)")
    victims = []
    for k, v in enumerate(victims_raw):
        _check_keys(f"victims[{k}]", v, _VICTIM_KEYS)
        victims.append({"label": str(v.get("label", f"victim{k}" if len(victims_raw) > 1
                                            else "victim")), **v})
    if len({v["label"] for v in victims}) != len(victims):
        raise EpicError("victims need distinct 'label's")
    attacks = _as_entries("attacks", raw["attacks"], _ATTACK_KEYS)
    for k, a in enumerate(attacks):
        try:
            _attack_spec(a)  # the name and the threat model, checked before anything runs
        except EpicError as err:
            raise EpicError(f"attacks[{k}]: {err}") from None
    defenses = _as_entries("defenses", raw["defenses"], _DEFENSE_KEYS)
    seen: set[str] = set()
    for k, d in enumerate(defenses):
        if d["name"] not in list_defenses():
            raise EpicError(f"defenses[{k}]: unknown defense {d['name']!r}; choose from "
                            f"{list_defenses()}")
        if "match" in d and d["match"] not in seen:
            raise EpicError(f"defenses[{k}].match: {d['match']!r} must be the label of a "
                            "defense listed before it")
        seen.add(d["label"])
    surrogate = raw["surrogate"]
    if not isinstance(surrogate, dict):
        raise EpicError("'surrogate' must be a mapping (model, epochs, ...) or {checkpoint: F}")
    _check_keys("surrogate", surrogate, _SURROGATE_KEYS)
    trials = raw.get("trials", 5)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise EpicError(f"trials must be an integer >= 1, got {trials!r}")
    ensemble = surrogate.get("ensemble", 1)
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or not 1 <= ensemble <= 8:
        raise EpicError(f"surrogate.ensemble must be an integer from 1 to 8, got {ensemble!r}")
    replicates = raw.get("replicates", 1)
    if isinstance(replicates, bool) or not isinstance(replicates, int) \
            or not 1 <= replicates <= 10:
        raise EpicError(f"replicates must be an integer from 1 to 10, got {replicates!r}")
    clean_seeds = raw.get("clean_seeds", 0)
    if isinstance(clean_seeds, bool) or not isinstance(clean_seeds, int) \
            or not 0 <= clean_seeds <= 10:
        raise EpicError(f"clean_seeds must be an integer from 0 to 10, got {clean_seeds!r}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise EpicError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    # everything a cell builds, built now: a bad value fails before anything is trained or written
    for where, text in (("", raw.get("train_slice")),
                        ("surrogate: ", surrogate.get("train_slice"))):
        if text is not None:
            try:
                slice_bounds(text, None)
            except EpicError as err:
                raise EpicError(f"{where}{err}") from None
    _check_training("surrogate", surrogate, surrogate=True)
    for k, v in enumerate(victims):
        _check_training(f"victims[{k}] ({v['label']})", v)
    for k, a in enumerate(attacks):
        try:
            _attack_spec(a).create()  # the attack's options
        except (TypeError, ValueError) as err:  # EpicError is a ValueError
            raise EpicError(f"attacks[{k}] ({a['label']}): {err}") from None
    _check_defenses(defenses, victims, attacks)
    return BenchConfig(name=str(raw.get("name", "bench")), dataset=raw["dataset"],
                       data_root=raw.get("data_root"), train_slice=raw.get("train_slice"),
                       trials=trials, seeds=seeds, replicates=replicates,
                       clean_seeds=clean_seeds,
                       surrogate=surrogate, victims=victims,
                       attacks=attacks, defenses=defenses, out=raw.get("out"))


def _check_training(where: str, entry: dict[str, Any], *, surrogate: bool = False) -> None:
    """Build the training config and check the model name of a victim or surrogate entry."""
    from ..models import list_models

    if surrogate and "checkpoint" in entry:
        return
    model = entry.get("model", "convnet")
    if model not in list_models():
        raise EpicError(f"{where}: unknown model {model!r}; choose from {list_models()}")
    try:
        TrainConfig.from_dict({**({"epochs": 10, "lr": 0.1, "batch_size": 128} if surrogate
                                  else {}),
                               **{k: entry[k] for k in TRAIN_KEYS if k in entry},
                               "seed": 0, "progress": False})
    except (TypeError, ValueError) as err:  # EpicError is a ValueError
        raise EpicError(f"{where}: {err}") from None
    for key in ("width", "train_size"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise EpicError(f"{where}: {key} must be an integer >= 1, got {value!r}")


def _defense_options(where: str, entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An entry's ``defense_options`` (defense name -> options), checked."""
    from ..defenses import list_defenses

    value = entry.get("defense_options") or {}
    if not isinstance(value, dict):
        raise EpicError(f"{where}.defense_options must be a mapping of defense names to "
                        f"options, got {value!r}")
    for name, options in value.items():
        if name not in list_defenses():
            raise EpicError(f"{where}.defense_options: unknown defense {name!r}; choose from "
                            f"{list_defenses()}")
        if not isinstance(options, dict):
            raise EpicError(f"{where}.defense_options.{name} must be a mapping of options, "
                            f"got {options!r}")
    return value


def _check_defenses(defenses: list[dict[str, Any]], victims: list[dict[str, Any]],
                    attacks: list[dict[str, Any]]) -> None:
    """Build every defense entry with its options, alone and merged with each victim's and
    attack's ``defense_options`` for it (as a cell merges them); errors name the entries."""
    per_victim = [(f"victims[{k}] ({v['label']})", _defense_options(f"victims[{k}]", v))
                  for k, v in enumerate(victims)]
    per_attack = [(f"attacks[{k}] ({a['label']})", _defense_options(f"attacks[{k}]", a))
                  for k, a in enumerate(attacks)]
    for k, d in enumerate(defenses):
        name, where = d["name"], f"defenses[{k}] ({d['label']})"
        # a matched entry gets its count at run time (the matched defense's removals)
        count = {"count": 0} if "match" in d else {}
        combos = [([], d["options"])] + [
            ([w for w, extra in (victim, attack) if name in extra],
             {**victim[1].get(name, {}), **attack[1].get(name, {}), **d["options"]})
            for victim in per_victim for attack in per_attack]
        for owners, options in combos:
            if owners or options is d["options"]:
                try:
                    DefenseSpec(name, {**options, **count}).create(seed=0)
                except (TypeError, ValueError) as err:  # EpicError is a ValueError
                    via = f" with the defense_options.{name} of {' and '.join(owners)}" \
                        if owners else ""
                    raise EpicError(f"{where}{via}: {err}") from None
        for (owner, extra), victim in zip(per_victim, victims, strict=True):
            options = {**extra.get(name, {}), **d["options"], **count}
            train = TrainConfig.from_dict({k: victim[k] for k in TRAIN_KEYS if k in victim})
            try:  # what the victim's scenario makes of the options
                DefenseSpec(name, options).create(seed=0).check_config(train)
            except (TypeError, ValueError) as err:
                raise EpicError(f"{where} for {owner}: {err}") from None


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The result lines of a benchmark folder or ``results.jsonl`` file."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        raise EpicError(f"no results at {path}; pass a folder written by `epic bench`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EpicError(f"{path} is not UTF-8 JSON lines; the file is damaged or not written "
                        "by `epic bench`") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise EpicError(f"{path} line {n} is not JSON; the file is damaged") from None
        problem = _row_problem(row)
        if problem:
            raise EpicError(f"{path} line {n} is not a result row of `epic bench` ({problem}); "
                            "the file is damaged or not written by `epic bench`")
        rows.append(row)
    return rows


# what every result row has held since the first bench (and what `epic report` reads)
_ROW_KEYS = ("cell", "attack", "victim", "defense", "seed", "trial", "defense_name",
             "target_index", "adv_label", "summary")
_SUMMARY_KEYS = ("clean_test_acc", "train_examples", "poisons_total", "poisons_dropped",
                 "clean_dropped", "wall_seconds", "target_index", "target_label", "adv_label")


def _row_problem(row: Any) -> str | None:
    """What keeps a parsed line from being a result row, or ``None``."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    missing = [k for k in _ROW_KEYS if k not in row]
    if not missing and not isinstance(row["summary"], dict):
        return "its 'summary' is not an object"
    if not missing:
        missing = [f"summary.{k}" for k in _SUMMARY_KEYS if k not in row["summary"]]
    return f"no {', '.join(missing)}" if missing else None


def _environment() -> dict[str, Any]:
    return {"epic": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def _surrogate(cfg: BenchConfig, out: Path, root: str | None, seed: int) -> str:
    """The first surrogate of ``seed``: the model a transfer or fine-tuning victim starts from."""
    return _surrogates(cfg, out, root, seed)[0]


def surrogate_paths(cfg: BenchConfig, out: str | Path, seed: int) -> list[Path]:
    """Where the surrogates of bench seed ``seed`` live: the config's ``checkpoint``, or the
    ``ensemble`` files under ``out/surrogates`` (whether trained yet or not)."""
    if "checkpoint" in cfg.surrogate:
        return [Path(cfg.surrogate["checkpoint"])]
    return [Path(out) / "surrogates" / (f"seed{seed}.pt" if k == 0 else f"seed{seed}-{k}.pt")
            for k in range(cfg.surrogate.get("ensemble", 1))]


def _surrogates(cfg: BenchConfig, out: Path, root: str | None, seed: int) -> list[str]:
    """The surrogates the attacker crafts on, trained if missing: ``ensemble`` models (default
    1) with the same recipe, the k-th with seed ``seed + 100 k`` (never a victim's, see
    :class:`Cell`)."""
    sur = cfg.surrogate
    paths = surrogate_paths(cfg, out, seed)
    if "checkpoint" in sur:
        return [str(_existing_checkpoint(paths[0]))]
    for member, path in enumerate(paths):
        if not path.exists():
            # the surrogate takes any training key (the victim's recipe, e.g. milestones: [])
            train = TrainConfig.from_dict({"epochs": 10, "lr": 0.1, "batch_size": 128,
                                           **{k: sur[k] for k in TRAIN_KEYS if k in sur},
                                           "seed": sur.get("seed", seed) + 100 * member,
                                           "progress": False})
            pretrain(RunConfig(dataset=cfg.dataset, data_root=root,
                               model=sur.get("model", "convnet"), width=sur.get("width"),
                               train_slice=sur.get("train_slice"), out=str(path) + ".run",
                               train=train), path)
    return [str(path) for path in paths]


def _existing_checkpoint(path: Path) -> Path:
    """The config's ``surrogate.checkpoint``, if it is a file."""
    return check_file(path, "surrogate.checkpoint", "a model file written by `epic pretrain`",
                      create="create it with `epic pretrain`")


def _stored_threat(entry: Any) -> ThreatModel | None:
    """The threat model recorded with stored poisons or results: a bench ``attacks:`` entry,
    an :meth:`AttackSpec.to_dict` or an older crafting config (flat ``eps``, ``budget``, ...);
    ``None`` when unreadable (nothing to compare)."""
    if not isinstance(entry, dict):
        return None
    try:
        return ThreatModel(**{k: entry[k] for k in ("budget", "eps", "num_poisons",
                                                    "poison_class") if entry.get(k) is not None})
    except (EpicError, TypeError):
        return None


def _threat_change(stored: ThreatModel, wanted: ThreatModel) -> str | None:
    """How ``stored`` differs from ``wanted`` in what the poisons are ("eps 128, the config
    says 64"), or ``None``."""
    def size(t: ThreatModel) -> str:
        return f"num_poisons {t.num_poisons}" if t.num_poisons is not None \
            else f"budget {t.budget:g}"

    changes = []
    if float(stored.eps) != float(wanted.eps):
        changes.append((f"eps {stored.eps:g}", f"eps {wanted.eps:g}"))
    if size(stored) != size(wanted):
        changes.append((size(stored), size(wanted)))
    if stored.poison_class != wanted.poison_class:
        changes.append((f"poison_class {stored.poison_class}",
                        f"poison_class {wanted.poison_class}"))
    if not changes:
        return None
    return (", ".join(old for old, _ in changes) + ", but the config says "
            + ", ".join(new for _, new in changes))


def _cell_options(victim: dict[str, Any], attack: dict[str, Any],
                  defense: dict[str, Any]) -> dict[str, Any]:
    """A cell's defense options: the victim's, then the attack's ``defense_options`` for the
    defense (e.g. the authors' EPIC schedule), then the entry's own (before the harness adds
    a matched drop's ``count`` and ``epoch``)."""
    name = defense["name"]
    return {**victim.get("defense_options", {}).get(name, {}),
            **attack.get("defense_options", {}).get(name, {}), **defense["options"]}


def _check_stored_defenses(cfg: BenchConfig, out: Path, rows: list[dict[str, Any]]) -> None:
    """Refuse to extend a folder whose rows of a defense label were run with other options
    than the config now gives that label: the report would pool them under one name."""
    by_label = {d["label"]: d for d in cfg.defenses}
    victims = {v["label"]: v for v in cfg.victims}
    attacks = {a["label"]: a for a in cfg.attacks}
    for row in rows:
        defense = by_label.get(row["defense"])
        stored = (row.get("config") or {}).get("defense")
        victim, attack = victims.get(row["victim"]), attacks.get(row["attack"])
        if None in (defense, victim, attack) or not isinstance(stored, dict):
            continue  # an entry the config no longer has, or a row of an older layout
        wanted = {"name": defense["name"], "options": _cell_options(victim, attack, defense)}
        options = dict(stored.get("options") or {})
        if "match" in defense:  # what the harness sets on a matched drop
            options.pop("count", None)
            if "epoch" not in wanted["options"]:
                options.pop("epoch", None)
        have = {"name": stored.get("name"), "options": options}
        if have != wanted:
            raise EpicError(
                f"defense {row['defense']!r}: the results in {out / RESULTS} were run as "
                f"{_spec_text(have)}, but the config now gives {_spec_text(wanted)}; give a new "
                f"output folder (--out) or a new label to the changed defense, or delete the "
                f"lines of defense {row['defense']!r} from {out / RESULTS}")


def _spec_text(spec: dict[str, Any]) -> str:
    options = ", ".join(f"{k}={v!r}" for k, v in sorted(spec["options"].items()))
    return f"{spec['name']}({options})"


def _check_stored(cfg: BenchConfig, out: Path, rows: list[dict[str, Any]]) -> None:
    """Refuse to reuse an attack's stored results or poisons (``out/poisons/LABEL``) made
    under another threat model (eps, budget or number of poisons, poison class) than the
    config's, or a defense label's results run with other options than the config now gives
    it; new trials, seeds, victims and defenses may extend a folder."""
    _check_stored_defenses(cfg, out, rows)
    for attack in cfg.attacks:
        label, wanted = attack["label"], _attack_spec(attack).threat
        folder = out / "poisons" / label
        fix = "give a new output folder (--out)"
        for row in rows:
            if row["attack"] != label:
                continue
            stored = _stored_threat((row.get("config") or {}).get("attack"))
            change = None if stored is None else _threat_change(stored, wanted)
            if change:
                raise EpicError(
                    f"attack {label!r}: the results in {out / RESULTS} were made with {change}; "
                    f"{fix}, or delete the lines of attack {label!r} from it and the folder "
                    f"{folder}")
        for seed_dir in sorted(folder.glob("seed*")) if folder.is_dir() else []:
            listed: set[str] = set()
            targets = seed_dir / "targets.json"
            if targets.is_file():
                try:
                    recorded = json.loads(targets.read_text())
                except (OSError, UnicodeDecodeError, ValueError):
                    recorded = {}
                config = recorded.get("config") if isinstance(recorded, dict) else None
                if isinstance(config, dict):
                    # AttackSpec.to_dict, or (older files) the threat model beside the name
                    entry = config["attack"] if isinstance(config.get("attack"), dict) \
                        else config
                    stored = _stored_threat(entry)
                    change = None if stored is None else _threat_change(stored, wanted)
                    if change:
                        raise EpicError(f"attack {label!r}: the poisons in {seed_dir} were "
                                        f"crafted with {change}; {fix}, or delete {folder} to "
                                        "craft them again")
                    listed = {Path(str(t.get("file", ""))).parent.name
                              for t in recorded.get("trials", []) if isinstance(t, dict)}
            for path in sorted(seed_dir.glob("trial-*/poisons.npz")):
                if path.parent.name in listed:
                    continue  # covered by targets.json
                poisons = PoisonSet.load(path)
                stored = ThreatModel(eps=poisons.eps if poisons.eps is not None else wanted.eps,
                                     num_poisons=len(poisons) if wanted.num_poisons else None,
                                     budget=wanted.budget, poison_class=wanted.poison_class)
                change = _threat_change(stored, wanted)
                if change:
                    raise EpicError(f"attack {label!r}: the poisons in {path.parent} were "
                                    f"crafted with {change}; {fix}, or delete {folder} to "
                                    "craft them again")


def _attack_spec(entry: dict[str, Any]) -> AttackSpec:
    """The :class:`AttackSpec` of an ``attacks:`` entry (its ``label`` and
    ``defense_options`` are the bench's, not the attack's)."""
    return AttackSpec.parse({k: v for k, v in entry.items()
                             if k not in ("label", "defense_options")})


def _victims_augmentation(cfg: BenchConfig) -> str | None:
    """The training augmentation every victim shares (what crafting should follow), or
    ``None`` (the dataset's default) when they differ."""
    default = dataset_info(cfg.dataset).augmentation
    kinds = {v.get("augment") or default for v in cfg.victims}
    return kinds.pop() if len(kinds) == 1 else None


def _victim_run(cfg: BenchConfig, victim: dict[str, Any], name: str, options: dict[str, Any],
                poisons: str, surrogate: str, root: str | None, seed: int,
                out: Path) -> RunConfig:
    """A victim's run of defense ``name`` with its cell's ``options``."""
    train = TrainConfig.from_dict({**{k: victim[k] for k in TRAIN_KEYS if k in victim},
                                   "seed": seed, "progress": False})
    return RunConfig(dataset=cfg.dataset, data_root=root, model=victim.get("model", "convnet"),
                     width=victim.get("width"), defense=DefenseSpec(name, options),
                     poisons=poisons, train_slice=cfg.train_slice,
                     checkpoint=surrogate if train.pretrained else None,
                     train_size=victim.get("train_size"), out=str(out), train=train)


def run_bench(cfg: BenchConfig, out: str | Path | None = None, *,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run every missing cell of ``cfg``; returns all result lines (old and new)."""
    out = Path(out or cfg.out or f"runs/bench/{cfg.name}")
    root = cfg.data_root or default_data_root(cfg.dataset)
    # what is stored must fit the config before anything is (over)written
    results_path = out / RESULTS
    rows = read_results(results_path) if results_path.exists() else []
    _check_stored(cfg, out, rows)
    if "checkpoint" in cfg.surrogate:
        _existing_checkpoint(Path(cfg.surrogate["checkpoint"]))
    # the loaders' fix would be a download; digits ships with scikit-learn and reads no folder
    if root is not None and cfg.dataset != "digits" and not Path(root).exists():
        built = " (`make data` builds the CIFAR-10 copies in .cache)" \
            if cfg.dataset == "cifar10" else ""
        raise EpicError(f"no {cfg.dataset} data at {root}{built}: put the files there or point "
                        "the config's data_root at them; `epic bench` does not download")
    test = load_split(cfg.dataset, root, train=False)
    out.mkdir(parents=True, exist_ok=True)
    main = dist.is_main()  # under torchrun only rank 0 writes the harness's files
    if main:
        write_yaml(out / "config.yaml", {**cfg.to_dict(), "data_root": root, "out": str(out)})
    done = {r["cell"] for r in rows}
    env = _environment()

    cells = [Cell(a["label"], v["label"], d["label"], s, t, r) for s in cfg.seeds
             for a in cfg.attacks for t in range(cfg.trials) for v in cfg.victims
             for d in cfg.defenses
             for r in range(cfg.replicates if d["name"] == "none" else 1)]
    todo = [c for c in cells if c.key not in done]
    by_label = {d["label"]: d for d in cfg.defenses}
    attacks = {a["label"]: a for a in cfg.attacks}
    victims = {v["label"]: v for v in cfg.victims}
    trials: dict[tuple[str, int], list[dict[str, Any]]] = {}
    augmentation = _victims_augmentation(cfg)  # what crafting follows
    bar = tqdm(todo, desc=f"bench {cfg.name}", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.key)
        attack = attacks[cell.attack]
        if (cell.attack, cell.seed) not in trials:
            surrogates = _surrogates(cfg, out, root, cell.seed)
            pairs = choose_targets(test, cfg.trials, cell.seed)
            trials[cell.attack, cell.seed] = craft_poisons(CraftConfig(
                attack=_attack_spec(attack), checkpoints=surrogates, dataset=cfg.dataset,
                data_root=root, train_slice=cfg.train_slice, targets=pairs, seed=cell.seed,
                out=str(out / "poisons" / cell.attack / f"seed{cell.seed}"), progress=False,
                augmentation=augmentation))
        trial = trials[cell.attack, cell.seed][cell.trial]
        defense = by_label[cell.defense]
        options = _cell_options(victims[cell.victim], attack, defense)
        if "match" in defense:  # e.g. random-drop removes as many examples as EPIC did
            ref = Cell(cell.attack, cell.victim, defense["match"], cell.seed, cell.trial).key
            matched = next(r for r in rows if r["cell"] == ref)
            options["count"] = matched["summary"]["poisons_dropped"] + \
                matched["summary"]["clean_dropped"]
            first = _first_drop_epoch(matched)
            if first is not None and "epoch" not in options:  # no later than the defense
                options["epoch"] = first
        run_dir = out / "runs" / cell.key
        run_cfg = _victim_run(cfg, victims[cell.victim], defense["name"], options,
                              trial["file"], _surrogate(cfg, out, root, cell.seed), root,
                              cell.train_seed, run_dir)
        summary = run_training(run_cfg)
        rounds = [e for e in _events(run_dir) if e.get("event") in ("selection", "filter")]
        rows.append({"cell": cell.key, **cell.__dict__, "attack_name": attack["name"],
                     "defense_name": defense["name"], "match": defense.get("match"),
                     "target_index": trial["target_index"],
                     "adv_label": trial["adv_label"], "summary": summary, "rounds": rounds,
                     "config": {**run_cfg.to_dict(), "attack": attack},
                     "seeds": {"bench": cell.seed, "train": run_cfg.train.seed,
                               "craft": craft_seed(cell.seed, cell.trial)},
                     "env": env, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if main:
            write_jsonl(results_path, rows)
    wanted = _victim_targets(rows)
    if cfg.clean_seeds and wanted:  # a run of other defenses only (--defense X) has no targets
        path = out / CLEAN_CONTROL
        have = json.loads(path.read_text()) if path.exists() else {}
        victims = {w[0] for w in wanted}
        only = next(iter(victims)) if len(victims) == 1 else None
        if have.get("seeds") != _clean_train_seeds(cfg.clean_seeds) or \
                _control_keys(have, only) != set(wanted):
            control = clean_control(rows, cfg.clean_seeds, out / "clean")
            if main:
                write_json(path, control)
    return rows


def _first_drop_epoch(row: dict[str, Any]) -> int | None:
    """The 0-based epoch at whose start a result row's defense first dropped examples (its
    rounds record 1-based epochs), or ``None``: a matched random drop then drops as many at
    that epoch, so the examples it removes are trained on no longer than the defense's."""
    epochs = [int(r["epoch"]) - 1 for r in row.get("rounds") or []
              if r.get("dropped_this_round", 0) > 0 and "epoch" in r]
    return min(epochs) if epochs else None


CLEAN_CONTROL = "clean_control.json"
_CLEAN_SEED0 = 7000  # clean victims train with seeds 7000, 7001, ...: no cell below trial 600


def _clean_train_seeds(n: int) -> list[int]:
    return [_CLEAN_SEED0 + s for s in range(n)]


def _target_key(r: dict[str, Any]) -> tuple[int, int, int, int]:
    return (int(r["seed"]), int(r["trial"]), int(r["target_index"]), int(r["adv_label"]))


def _targets(rows: list[dict[str, Any]]) -> list[tuple[int, int, int, int]]:
    """(bench seed, trial, target index, adversarial class) of every undefended cell."""
    return sorted({_target_key(r) for r in rows if r["defense_name"] == "none"})


def _victim_targets(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(victim, bench seed, trial, target index, adversarial class) of every undefended
    cell."""
    return sorted({(r["victim"], *_target_key(r)) for r in rows if r["defense_name"] == "none"})


def clean_control(rows: list[dict[str, Any]], seeds: int, out: str | Path) -> dict[str, Any]:
    """Train each undefended victim's recipe without poisons ``seeds`` times and record, for
    every target of ``rows``, what those clean victims predict.

    A target that a clean victim already sends to the adversarial class (*clean-explained*)
    is no evidence of the attack, and no defense can stop it; ``epic report`` leaves such
    targets out of the robust hits of that victim (see
    :func:`~epic.evaluation.report.read_clean_control`). Each victim label's recipe is that
    of its first undefended cell (with ``poisons=None``): a bench with two victim recipes
    (e.g. 40 and 200 epochs) has a clean control for each. Targets share the clean training
    split, so one run per victim and seed covers them all; attacks share the targets of a
    bench seed, so a row per (attack, victim, target) repeats the predictions beside that
    attack's undefended hits. Every process of a ``torchrun`` trains (as for cells); the
    result is the same on each.
    """
    none = [r for r in rows if r["defense_name"] == "none"]
    if not none:
        raise EpicError("the clean control needs an undefended ('none') cell in the results")
    hits: dict[tuple[str, str, int, int], list[bool]] = {}
    for r in none:
        hits.setdefault((r["attack"], r["victim"], r["seed"], r["trial"]), []).append(
            bool(r["summary"].get("attack_success")))
    first: dict[str, dict[str, Any]] = {}
    for r in none:
        first.setdefault(r["victim"], r)
    out_rows, accs = [], {}
    for victim, row in first.items():
        base = RunConfig.from_dict({k: v for k, v in row["config"].items() if k != "attack"})
        targets = _targets([r for r in none if r["victim"] == victim])
        folder = Path(out) / victim if len(first) > 1 else Path(out)
        preds, accs[victim] = [], []
        for seed in _clean_train_seeds(seeds):
            run = replace(base, poisons=None, defense=None, out=str(folder / f"seed{seed}"),
                          train=replace(base.train, seed=seed, progress=False))
            summary, trainer, _ = execute_run(run, resume=False)
            images = trainer.test[0]
            if not isinstance(images, torch.Tensor):
                raise EpicError("the clean control needs the test split in memory "
                                "(not streamed)")
            index = torch.tensor([t[2] for t in targets], device=images.device)
            logits, _ = trainer.predict(images=images.index_select(0, index))
            preds.append(logits.argmax(1).tolist())
            accs[victim].append(summary["clean_test_acc"])
        for attack in dict.fromkeys(r["attack"] for r in none if r["victim"] == victim):
            for k, (seed, trial, index, adv) in enumerate(targets):
                h = hits.get((attack, victim, seed, trial))
                if h is None:
                    continue  # a target this attack's undefended cells have not reached
                p = [run_preds[k] for run_preds in preds]
                out_rows.append({"attack": attack, "victim": victim, "seed": seed,
                                 "trial": trial, "target_index": index, "adv_label": adv,
                                 "clean_predictions": p, "clean_adv": sum(x == adv for x in p),
                                 "undefended_hits": sum(h), "undefended_runs": len(h)})
    return {"benchmark": "clean_control", "seeds": _clean_train_seeds(seeds),
            "clean_test_acc": accs, "rows": out_rows}


def _control_keys(control: dict[str, Any], victim: str | None) -> set[tuple[Any, ...]]:
    """(victim, seed, trial, target index, adversarial class) of a stored clean control's
    rows; a file from before the per-victim control (no ``victim``) counts as ``victim``'s
    (the bench's only victim, or ``None``)."""
    return {(r.get("victim", victim), *_target_key(r)) for r in control.get("rows", [])}


def _events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
