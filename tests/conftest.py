"""Test-wide settings: headless MuJoCo rendering, no wandb, and a safe import order.

torchvision must be imported before dm_control's EGL context exists: loading it afterwards
(through triton) segfaults, so a test module that builds ALOHA envs must not come first.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "disabled")

import torchvision  # noqa: E402,F401  (import order, see above)
