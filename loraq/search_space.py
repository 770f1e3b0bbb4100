"""The hyper-parameters a sweep tunes in each cell, and how a user overrides them.

A search space maps a parameter to a list (categorical), a ``{"low", "high", "log"}`` range
(float) or a single value (fixed). ``alpha_factor`` is LoRA alpha divided by the rank, so one
space fits every rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Union

from .train import OPTIMIZERS

DEFAULT_SEARCH_SPACE: Dict[str, Any] = {
    "optimizer": ["adam", "adamw", "sgd"],
    "lr": {"low": 1e-4, "high": 3e-2, "log": True},
    "batch_size": [32, 64, 128],
    "alpha_factor": [0.5, 1.0, 2.0, 4.0],
    "weight_decay": 0.0,
}


def _check_value(name: str, v) -> None:
    if name == "optimizer":
        if v not in OPTIMIZERS:
            raise ValueError(f"search space: optimizer {v!r} is not one of {OPTIMIZERS}")
    elif name == "batch_size":
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"search space: batch_size values must be integers >= 1, got {v!r}")
    elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
            or (v == 0 and name != "weight_decay"):
        raise ValueError(f"search space: {name} values must be {'>= 0' if name == 'weight_decay' else '> 0'}, got {v!r}")


def parse_search_space(spec: Union[None, str, Path, Dict[str, Any]] = None) -> Dict[str, Any]:
    """The default space updated by ``spec``: a dict, a JSON string, or a path to a JSON file.

    Raises ``ValueError`` for an unknown parameter or an impossible value (an empty list,
    ``low > high``, a log range from 0, a negative learning rate, an unknown optimizer).
    """
    if spec is None or spec == "":
        override: Dict[str, Any] = {}
    elif isinstance(spec, dict):
        override = spec
    else:
        text = str(spec)
        if Path(text).is_file():
            text = Path(text).read_text()
        elif text.lstrip()[:1] not in ("{", "[") and (text.endswith(".json") or "/" in text):
            raise ValueError(f"search space file {text!r} does not exist (give a JSON object or a JSON file)")
        try:
            override = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"search space must be JSON (or a JSON file), got {str(spec)[:80]!r}: {e}") from None
        if not isinstance(override, dict):
            raise ValueError(f"search space must be a JSON object, got {type(override).__name__}")
    unknown = sorted(set(override) - set(DEFAULT_SEARCH_SPACE))
    if unknown:
        raise ValueError(f"search space: unknown parameters {unknown}; known: {sorted(DEFAULT_SEARCH_SPACE)}")
    space = {**DEFAULT_SEARCH_SPACE, **override}
    for name, dom in space.items():
        if isinstance(dom, list):
            if not dom:
                raise ValueError(f"search space: {name} has an empty list of choices")
            for v in dom:
                _check_value(name, v)
        elif isinstance(dom, dict):
            if name in ("optimizer", "batch_size"):
                raise ValueError(f"search space: {name} takes a list of choices or one value, not a range")
            if set(dom) - {"low", "high", "log"} or not {"low", "high"} <= set(dom):
                raise ValueError(f"search space: a range for {name} needs 'low' and 'high' (and optionally 'log'), "
                                 f"got {sorted(dom)}")
            _check_value(name, dom["low"])
            _check_value(name, dom["high"])
            if dom["low"] > dom["high"]:
                raise ValueError(f"search space: {name} range has low {dom['low']} > high {dom['high']}")
            if dom.get("log") and dom["low"] <= 0:
                raise ValueError(f"search space: a log range for {name} must start above 0")
        else:
            _check_value(name, dom)
    return space


def suggest(trial, space: Dict[str, Any]) -> Dict[str, Any]:
    """One point of ``space`` from an Optuna trial (fixed values are returned as they are)."""
    params = {}
    for name, dom in space.items():
        if isinstance(dom, list):
            params[name] = trial.suggest_categorical(name, dom)
        elif isinstance(dom, dict):
            params[name] = trial.suggest_float(name, float(dom["low"]), float(dom["high"]), log=bool(dom.get("log")))
        else:
            params[name] = dom
    return params
