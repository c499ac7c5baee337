"""A run's configuration: the script's UPPERCASE constants, overrides, seeding, and what changed on resume.

Every ``Script/`` file is the whole experiment, its settings UPPERCASE constants at the top.
``apply_overrides(globals())`` lets the command line change them
(``accelerate launch Script/X.py --MAX_STEPS=2000 --BATCH_SIZE=64``), and ``script_constants()``
collects them from the launched script (``__main__``), so the checkpoint, ``config.json`` and
wandb hold every value the run depended on, not only ``TrainConfig``'s.
"""

from __future__ import annotations

import ast
import difflib
import os
import random
import re
import sys
from typing import Any

import numpy as np
import torch

# Constants that change how a run is evaluated, logged or paced, not the training trajectory:
# a resumed run may change them freely.
_FREE_ON_RESUME = re.compile(r"EVAL|EPISODE|ENVS|VIDEO|WANDB|LOG_EVERY|SAVE_EVERY|MAX_MINUTES|NUM_WORKERS|"
                             r"RUN_NAME|TEMPORAL_ENSEMBLE|SUCCESS_LAST_K|KEEP_CHECKPOINTS|PROFILE")
# TrainConfig fields of the same kind.
FREE_FIELDS = {"run_name", "max_minutes", "num_workers", "log_every", "eval_every", "save_every", "eval_only",
               "eval_checkpoints", "success_last_k", "keep_checkpoints", "profile", "wandb_project", "wandb_mode",
               "save_root", "allow_config_change"}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices), so that the networks a script builds are the same
    in every launch. Call it before constructing anything random."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _plain(value: Any) -> bool:
    """Whether ``value`` is a number, string, bool or None, or a list, tuple or dict of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def script_constants(module: Any = None) -> dict[str, Any]:
    """The UPPERCASE constants of ``module`` (the launched script, ``__main__``, by default) with
    plain values (numbers, strings, None and containers of them); tuples become lists."""
    module = module if module is not None else sys.modules.get("__main__")
    found = {}
    for name, value in sorted(vars(module).items() if module is not None else ()):
        if name.isupper() and not name.startswith("_") and _plain(value):
            found[name] = _listify(value)
    return found


def script_name(module: Any = None) -> str | None:
    """The launched script's file name (``DiffusionUNetLowdimLift.py``), or ``None`` (an interpreter)."""
    module = module if module is not None else sys.modules.get("__main__")
    path = getattr(module, "__file__", None)
    return os.path.basename(path) if path else None


def apply_overrides(namespace: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    """Set the script's UPPERCASE constants from ``--NAME=value`` arguments (``sys.argv`` by default).

    Values are Python literals (``--DOWN_DIMS=(64,128)``, ``--BF16=False``), or plain strings
    (``--TASK=insertion``), checked against the constant's type. An override that changes training
    (not an evaluation, logging or pacing setting) is appended to ``RUN_NAME``, so a variant gets
    its own run folder and never resumes another's checkpoint. Constants computed from others
    before this call (``EXEC_END``) keep their values: override them too. Returns the overrides.
    """
    argv = sys.argv[1:] if argv is None else argv
    known = sorted(k for k, v in namespace.items() if k.isupper() and not k.startswith("_") and _plain(v))
    overrides: dict[str, Any] = {}
    for arg in argv:
        match = re.fullmatch(r"--([A-Za-z_][A-Za-z0-9_]*)=(.*)", arg, re.S)
        if match is None:
            raise SystemExit(f"cannot read the argument {arg!r}: overrides look like --NAME=value, with NAME one of the "
                             f"script's settings: {', '.join(known)}")
        name, text = match.groups()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SystemExit(f"unknown setting {name!r}{hint}; the script's settings are: {', '.join(known)}")
        overrides[name] = _typed(name, namespace[name], _literal(text))
    namespace.update(overrides)
    tags = [_tag(k, v) for k, v in overrides.items() if k != "RUN_NAME" and not _FREE_ON_RESUME.search(k)]
    if tags and isinstance(namespace.get("RUN_NAME"), str) and "RUN_NAME" not in overrides:
        namespace["RUN_NAME"] = "_".join([namespace["RUN_NAME"], *tags])
    return overrides


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _typed(name: str, old: Any, new: Any) -> Any:
    """``new`` if it may replace ``old`` (same kind, an int for a float, None either way); else a one-line exit."""
    if old is None or new is None:
        return new
    if (isinstance(old, str) and isinstance(new, bool)) or (isinstance(old, bool) and new == "auto"):
        return new  # BF16 = "auto" | True | False
    if isinstance(old, bool) == isinstance(new, bool):
        if isinstance(old, float) and isinstance(new, int):
            return float(new)
        if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
            return type(old)(new)
        if isinstance(new, type(old)):
            return new
    raise SystemExit(f"--{name}={new!r}: {name} is {_kind(old)} ({old!r}), not {_kind(new)}; give a value of that type")


def _kind(value: Any) -> str:
    name = type(value).__name__
    return {"int": "an int", "str": "a string"}.get(name, f"a {name}")


def _tag(name: str, value: Any) -> str:
    """``NAME=value`` as a folder-name part: paths by their file name, no spaces or brackets."""
    if isinstance(value, str) and "/" in value:
        value = os.path.basename(value.rstrip("/"))
    text = str(list(value) if isinstance(value, tuple) else value)
    return f"{name}=" + (re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "none")


def _listify(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    return value


def changed_values(saved: dict[str, Any], current: dict[str, Any], free: set[str] | re.Pattern = _FREE_ON_RESUME
                   ) -> list[str]:
    """``"NAME: old -> new"`` for every key whose value differs between two configurations
    (added and removed keys included), ignoring the keys ``free`` matches."""
    def is_free(key: str) -> bool:
        return key in free if isinstance(free, set) else bool(free.search(key))

    out = []
    for key in sorted(set(saved) | set(current)):
        if is_free(key):
            continue
        old, new = _listify(saved.get(key, "<unset>")), _listify(current.get(key, "<unset>"))
        if old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out
