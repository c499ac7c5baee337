"""A run's configuration: the script's UPPERCASE constants, seeding, and what changed on resume.

Every ``Script/`` file is the whole experiment, its settings UPPERCASE constants at the top.
``script_constants()`` collects them from the launched script (``__main__``), so the checkpoint,
``config.json`` and wandb hold every value the run depended on, not only ``TrainConfig``'s.
"""

from __future__ import annotations

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
