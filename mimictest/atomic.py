"""Small files written atomically: a temporary file in the same folder, fsynced, then renamed."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_json(path: str, obj: Any, indent: int | None = 1) -> None:
    """``json.dump(obj)`` to ``path`` so that readers see the old file or the new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=indent)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
