"""Static checks: every Script/ file and package module has no undefined names, unused imports or variables.

The Script/ files are only run in full by hand (they train for an hour), so a misspelt
hyperparameter would otherwise surface after the dataset is built; pyflakes finds it at once.
"""

import glob
import os

import pytest
from pyflakes import checker, messages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "Script", "*.py")) + glob.glob(os.path.join(ROOT, "mimictest", "**", "*.py"), recursive=True))


def _allowed(message: messages.Message) -> bool:
    """torchvision is imported for its side effect: before dm_control's EGL context (afterwards it segfaults)."""
    return isinstance(message, messages.UnusedImport) and message.message_args == ("torchvision",)


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_pyflakes_clean(path: str) -> None:
    import ast

    with open(path) as fh:
        tree = ast.parse(fh.read(), filename=path)
    found = [m for m in checker.Checker(tree, filename=path).messages if not _allowed(m)]
    assert not found, "\n".join(str(m) for m in found)
