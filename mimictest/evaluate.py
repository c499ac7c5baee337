"""The one evaluation loop: policies rolled out in parallel simulators.

Each of ``num_envs`` workers keeps an observation history of ``obs_horizon`` steps. Whenever a
worker has no queued actions, the policy predicts a chunk for every such worker in one batch
(observation features are computed once per chunk) and steps ``[exec_start, exec_end)`` of the
chunk are queued; Diffusion Policy executes steps ``obs_horizon - 1 .. obs_horizon - 1 + 8``.
A worker's queue is dropped when its episode ends. Every worker runs a fixed quota of episodes, so
that quick (successful) episodes are not over-counted. Under accelerate, each process evaluates
its share with distinct seeds and the results are gathered.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import imageio
import numpy as np
import torch
from tqdm.auto import tqdm

from mimictest.envs.vector import make_vec_env
from mimictest.preprocess import Preprocessor

Predict = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class Evaluator:
    """Rollout settings.

    Attributes:
        make_env: ``make_env(render_video=...) -> gym.Env``, picklable (e.g. a ``functools.partial``);
            observations are ``{"rgb": (cams, H, W, 3) uint8, "low_dim": (D,)}``.
        num_envs: parallel workers per process.
        num_episodes: episodes in total, over all processes.
        obs_horizon: observation steps the policy sees.
        exec_start, exec_end: the slice of each predicted chunk that is executed.
        seed: seed of the first worker; worker ``i`` of process ``r`` uses ``seed + 1000 * r + i``.
            Keep it far from the seeds of the training demos.
        num_videos: rollouts saved as mp4 (from worker 0 of the main process).
        video_fps: frames per second of those videos.
    """

    make_env: Callable[[bool], gym.Env]
    num_envs: int
    num_episodes: int
    obs_horizon: int
    exec_start: int
    exec_end: int
    seed: int = 100_000
    num_videos: int = 2
    video_fps: int = 20

    def __post_init__(self) -> None:
        if not 0 <= self.exec_start < self.exec_end:
            raise ValueError(f"need 0 <= exec_start < exec_end, got [{self.exec_start}, {self.exec_end})")
        self._venv = None

    def close(self) -> None:
        if self._venv is not None:
            self._venv.close()
            self._venv = None

    def rollouts(self, predict: Predict, num_episodes: int, rank: int = 0, video_dir: str | None = None,
                 progress: bool = True) -> list[dict]:
        """Run ``num_episodes`` episodes in this process; one record per episode."""
        num_envs = min(self.num_envs, num_episodes)
        if self._venv is None or self._venv.num_envs != num_envs:
            self.close()
            videos = video_dir is not None and self.num_videos > 0
            fns = [_EnvFn(self.make_env, videos and i == 0) for i in range(num_envs)]
            self._venv = make_vec_env(fns, subprocess=num_envs > 1)
        venv = self._venv
        quota = [num_episodes // num_envs + (i < num_episodes % num_envs) for i in range(num_envs)]
        venv.seed(self.seed + 1000 * rank)
        obs = venv.reset()
        # (num_envs, T_obs, ...): the newest observation last; a reset fills the whole window.
        history = {k: np.repeat(v[:, None], self.obs_horizon, axis=1) for k, v in obs.items()}
        queues: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        steps, reward_max = np.zeros(num_envs, int), np.full(num_envs, -np.inf)
        frames: list[np.ndarray] = []
        records: list[dict] = []
        bar = tqdm(total=num_episodes, desc="eval", unit="episode", disable=not progress, leave=False)
        while any(q > 0 for q in quota):
            need = [i for i in range(num_envs) if not queues[i]]
            if need:
                window = {k: h[need] for k, h in history.items()}  # (n, T_obs, ...)
                chunk = predict(window)  # (n, chunk, A)
                for j, i in enumerate(need):
                    queues[i] = list(chunk[j, self.exec_start : self.exec_end])
            obs, rewards, dones, infos = venv.step(np.stack([q.pop(0) for q in queues]))
            steps += 1
            reward_max = np.maximum(reward_max, rewards)
            if "frame" in infos[0] and quota[0] > 0 and _videos_done(records) < self.num_videos:
                frames.append(infos[0]["frame"])
            for k, h in history.items():
                h[:, :-1] = h[:, 1:]
                h[:, -1] = obs[k]
            for i in np.flatnonzero(dones):
                if quota[i] > 0:
                    records.append({"rank": rank, "env": int(i), "success": bool(infos[i].get("is_success", False)),
                                    "length": int(steps[i]), "max_reward": float(reward_max[i])})
                    quota[i] -= 1
                    bar.update(1)
                    if i == 0 and frames and video_dir is not None:
                        _write_video(frames, video_dir, f"rank{rank}_episode{_videos_done(records) - 1}", self.video_fps)
                        frames = []
                steps[i], reward_max[i], queues[i] = 0, -np.inf, []
                for k, h in history.items():  # obs[i] is already the next episode's first observation
                    h[i] = obs[k][i]
        bar.close()
        return records


class _EnvFn:
    """Picklable ``() -> env`` for one worker."""

    def __init__(self, make_env: Callable[[bool], gym.Env], render_video: bool) -> None:
        self.make_env, self.render_video = make_env, render_video

    def __call__(self) -> gym.Env:
        return self.make_env(render_video=self.render_video)


def _videos_done(records: list[dict]) -> int:
    return sum(r["env"] == 0 for r in records)


def _write_video(frames: list[np.ndarray], folder: str, name: str, fps: int) -> None:
    os.makedirs(folder, exist_ok=True)
    imageio.mimsave(os.path.join(folder, f"{name}.mp4"), frames, fps=fps, macro_block_size=1)


def make_predict(policy: torch.nn.Module, preprocess: Preprocessor, device: torch.device,
                 autocast: torch.autocast | None = None) -> Predict:
    """numpy observation windows -> env actions, through preprocess, the policy and the inverse."""

    @torch.no_grad()
    def predict(window: dict[str, np.ndarray]) -> np.ndarray:
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in window.items()}
        batch = preprocess(batch, train=False)
        if autocast is not None:
            with autocast:
                chunk = policy.predict(batch)
        else:
            chunk = policy.predict(batch)
        return preprocess.unnormalize_action(chunk).cpu().numpy()  # (n, chunk, env_dim)

    return predict


def summarize(records: list[dict]) -> dict:
    """Success rate (%), episode count, mean length and mean of each episode's max reward."""
    n = len(records)
    return {
        "success_rate": 100.0 * sum(r["success"] for r in records) / n,
        "episodes": n,
        "mean_length": float(np.mean([r["length"] for r in records])),
        "mean_max_reward": float(np.mean([r["max_reward"] for r in records])),
    }


def save_results(summary: dict, records: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"summary": summary, "episodes": records}, fh, indent=1)
