"""The one evaluation loop: policies rolled out in parallel simulators.

Each of ``num_envs`` workers keeps an observation history of ``obs_horizon`` steps. Whenever a
worker has no queued actions, the policy predicts a chunk for every such worker in one batch
(observation features are computed once per chunk) and steps ``[exec_start, exec_end)`` of the
chunk are mapped to env actions and queued; Diffusion Policy executes steps
``obs_horizon - 1 .. obs_horizon - 1 + 8``. With ``temporal_ensemble`` set, the policy predicts at
every step instead and each executed action is ACT's exponentially weighted average of every
queued prediction for that step; those chunks are queued in the model's action space (6D
rotations average well; axis-angles near pi do not) and mapped to env actions one step at a time.
A worker's queue is dropped when its episode ends.

An episode's score is the best ``info["score"]`` it reached (PushT's coverage, say), or its best
reward when the env gives none. Every worker runs a fixed quota of episodes, so that quick
(successful) episodes are not over-counted. Under accelerate, each process evaluates its share
with distinct seeds and the results are gathered.
"""

from __future__ import annotations

import contextlib
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



class Predictor:
    """numpy observation windows -> normalised model-space chunks, and model actions -> env actions.

    With ``bf16``, the policy predicts under bf16 autocast. Autocast casts each weight once per
    outermost ``autocast()`` context, so a rollout loop that holds one open around all its chunks
    pays for the casts once, not once per chunk (ResNet-18's 11 M weights take about 5 ms to cast
    on this CPU).
    """

    def __init__(self, policy: torch.nn.Module, preprocess: Preprocessor, device: torch.device, bf16: bool = False) -> None:
        self.policy, self.preprocess, self.device, self.bf16 = policy, preprocess, device, bf16

    def autocast(self) -> contextlib.AbstractContextManager:
        """A new bf16 autocast context on the policy's device (a no-op without ``bf16``)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    @torch.no_grad()
    def chunk(self, window: dict[str, np.ndarray]) -> np.ndarray:
        """``{"rgb": (n, T_obs, cams, H, W, 3) uint8, "low_dim": (n, T_obs, D)}`` -> ``(n, chunk, model_dim)``."""
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in window.items()}
        batch = self.preprocess(batch, train=False)
        with self.autocast():
            chunk = self.policy.predict(batch)
        return chunk.float().cpu().numpy()

    @torch.no_grad()
    def to_env(self, actions: np.ndarray) -> np.ndarray:
        """``(..., model_dim)`` normalised -> ``(..., env_dim)`` env actions."""
        return self.preprocess.unnormalize_action(torch.from_numpy(actions).to(self.device)).cpu().numpy()


class TemporalEnsembler:
    """ACT's temporal ensembling for one env (Zhao et al., RSS 2023, tonyzhaozh/act).

    Every step a new chunk is added; the executed action is the average of all queued predictions
    for the current step with weights ``exp(-coeff * i)``, ``i = 0`` for the OLDEST prediction
    (ACT's choice: a small ``coeff`` such as 0.01 weighs them almost equally, a large one trusts
    older predictions, which keeps the motion smooth).
    """

    def __init__(self, coeff: float) -> None:
        self.coeff = coeff
        self.chunks: list[np.ndarray] = []  # oldest first; row 0 of each is for the current step

    def reset(self) -> None:
        self.chunks = []

    def add(self, chunk: np.ndarray) -> None:
        """``(H, A)`` predictions for the current step and the ``H - 1`` after it."""
        self.chunks.append(chunk)

    def pop(self) -> np.ndarray:
        """The ensembled ``(A,)`` action for the current step; advances one step."""
        if not self.chunks:
            raise RuntimeError("TemporalEnsembler.pop() before any chunk was added")
        candidates = np.stack([c[0] for c in self.chunks])  # (n, A), oldest first
        weights = np.exp(-self.coeff * np.arange(len(candidates)))
        self.chunks = [c[1:] for c in self.chunks if len(c) > 1]
        return (weights[:, None] * candidates).sum(0) / weights.sum()


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
        temporal_ensemble: ACT's ensembling coefficient (e.g. 0.01), or ``None`` to execute
            ``[exec_start, exec_end)`` of each chunk open-loop.
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
    temporal_ensemble: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.exec_start < self.exec_end:
            raise ValueError(f"need 0 <= exec_start < exec_end, got [{self.exec_start}, {self.exec_end})")
        self._venv = None

    @property
    def execution(self) -> str:
        """How chunks are executed: ``"ensemble0.01"`` (temporal ensembling) or ``"chunk[1:9]"``."""
        if self.temporal_ensemble is not None:
            return f"ensemble{self.temporal_ensemble:g}"
        return f"chunk[{self.exec_start}:{self.exec_end}]"

    def close(self) -> None:
        if self._venv is not None:
            self._venv.close()
            self._venv = None

    def rollouts(self, predictor: Predictor, num_episodes: int, rank: int = 0, video_dir: str | None = None,
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
        history = new_history(obs, self.obs_horizon)
        queues: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        ensemblers = [TemporalEnsembler(self.temporal_ensemble) for _ in range(num_envs)] if self.temporal_ensemble else None
        last: list[np.ndarray] = [np.empty(0)] * num_envs  # each worker's action this step (model space if ensembling)
        steps, score_max = np.zeros(num_envs, int), np.full(num_envs, -np.inf)
        frames: list[np.ndarray] = []
        records: list[dict] = []
        bar = tqdm(total=num_episodes, desc="eval", unit="episode", disable=not progress, leave=False)
        with predictor.autocast():  # open for the whole loop: weights are cast to bf16 once
            while any(q > 0 for q in quota):
                # Workers past their quota keep stepping (the vector env steps all) on their last action, unpredicted.
                need = [i for i in range(num_envs) if quota[i] > 0 and (ensemblers or not queues[i])]
                if need:
                    window = {k: h[need] for k, h in history.items()}  # (n, T_obs, ...)
                    chunk = predictor.chunk(window)[:, self.exec_start : self.exec_end]  # (n, H, model_dim)
                    if ensemblers:
                        for j, i in enumerate(need):
                            ensemblers[i].add(chunk[j])
                    else:
                        env_chunk = predictor.to_env(chunk)  # (n, H, env_dim), mapped once per chunk
                        for j, i in enumerate(need):
                            queues[i] = list(env_chunk[j])
                for i in range(num_envs):
                    if quota[i] > 0:
                        last[i] = ensemblers[i].pop() if ensemblers else queues[i].pop(0)
                # Ensembled actions are averaged in model space and mapped here, one step at a time.
                actions = predictor.to_env(np.stack(last)) if ensemblers else np.stack(last)  # (num_envs, env_dim)
                obs, rewards, dones, infos = venv.step(actions)
                steps += 1
                score_max = np.maximum(score_max, [info.get("score", r) for info, r in zip(infos, rewards)])
                if "frame" in infos[0] and quota[0] > 0 and _videos_done(records) < self.num_videos:
                    frames.append(infos[0]["frame"])
                push_history(history, obs)
                for i in np.flatnonzero(dones):
                    if quota[i] > 0:
                        records.append({"rank": rank, "env": int(i), "success": bool(infos[i].get("is_success", False)),
                                        "length": int(steps[i]), "max_score": float(score_max[i])})
                        quota[i] -= 1
                        bar.update(1)
                        if i == 0 and frames and video_dir is not None:
                            _write_video(frames, video_dir, f"rank{rank}_episode{_videos_done(records) - 1}", self.video_fps)
                            frames = []
                    steps[i], score_max[i], queues[i] = 0, -np.inf, []
                    if ensemblers:
                        ensemblers[i].reset()
                    for k, h in history.items():  # obs[i] is already the next episode's first observation
                        h[i] = obs[k][i]
        bar.close()
        return records


def new_history(obs: dict[str, np.ndarray], horizon: int) -> dict[str, np.ndarray]:
    """First observations ``(n, ...)`` -> windows ``(n, horizon, ...)`` that repeat them (the newest is last)."""
    return {k: np.repeat(v[:, None], horizon, axis=1) for k, v in obs.items()}


def push_history(history: dict[str, np.ndarray], obs: dict[str, np.ndarray]) -> None:
    """Shift every window one step in place and append ``obs`` ``(n, ...)`` as the newest."""
    for k, h in history.items():
        h[:, :-1] = h[:, 1:]
        h[:, -1] = obs[k]


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


def summarize(records: list[dict]) -> dict:
    """Success rate (%), episode count, mean length (steps) and the mean of each episode's best score."""
    n = len(records)
    return {
        "success_rate": 100.0 * sum(r["success"] for r in records) / n,
        "episodes": n,
        "mean_length": float(np.mean([r["length"] for r in records])),
        "mean_max_score": float(np.mean([r["max_score"] for r in records])),
    }


def save_results(summary: dict, records: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"summary": summary, "episodes": records}, fh, indent=1)
