"""Dataset readers: every on-disk format reduces to flat arrays windowed by ``windows.py``."""

from __future__ import annotations

import os


def require_dataset(path: str, how_to_get: str) -> None:
    """Stop with a one-line message saying where to get the data when ``path`` does not exist."""
    if not os.path.exists(path):
        raise SystemExit(f"dataset not found: {path!r}. {how_to_get}")
