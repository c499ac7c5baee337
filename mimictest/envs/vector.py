"""Parallel environments: stable-baselines3 ``SubprocVecEnv`` workers that run a fixed schedule of episodes.

Observations are dicts whose ``rgb`` is itself a ``{camera: (H, W, 3)}`` dict (cameras may differ
in size). SB3 stacks one level of dict, so each worker flattens ``rgb`` to ``"rgb/<camera>"`` keys
and ``unflatten`` restores it on the evaluator's side.

Each worker is a ``ScheduledEnv``: it owns a list of ``(task, start)`` episodes and starts the next
one at every reset (SB3 resets a worker by itself when its episode ends), building each task's env
the first time it is needed. A start is a seed (``reset(seed=...)``) or a dict of reset options (a
saved initial state), so two checkpoints can be compared on identical starts.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

Start = int | dict[str, Any]  # a reset seed, or reset options such as a saved initial state


def flatten(obs: dict) -> dict:
    """``{"rgb": {cam: x}, ...}`` -> ``{"rgb/cam": x, ...}`` (one level, what SB3 stacks)."""
    flat = {k: v for k, v in obs.items() if k != "rgb"}
    flat.update((f"rgb/{cam}", image) for cam, image in obs.get("rgb", {}).items())
    return flat


def unflatten(obs: dict) -> dict:
    """The inverse of ``flatten``."""
    nested = {k: v for k, v in obs.items() if not k.startswith("rgb/")}
    rgb = {k[len("rgb/"):]: v for k, v in obs.items() if k.startswith("rgb/")}
    if rgb:
        nested["rgb"] = rgb
    return nested


def _flat_space(space: gym.spaces.Dict) -> gym.spaces.Dict:
    spaces = dict(space.spaces)
    if "rgb" in spaces:
        spaces["rgb"] = dict(spaces["rgb"].spaces)
    return gym.spaces.Dict(flatten(spaces))


class ScheduledEnv(gym.Env):
    """One worker: runs ``schedule``'s ``(task, start)`` episodes in order, then repeats the last.

    Args:
        makers: ``makers[task]() -> gym.Env``, one per task; all tasks' envs must share their
            observation and action spaces.
        schedule: the worker's episodes, as indices into ``makers`` and starts.
    """

    def __init__(self, makers: list[Callable[[], gym.Env]], schedule: list[tuple[int, Start]]) -> None:
        if not schedule:
            raise ValueError("a ScheduledEnv needs at least one episode in its schedule")
        self.makers, self.schedule = makers, schedule
        self.envs: dict[int, gym.Env] = {}
        self.next_episode = 0
        self.task = schedule[0][0]
        first = self._env(self.task)
        self.observation_space = _flat_space(first.observation_space)
        self.action_space = first.action_space

    def _env(self, task: int) -> gym.Env:
        if task not in self.envs:
            env = self.makers[task]()
            if self.envs:
                reference = next(iter(self.envs.values()))
                if env.observation_space != reference.observation_space or env.action_space != reference.action_space:
                    raise ValueError(
                        f"the tasks' envs differ in their spaces ({env.observation_space} vs "
                        f"{reference.observation_space}); one Evaluator runs tasks with identical observations and actions"
                    )
            self.envs[task] = env
        return self.envs[task]

    def rewind(self) -> None:
        """Run the schedule from its first episode again at the next reset (the next evaluation)."""
        self.next_episode = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        """Start the next scheduled episode (``seed`` and ``options`` from SB3 are ignored: the schedule decides)."""
        self.task, start = self.schedule[min(self.next_episode, len(self.schedule) - 1)]
        self.next_episode += 1
        env = self._env(self.task)
        obs, info = env.reset(seed=start) if isinstance(start, int) else env.reset(options=start)
        return flatten(obs), info

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.envs[self.task].step(action)
        return flatten(obs), reward, terminated, truncated, info

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs = {}


class _DieWithParent:
    """Picklable ``() -> env`` that first asks Linux to kill this worker when its parent dies.

    Without it, a trainer killed with ``kill -9`` during evaluation leaves its SubprocVecEnv
    workers running (and rendering) as orphans.
    """

    def __init__(self, make: Callable[[], gym.Env]) -> None:
        self.make = make

    def __call__(self) -> gym.Env:
        if sys.platform.startswith("linux"):
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        return self.make()


def make_vec_env(env_fns: list[Callable[[], gym.Env]], subprocess: bool = True) -> VecEnv:
    """One worker process per env (or all in this process with ``subprocess=False``).

    Workers are forked: "spawn" and "forkserver" re-import the launching module, and a
    ``Script/`` file is an experiment that runs top to bottom when imported. Env workers use no
    torch, so forking a process that has initialised torch is safe.
    """
    if not env_fns:
        raise ValueError("make_vec_env needs at least one env")
    if subprocess:
        return SubprocVecEnv([_DieWithParent(fn) for fn in env_fns], start_method="fork")
    return DummyVecEnv(env_fns)
