"""Parallel environments: stable-baselines3 ``SubprocVecEnv`` workers that run a fixed schedule of episodes.

Observations are dicts whose ``rgb`` is itself a ``{camera: (H, W, 3)}`` dict (cameras may differ
in size). SB3 stacks one level of dict, so each worker flattens ``rgb`` to ``"rgb/<camera>"`` keys
and ``unflatten`` restores it on the evaluator's side.

Each worker is a ``ScheduledEnv``: it owns a list of ``(task, start)`` episodes and starts the next
one at every reset (SB3 resets a worker by itself when its episode ends), building each task's env
the first time it is needed. A start is a seed (``reset(seed=...)``) or a dict of reset options (a
saved initial state), so two checkpoints can be compared on identical starts.

``RestartingVecEnv`` is SB3's ``SubprocVecEnv`` made to survive its workers: a worker whose process
dies, whose pipe breaks or that stops answering is replaced by a fresh process that runs the
interrupted episode again from its start, and every worker dies with its parent.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
from multiprocessing.connection import wait
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv
from stable_baselines3.common.vec_env.base_vec_env import CloudpickleWrapper
from stable_baselines3.common.vec_env.subproc_vec_env import _worker

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
        video_episodes: with envs made with ``render_video=True``, render frames only in the first
            this many episodes of the schedule (``None``: in all); the rest skip the render.
    """

    def __init__(self, makers: list[Callable[[], gym.Env]], schedule: list[tuple[int, Start]],
                 video_episodes: int | None = None) -> None:
        if not schedule:
            raise ValueError("a ScheduledEnv needs at least one episode in its schedule")
        self.makers, self.schedule, self.video_episodes = makers, schedule, video_episodes
        self.envs: dict[int, gym.Env] = {}
        self.renders: dict[int, bool] = {}  # each task env's render_video as made
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
            if hasattr(env, "render_video"):
                self.renders[task] = env.render_video
        return self.envs[task]

    def rewind(self) -> None:
        """Run the schedule from its first episode again at the next reset (the next evaluation)."""
        self.next_episode = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        """Start the next scheduled episode, or episode ``options["episode"]`` of the schedule (``seed`` is
        ignored: the schedule decides)."""
        if options is not None and "episode" in options:
            self.next_episode = options["episode"]
        self.task, start = self.schedule[min(self.next_episode, len(self.schedule) - 1)]
        env = self._env(self.task)
        if self.video_episodes is not None and self.task in self.renders:
            env.render_video = self.renders[self.task] and self.next_episode < self.video_episodes
        self.next_episode += 1
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
    workers running (and rendering) as orphans. A parent that died before the request was made is
    caught by comparing the parent's pid with the one recorded when this object was made.
    """

    def __init__(self, make: Callable[[], gym.Env]) -> None:
        self.make, self.parent = make, os.getpid()

    def __call__(self) -> gym.Env:
        if sys.platform.startswith("linux"):
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != self.parent:
                os._exit(1)
        return self.make()


class WorkerError(RuntimeError):
    """A worker of a ``RestartingVecEnv`` failed ``failures`` times in a row on episode ``episode``
    of its schedule; ``reason`` says how it failed the last time."""

    def __init__(self, worker: int, episode: int, failures: int, reason: str) -> None:
        super().__init__(f"env worker {worker} failed {failures} time(s) in a row on episode {episode} of its "
                         f"schedule; last: {reason}")
        self.worker, self.episode, self.failures, self.reason = worker, episode, failures, reason


class RestartingVecEnv(SubprocVecEnv):
    """SB3's ``SubprocVecEnv`` of ``ScheduledEnv`` workers, replacing workers that die or hang.

    SubprocVecEnv blocks in ``remote.recv()``: a dead worker raises a bare ``EOFError`` and a hung
    one blocks forever. Here every reply is awaited at most ``timeout_s`` seconds, watching each
    worker's pipe and process together (``multiprocessing.connection.wait``). A worker whose process
    exited, whose pipe broke, or that did not answer in time is killed and replaced by a fresh
    process (forked, and dying with its parent) that starts the episode it was running again from
    its start. Its ``step`` then returns that episode's first observation, ``done=False`` and
    ``info["worker_restart"]`` saying what happened; a restart during ``reset`` is said in
    ``reset_infos``. A worker that fails ``max_failures`` times in a row on one episode raises
    ``WorkerError``. A worker killed while resetting itself after an episode ran that episode again:
    its result was lost with the process.

    ``reset()`` starts every worker's schedule again from its first episode; SB3's ``seed()`` and
    ``set_options()`` are not used.
    """

    def __init__(self, env_fns: list[Callable[[], gym.Env]], timeout_s: float = 120.0, max_failures: int = 3) -> None:
        if timeout_s <= 0 or max_failures < 1:
            raise ValueError(f"need timeout_s > 0 and max_failures >= 1, got {timeout_s} and {max_failures}")
        self.env_fns = [_DieWithParent(fn) for fn in env_fns]
        self.timeout_s, self.max_failures = timeout_s, max_failures
        try:
            super().__init__(self.env_fns, start_method="fork")  # builds worker 0's env to learn the spaces
        except (EOFError, OSError) as e:
            for process in getattr(self, "processes", []):
                process.kill()
            raise WorkerError(0, 0, 1, f"its process died while building its env ({type(e).__name__}; "
                                       "its traceback is above)") from None
        self.remotes, self.processes = list(self.remotes), list(self.processes)
        self.episode = [0] * self.num_envs  # the index in its schedule of the episode each worker runs
        self.failures = [0] * self.num_envs  # each worker's failures on that episode
        self._unsent: dict[int, str] = {}  # workers a command could not be sent to, and why

    def reset(self) -> dict:
        self.episode, self.failures = [0] * self.num_envs, [0] * self.num_envs
        for i in range(self.num_envs):
            self._send(i, ("reset", (None, {"episode": 0})))
        replies, failed = self._receive(range(self.num_envs))
        for i, reason in sorted(failed.items()):
            obs, info = self._restart(i, reason)
            replies[i] = (obs, {**info, "worker_restart": reason})
        obs, self.reset_infos = zip(*(replies[i] for i in range(self.num_envs)))
        self.reset_infos = list(self.reset_infos)
        return self._stack(obs)

    def step_async(self, actions: np.ndarray) -> None:
        for i, action in enumerate(actions):
            self._send(i, ("step", action))
        self.waiting = True

    def step_wait(self) -> tuple[dict, np.ndarray, np.ndarray, list[dict]]:
        replies, failed = self._receive(range(self.num_envs))
        self.waiting = False
        for i, reason in sorted(failed.items()):
            obs, reset_info = self._restart(i, reason)
            replies[i] = (obs, 0.0, False, {"worker_restart": reason}, reset_info)
        obs, rewards, dones, infos, reset_infos = zip(*(replies[i] for i in range(self.num_envs)))
        self.reset_infos = list(reset_infos)
        for i in np.flatnonzero(dones):  # SB3's worker reset itself: it runs its next episode
            self.episode[i] += 1
            self.failures[i] = 0
        return self._stack(obs), np.stack(rewards), np.stack(dones), list(infos)

    def close(self) -> None:
        """Ask every worker to close its env; kill those still running 5 s later (hung or busy)."""
        if self.closed:
            return
        for i in range(self.num_envs):
            self._send(i, ("close", None))
        deadline = time.monotonic() + 5.0
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join()
        for remote in self.remotes:
            remote.close()
        self._unsent = {}
        self.closed = True

    def _stack(self, obs: tuple[dict, ...]) -> dict:
        return {k: np.stack([o[k] for o in obs]) for k in self.observation_space.spaces}

    def _send(self, i: int, message: tuple) -> None:
        try:
            self.remotes[i].send(message)
        except (OSError, ValueError) as e:  # a dead reader (BrokenPipe, ConnectionReset) or a closed pipe
            self._unsent[i] = f"its pipe broke ({type(e).__name__})"

    def _receive(self, workers: range | list[int]) -> tuple[dict[int, Any], dict[int, str]]:
        """Each worker's reply, or why it gave none within ``timeout_s``."""
        failed = {i: self._unsent.pop(i) for i in workers if i in self._unsent}
        waiting = {i for i in workers if i not in failed}
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            handles = {self.remotes[i]: i for i in waiting} | {self.processes[i].sentinel: i for i in waiting}
            ready = wait(list(handles), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for i in {handles[h] for h in ready}:
                remote, process = self.remotes[i], self.processes[i]
                waiting.discard(i)
                if remote not in ready:  # only its process ended; its pipe may show a reply or the end a moment later
                    process.join()
                    if not remote.poll():
                        failed[i] = _exit_reason(process)
                        continue
                try:
                    replies[i] = remote.recv()
                except (EOFError, OSError) as e:
                    process.join(1.0)  # its exit code, once it has exited
                    failed[i] = f"its pipe broke ({type(e).__name__}; {_exit_reason(process)})"
        failed.update((i, f"it gave no reply within {self.timeout_s:g} s") for i in waiting)
        return replies, failed

    def _restart(self, i: int, reason: str) -> tuple[dict, dict]:
        """Replace worker ``i`` until one resets into its current episode: ``(obs, reset_info)``."""
        while True:
            self.processes[i].kill()
            self.processes[i].join()
            self.remotes[i].close()
            self._unsent.pop(i, None)
            self.failures[i] += 1
            if self.failures[i] >= self.max_failures:
                raise WorkerError(i, self.episode[i], self.failures[i], reason)
            ctx = mp.get_context("fork")
            self.remotes[i], work_remote = ctx.Pipe()
            self.processes[i] = ctx.Process(target=_worker, args=(work_remote, self.remotes[i],
                                                                  CloudpickleWrapper(self.env_fns[i])), daemon=True)
            self.processes[i].start()
            work_remote.close()
            self._send(i, ("reset", (None, {"episode": self.episode[i]})))
            replies, failed = self._receive([i])
            if i in replies:
                return replies[i]
            reason = failed[i]


def _exit_reason(process: mp.Process) -> str:
    code = process.exitcode
    if code is None:
        return "its process is still running"
    return f"its process was killed by signal {-code}" if code < 0 else f"its process exited with code {code}"


def make_vec_env(env_fns: list[Callable[[], gym.Env]], subprocess: bool = True, timeout_s: float = 120.0,
                 max_failures: int = 3) -> VecEnv:
    """One restartable worker process per ``ScheduledEnv`` (or all in this process with ``subprocess=False``).

    Workers are forked: "spawn" and "forkserver" re-import the launching module, and a
    ``Script/`` file is an experiment that runs top to bottom when imported. Env workers use no
    torch, so forking a process that has initialised torch is safe. ``timeout_s`` and
    ``max_failures`` are ``RestartingVecEnv``'s.
    """
    if not env_fns:
        raise ValueError("make_vec_env needs at least one env")
    if subprocess:
        return RestartingVecEnv(env_fns, timeout_s=timeout_s, max_failures=max_failures)
    return DummyVecEnv(env_fns)
