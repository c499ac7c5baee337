"""Checkpoints that survive kills and corruption: weights, EMA, optimizer, LR scheduler, step, RNG state.

``save_atomic(obj, "last.pt")`` writes a temporary file in the same folder, fsyncs it, keeps the
current ``last.pt`` as ``last.prev.pt`` (a hard link, so ``last.pt`` never disappears), renames the
temporary file over ``last.pt`` and fsyncs the folder. A run killed at any instant leaves at least
one complete checkpoint under one of those two names. One writer per path (the main process).

``load_resumable("last.pt")`` loads ``last.pt``, or ``last.prev.pt`` with a one-line note on stderr
when ``last.pt`` is missing, truncated or corrupt (CRC-32 checked). Loading is ``weights_only``:
checkpoints hold only tensors and plain Python values (dicts, lists, tuples, numbers, strings, None),
which is why ``rng_state`` stores numpy's state as a list.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import zipfile
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA, when present) generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from ``rng_state()``'s output."""
    random.setstate(state["python"])
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def previous_path(path: str) -> str:
    """Where ``save_atomic`` keeps the checkpoint it replaced: ``run/last.pt`` -> ``run/last.prev.pt``."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.prev{ext}"


def save_atomic(obj: dict[str, Any], path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename, keeping the previous one.

    Stale temporary files of earlier killed saves (``.<name>.tmp*``) are removed first. A ``path``
    that is not a complete checkpoint (cut short) is replaced without becoming the previous one.
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for entry in os.scandir(folder):
        if entry.name.startswith(f".{name}.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    link = f"{tmp}.link"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if _is_whole_zip(path):
            try:
                os.link(path, link)
                os.replace(link, previous_path(path))
            except OSError:  # no hard links on this filesystem: for a moment only the previous one exists
                os.replace(path, previous_path(path))
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        for leftover in (tmp, link):  # ``link`` remains when it and the previous one were already one file
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)


def load(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the checkpoint ``path`` (weights-only); a one-line error if it is missing or unreadable."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        return _read(path, map_location)
    except Exception as exc:
        raise RuntimeError(f"cannot load checkpoint {path!r} ({_reason(exc)}); it is truncated, corrupt or not "
                           f"written by mimictest.checkpoint.save_atomic: load another one") from exc


def load_resumable(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """Load ``path``, else its previous checkpoint (saying why on stderr); ``None`` when neither exists.

    Nothing is deleted or overwritten. Raises ``RuntimeError`` when the files that exist are unreadable.
    """
    prev = previous_path(path)
    if not os.path.exists(path) and not os.path.exists(prev):
        return None
    problems = []
    for candidate in (path, prev):
        if not os.path.exists(candidate):
            problems.append(f"{candidate!r} is missing")
            continue
        try:
            state = _read(candidate, map_location)
        except Exception as exc:
            problems.append(f"{candidate!r} is unreadable ({_reason(exc)})")
            continue
        if candidate == prev:
            print(f"mimictest.checkpoint: {problems[0]}; resuming from the previous checkpoint {prev!r}", file=sys.stderr)
        return state
    existing = " and ".join(repr(p) for p in (path, prev) if os.path.exists(p))
    raise RuntimeError(f"no usable checkpoint: {problems[0]} and {problems[1]}; delete (or move away) {existing} "
                       f"to start the run over")


def _is_whole_zip(path: str) -> bool:
    """Whether ``path`` is a zip archive with its central directory (a ``torch.save`` file not cut short)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def _read(path: str, map_location: str | torch.device) -> dict[str, Any]:
    """Verify every CRC-32 in the archive (``torch.load`` does not), then load it weights-only."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"CRC-32 mismatch in {bad}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"it holds a {type(state).__name__}, not a dict")
    return state


def _reason(exc: Exception) -> str:
    """``"ErrorClass: first sentence"``; for the weights-only unpickler, the sentence naming what it refused."""
    text = str(exc).split("WeightsUnpickler error: ")[-1].strip()
    sentence = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(exc).__name__}: {sentence}" if sentence else type(exc).__name__
