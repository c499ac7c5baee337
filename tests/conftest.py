"""Test-wide settings: headless MuJoCo rendering, no wandb, and a safe import order.

torchvision must be imported before dm_control's EGL context exists: loading it afterwards
(through triton) segfaults, so a test module that builds ALOHA envs must not come first.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "disabled")

import importlib  # noqa: E402

importlib.import_module("torchvision")  # import order, see above (imported for its side effect only)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors run fastest on one thread, and the test machine's cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
