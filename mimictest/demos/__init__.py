"""Scripted experts that write demonstrations in each benchmark's real on-disk format.

``python -m mimictest.demos <task> --episodes N --out PATH`` from the shell; ``ensure_demos`` from
a ``Script/`` file, so a first run makes its own data.
"""

from __future__ import annotations

import os
from typing import Callable

from accelerate import PartialState


def ensure_demos(path: str, generate: Callable[..., dict], **kwargs) -> None:
    """Run ``generate(path, **kwargs)`` unless ``path`` exists; under accelerate, once, on the main process."""
    with PartialState().main_process_first():
        if not os.path.exists(path):
            print(f"no demos at {path!r}: generating them with the scripted expert")
            generate(path, **kwargs)
