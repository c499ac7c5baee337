"""Scripted experts that write demonstrations in each benchmark's real on-disk format.

``python -m mimictest.demos <task> --episodes N --out PATH`` from the shell; ``ensure_demos`` from
a ``Script/`` file, so a first run makes its own data.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Callable

from accelerate import PartialState


def ensure_demos(path: str, generate: Callable[..., dict], **kwargs) -> None:
    """Run ``generate(path, **kwargs)`` unless ``path`` exists; under accelerate, once, on the main process.

    The expert runs in a forked child process: a process that has rendered with EGL on the CPU
    cannot fork working render workers afterwards (the renderer's threads do not survive a fork),
    and the evaluation's ``SubprocVecEnv`` forks this one.
    """
    with PartialState().main_process_first():
        if os.path.exists(path):
            return
        print(f"no demos at {path!r}: generating them with the scripted expert")
        child = multiprocessing.get_context("fork").Process(target=generate, args=(path,), kwargs=kwargs)
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"the scripted expert failed (exit code {child.exitcode}); its error is printed above")
