"""Per-dimension dataset statistics, computed once per key and cached beside the dataset.

The cache is ``<dataset>.mimictest-stats.json`` (for a file or a folder such as a zarr store),
stamped with the dataset's total size and newest modification time so an edited dataset is
re-read. A read-only folder only disables the cache.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Callable

import numpy as np

from mimictest.atomic import write_json

Stats = dict[str, list[float]]


def array_stats(data: np.ndarray) -> Stats:
    """``(N, ...)`` -> per-dim ``min``, ``max``, ``mean``, ``std`` over the flattened trailing dims."""
    flat = np.asarray(data, dtype=np.float64).reshape(len(data), -1)  # (N, d)
    return {"min": flat.min(0).tolist(), "max": flat.max(0).tolist(), "mean": flat.mean(0).tolist(), "std": flat.std(0).tolist()}


def concat_stats(parts: list[Stats]) -> Stats:
    """Statistics of the concatenation of several keys' dimensions, in order."""
    return {s: sum((p[s] for p in parts), []) for s in ("min", "max", "mean", "std")}


def _stamp(path: str) -> dict[str, float]:
    if os.path.isfile(path):
        return {"size": os.path.getsize(path), "mtime": os.path.getmtime(path)}
    size, mtime = 0, os.path.getmtime(path)
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            size, mtime = size + os.path.getsize(full), max(mtime, os.path.getmtime(full))
    return {"size": size, "mtime": mtime}


def cached_stats(path: str, keys: list[str], compute: Callable[[str], Stats]) -> dict[str, Stats]:
    """``{key: stats}`` for ``keys``, calling ``compute(key)`` only for keys not cached yet."""
    cache_path = os.path.normpath(path) + ".mimictest-stats.json"
    stamp = _stamp(path)
    cache: dict = {"source": stamp, "keys": {}}
    if os.path.isfile(cache_path):
        with open(cache_path) as fh:
            loaded = json.load(fh)
        if loaded.get("source") == stamp:
            cache = loaded
    todo = [k for k in keys if k not in cache["keys"]]
    for key in todo:
        cache["keys"][key] = compute(key)
    if todo:
        try:
            write_json(cache_path, cache, indent=None)
        except OSError as err:
            warnings.warn(f"could not cache dataset statistics beside {path!r} ({err}); they are recomputed each run")
    return {k: cache["keys"][k] for k in keys}
