"""Parallel environments: stable-baselines3 ``SubprocVecEnv`` with dict observations stacked."""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv


def make_vec_env(env_fns: list[Callable[[], gym.Env]], subprocess: bool = True) -> VecEnv:
    """One worker process per env (or all in this process with ``subprocess=False``).

    Workers are forked: "spawn" and "forkserver" re-import the launching module, and a
    ``Script/`` file is an experiment that runs top to bottom when imported. Env workers use no
    torch, so forking a process that has initialised torch is safe.
    """
    if not env_fns:
        raise ValueError("make_vec_env needs at least one env")
    if subprocess:
        return SubprocVecEnv(env_fns, start_method="fork")
    return DummyVecEnv(env_fns)
