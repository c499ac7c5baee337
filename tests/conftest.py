"""Test-wide settings: headless MuJoCo rendering and a small, deterministic torch."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "disabled")
