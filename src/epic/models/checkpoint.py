"""Save a model with the recipe that rebuilds it, and load it back safely.

A model file holds the ``state_dict`` and the arguments of :func:`create_model` (name,
classes, channels, normalisation, family options) plus free-form metadata; it is loaded with
``torch.load(weights_only=True)``, so a file from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import EpicError
from .._io import atomic_write
from .._validation import check_file
from ._factory import create_model

__all__ = ["save_model", "load_model", "read_model_spec"]

_FORMAT = "epic-model"


def save_model(path: str | Path, model: nn.Module, spec: dict[str, Any],
               metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights with its ``create_model`` ``spec`` (name, num_classes, ...).

    ``spec`` must hold ``name`` and the keyword arguments that rebuild the model; ``metadata``
    (JSON-serialisable) records how it was trained.
    """
    if "name" not in spec:
        raise EpicError("model spec needs a 'name'; pass the create_model arguments")
    state = {"format": _FORMAT, "spec": json.dumps(spec), "metadata": json.dumps(metadata or {}),
             "state_dict": model.state_dict()}
    return atomic_write(path, lambda f: torch.save(state, f), binary=True)


def _read(path: str | Path) -> dict[str, Any]:
    path = check_file(path, "model checkpoint", "a model file written by `epic pretrain --out "
                      "PATH`", create="create one with `epic pretrain --out PATH`")
    not_ours = f"cannot read model file {path}: not a model written by `epic pretrain`"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, EOFError, RuntimeError (zip), KeyError, ...
        detail = _load_failure(path, err)
        raise EpicError(not_ours + (f" ({detail})" if detail else "")) from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        if isinstance(state, dict) and "optimizer" in state and "epoch" in state:
            raise EpicError(f"{not_ours} (it is a training run's resume checkpoint; pass the "
                            "model file that `epic pretrain --out PATH` wrote)")
        raise EpicError(f"{not_ours} (it holds no '{_FORMAT}' record)")
    return state


def _load_failure(path: Path, err: BaseException) -> str:
    """The useful part of why ``torch.load`` failed, on one line; never PyTorch's advice to
    load with ``weights_only=False`` (which could run code from the file)."""
    text = str(err)
    if isinstance(err, EOFError):
        return "the file is empty" if path.stat().st_size == 0 else "the file ends early"
    if "weights_only" in text:  # the safe unpickler refused it
        found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        return f"it holds a pickled {found.group(1)}" if found else ""
    if not isinstance(err, RuntimeError):  # e.g. a KeyError deep in the unpickler
        return ""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", line)
    line = line.split(". ")[0].rstrip(".")
    return ("the file is truncated or damaged: " + line) if "zip archive" in line else line


def read_model_spec(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``(spec, metadata)`` stored in a model file, without building the model."""
    state = _read(path)
    return json.loads(state["spec"]), json.loads(state["metadata"])


def load_model(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild and load a model saved by :func:`save_model`.

    ``overrides`` replace spec entries (e.g. ``num_classes`` for a new head); weights whose
    shapes no longer match (that head) are left at their fresh initialisation.
    """
    state = _read(path)
    spec = {**json.loads(state["spec"]), **overrides}
    name = spec.pop("name")
    model = create_model(name, **spec)
    own, saved = model.state_dict(), state["state_dict"]
    absent = [k for k in own if k not in saved]
    reshaped = [k for k in own if k in saved and saved[k].shape != own[k].shape]
    if absent or (reshaped and not overrides):
        raise EpicError(f"{path} does not fit model '{name}' (mismatched: "
                        f"{(absent + reshaped)[:3]}); rebuild it with `epic pretrain`")
    model.load_state_dict({k: v for k, v in saved.items() if k in own and k not in reshaped},
                          strict=False)
    return model
