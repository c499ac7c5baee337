"""The one evaluation loop: policies rolled out in parallel simulators, over one task or many.

An ``Evaluator`` holds a list of ``EvalTask`` (each with its env factory, instruction, episode
count and fixed starts). Every episode ``(task, start)`` is dealt to one process and, within it, to
one of ``num_envs`` workers (``mimictest.envs.vector.ScheduledEnv``), which runs its episodes in
order, so two checkpoints are compared on identical starts whatever the number of processes.

Each worker keeps an observation history of ``obs_horizon`` steps. Whenever a worker has no
queued actions, the policy predicts a chunk for every such worker in one batch (observation
features are computed once per chunk) and steps ``[exec_start, exec_end)`` of the chunk are
mapped to env actions and queued; Diffusion Policy executes steps ``obs_horizon - 1 ..
obs_horizon - 1 + 8``. With ``temporal_ensemble`` set, the policy predicts at every step instead
and each executed action is ACT's exponentially weighted average of every queued prediction for
that step; those chunks are queued in the model's action space (6D rotations average well;
axis-angles near pi do not) and mapped to env actions one step at a time. A worker's queue is
dropped when its episode ends. The window carries each worker's task id and instruction.

An episode's score is the best ``info["score"]`` it reached (PushT's ``clip(coverage / 0.95, 0, 1)``,
as gym-pusht, Diffusion Policy and LeRobot report it), or its best reward when the env gives none;
an env that gives ``info["coverage"]`` also gets its best raw coverage recorded. Success rates come with 95% Wilson intervals, per task and over
all episodes, plus the mean over tasks. Under accelerate, each process evaluates its share and the
results are gathered.

Workers that die or hang (``step_timeout_s``) are restarted and their episode is run again from
its start (``mimictest.envs.vector.RestartingVecEnv``), so results do not depend on the failures;
each record counts its episode's restarts and the summary adds them up. An episode whose worker
fails ``max_worker_failures`` times in a row stops the evaluation with an ``EvaluationError``
whose message is one line naming the task and the start.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import gymnasium as gym
import imageio
import numpy as np
import torch
from tqdm.auto import tqdm

from mimictest.atomic import write_json
from mimictest.envs.vector import RestartingVecEnv, ScheduledEnv, Start, WorkerError, make_vec_env, unflatten
from mimictest.preprocess import Preprocessor


class EvaluationError(RuntimeError):
    """An evaluation stopped because an env worker kept failing; ``str(error)`` is one line naming the
    task and the start (seed) of the episode."""


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
    def chunk(self, window: dict) -> np.ndarray:
        """A window -> ``(n, chunk, model_dim)``.

        ``window``: ``{"rgb": {cam: (n, T_obs, H, W, 3) uint8}, "low_dim": (n, T_obs, D), "task": (n,),
        "lang": n strings}``, each key only when the policy uses it.
        """
        batch = _to_device(window, self.device)
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


class ChunkQueues:
    """Each worker's queued actions: open-loop chunk slices, or temporal ensembling (the module
    docstring says how); shared by every rollout loop (``Evaluator``, ``mimictest.chained``)."""

    def __init__(self, num_envs: int, exec_start: int, exec_end: int, temporal_ensemble: float | None) -> None:
        self.window = slice(exec_start, exec_end)
        self.ensemblers = ([TemporalEnsembler(temporal_ensemble) for _ in range(num_envs)]
                           if temporal_ensemble is not None else None)
        self.queues: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        self.last: list[np.ndarray] = [np.empty(0)] * num_envs  # each worker's action this step

    def needing(self, workers: list[int]) -> list[int]:
        """Those of ``workers`` that need a new chunk before the next step."""
        return [i for i in workers if self.ensemblers or not self.queues[i]]

    def fill(self, predictor: Predictor, window: dict, workers: list[int]) -> None:
        """Predict one chunk for each of ``workers`` (one batch) and queue its executed slice."""
        chunk = predictor.chunk(window)[:, self.window]  # (n, H, model_dim)
        if self.ensemblers:
            for j, i in enumerate(workers):
                self.ensemblers[i].add(chunk[j])
        else:
            env_chunk = predictor.to_env(chunk)  # (n, H, env_dim), mapped once per chunk
            for j, i in enumerate(workers):
                self.queues[i] = list(env_chunk[j])

    def step(self, predictor: Predictor, workers: list[int]) -> np.ndarray:
        """The env actions ``(num_envs, env_dim)`` of this step: the next queued one for ``workers``; the
        others (past their schedule: the vector env steps them all) repeat their last one, unpredicted."""
        for i in workers:
            self.last[i] = self.ensemblers[i].pop() if self.ensemblers else self.queues[i].pop(0)
        return predictor.to_env(np.stack(self.last)) if self.ensemblers else np.stack(self.last)

    def clear(self, i: int) -> None:
        """Drop worker ``i``'s queued actions (its episode ended, or it starts a new subtask)."""
        self.queues[i] = []
        if self.ensemblers:
            self.ensemblers[i].reset()


@dataclass(frozen=True)
class EvalTask:
    """One task of an evaluation.

    Attributes:
        name: how the task is reported (e.g. ``"drawer-open-v3"``).
        make_env: ``make_env(render_video=...) -> gym.Env``, picklable (e.g. a ``functools.partial``);
            observations are ``{"rgb": {cam: (H, W, 3) uint8}, "low_dim": (D,)}``.
        num_episodes: episodes of this task, over all processes.
        task: the dataset's id of this task (``batch["task"]``), for policies that know task ids;
            ``None`` for single-task data.
        lang: the instruction the policy is given, or ``None``.
        starts: one start per episode: a reset seed, or a dict of reset options (a saved initial
            state); ``None`` for the seeds ``Evaluator.seed, Evaluator.seed + 1, ...``.
    """

    name: str
    make_env: Callable[..., gym.Env]
    num_episodes: int
    task: int | None = None
    lang: str | None = None
    starts: tuple[Start, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_episodes < 1:
            raise ValueError(f"EvalTask {self.name!r}: num_episodes must be >= 1, got {self.num_episodes}")
        if self.starts is not None and len(self.starts) != self.num_episodes:
            raise ValueError(f"EvalTask {self.name!r} has {len(self.starts)} starts for {self.num_episodes} episodes; "
                             "give one start per episode")


@dataclass(kw_only=True)
class Evaluator:
    """Rollout settings.

    Attributes:
        tasks: what to evaluate; one ``EvalTask`` for a single-task benchmark.
        num_envs: parallel workers per process.
        obs_horizon: observation steps the policy sees.
        exec_start, exec_end: the slice of each predicted chunk that is executed.
        seed: the first evaluation seed of tasks without ``starts``. Keep it far from the seeds of
            the training demos.
        num_videos: rollouts saved as mp4 (from worker 0 of the main process).
        video_fps: frames per second of those videos.
        temporal_ensemble: ACT's ensembling coefficient (e.g. 0.01), or ``None`` to execute
            ``[exec_start, exec_end)`` of each chunk open-loop.
        step_timeout_s: a worker that takes longer than this over one step (or reset) is taken for
            hung, killed and restarted.
        max_worker_failures: failures of a worker on one episode (died or hung) that stop the
            evaluation with ``EvaluationError``; fewer are restarts, and the episode runs again.
    """

    tasks: list[EvalTask]
    num_envs: int
    obs_horizon: int
    exec_start: int
    exec_end: int
    seed: int = 100_000
    num_videos: int = 2
    video_fps: int = 20
    temporal_ensemble: float | None = None
    step_timeout_s: float = 120.0
    max_worker_failures: int = 3
    _venv: RestartingVecEnv | None = field(default=None, init=False, repr=False)
    _venv_key: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.exec_start < self.exec_end:
            raise ValueError(f"need 0 <= exec_start < exec_end, got [{self.exec_start}, {self.exec_end})")
        if not self.tasks:
            raise ValueError("an Evaluator needs at least one EvalTask")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"EvalTask names must be distinct, got {names}")
        if self.step_timeout_s <= 0 or self.max_worker_failures < 1:
            raise ValueError(f"need step_timeout_s > 0 and max_worker_failures >= 1, got {self.step_timeout_s} and "
                             f"{self.max_worker_failures}")

    @property
    def num_episodes(self) -> int:
        """Episodes in total, over all tasks and processes."""
        return sum(t.num_episodes for t in self.tasks)

    @property
    def execution(self) -> str:
        """How chunks are executed: ``"ensemble0.01"`` (temporal ensembling) or ``"chunk[1:9]"``."""
        if self.temporal_ensemble is not None:
            return f"ensemble{self.temporal_ensemble:g}"
        return f"chunk[{self.exec_start}:{self.exec_end}]"

    def check(self, task_names: list[str] | None, instructions: bool) -> None:
        """Refuse, before any training, tasks the policy cannot be evaluated on.

        ``task_names``: the dataset's tasks (``None`` for single-task data); ``instructions``:
        whether the policy was trained with instructions.
        """
        for t in self.tasks:
            if t.task is not None and (task_names is None or not 0 <= t.task < len(task_names)):
                seen = "none (single-task data)" if task_names is None else f"0..{len(task_names) - 1} ({', '.join(task_names)})"
                raise ValueError(f"EvalTask {t.name!r} has task id {t.task}, which the dataset never saw (its task ids: "
                                 f"{seen}); use the dataset's ids")
            if instructions and t.lang is None:
                raise ValueError(f"the policy is trained with instructions but EvalTask {t.name!r} has none; "
                                 "give every EvalTask its lang")

    def episodes(self) -> list[tuple[int, int, Start]]:
        """Every episode as ``(task index, episode index within the task, start)``, task by task."""
        out = []
        for k, t in enumerate(self.tasks):
            starts = t.starts if t.starts is not None else range(self.seed, self.seed + t.num_episodes)
            out += [(k, j, start) for j, start in enumerate(starts)]
        return out

    def close(self) -> None:
        if self._venv is not None:
            self._venv.close()
            self._venv = None

    def _workers(self, mine: list[tuple[int, int, Start]], videos: bool) -> tuple[RestartingVecEnv, list[list]]:
        """The vector env for this process's episodes (kept between evaluations) and each worker's schedule.

        Even a single worker runs in its own process, so that its death or hang cannot take this one with it.
        """
        num_envs = min(self.num_envs, len(mine))
        schedules = [mine[w::num_envs] for w in range(num_envs)]
        key = (tuple((k, j) for k, j, _ in mine), videos)
        if self._venv is None or self._venv_key != key:
            self.close()
            fns = [partial(ScheduledEnv, [partial(t.make_env, render_video=videos and w == 0) for t in self.tasks],
                           [(k, start) for k, _, start in schedule], video_episodes=self.num_videos)
                   for w, schedule in enumerate(schedules)]
            try:
                self._venv = make_vec_env(fns, timeout_s=self.step_timeout_s, max_failures=self.max_worker_failures)
            except WorkerError as e:
                raise self._error(e, schedules) from e
            self._venv_key = key
        return self._venv, schedules

    def _error(self, e: WorkerError, schedules: list[list]) -> EvaluationError:
        """``EvaluationError`` naming the task and start of the episode that worker ``e.worker`` kept failing on."""
        self.close()
        schedule = schedules[e.worker]
        k, j, start = schedule[min(e.episode, len(schedule) - 1)]
        named = f"seed {start}" if isinstance(start, int) else "a saved initial state"
        return EvaluationError(
            f"evaluation stopped: the env worker running {self.tasks[k].name!r} episode {j} ({named}) failed "
            f"{e.failures} time(s) in a row, last because {e.reason}; its own error, if any, is printed above "
            f"(Evaluator.max_worker_failures={self.max_worker_failures}, step_timeout_s={self.step_timeout_s:g})")

    def rollouts(self, predictor: Predictor, rank: int = 0, world: int = 1, video_dir: str | None = None,
                 progress: bool = True) -> list[dict]:
        """Run process ``rank``'s share (of ``world``) of the episodes; one record per episode (none for a
        process without episodes). Raises ``EvaluationError`` when a worker keeps failing on one episode."""
        mine = self.episodes()[rank::world]
        if not mine:
            return []
        venv, schedules = self._workers(mine, video_dir is not None and self.num_videos > 0)
        try:
            return self._run(predictor, venv, schedules, rank, len(mine), video_dir, progress)
        except WorkerError as e:
            raise self._error(e, schedules) from e

    def _run(self, predictor: Predictor, venv: RestartingVecEnv, schedules: list[list], rank: int, total: int,
             video_dir: str | None, progress: bool) -> list[dict]:
        num_envs = len(schedules)
        done_count = [0] * num_envs  # finished episodes of each worker
        obs = unflatten(venv.reset())
        restarts = [int("worker_restart" in info) for info in venv.reset_infos]  # of each worker's current episode
        # (num_envs, T_obs, ...): the newest observation last; a reset fills the whole window.
        history = new_history(obs, self.obs_horizon)
        actions = ChunkQueues(num_envs, self.exec_start, self.exec_end, self.temporal_ensemble)
        steps, score_max = np.zeros(num_envs, int), np.full(num_envs, -np.inf)
        coverage_max = np.full(num_envs, -np.inf)  # PushT's raw coverage, beside its clipped score
        frames: list[np.ndarray] = []
        records: list[dict] = []
        bar = tqdm(total=total, desc="eval", unit="episode", disable=not progress, leave=False)

        def running(i: int) -> bool:
            return done_count[i] < len(schedules[i])

        with predictor.autocast():  # open for the whole loop: weights are cast to bf16 once
            while any(running(i) for i in range(num_envs)):
                active = [i for i in range(num_envs) if running(i)]
                need = actions.needing(active)
                if need:
                    current = [self.tasks[schedules[i][done_count[i]][0]] for i in need]
                    actions.fill(predictor, window_of(history, need, current), need)
                flat_obs, rewards, dones, infos = venv.step(actions.step(predictor, active))
                obs = unflatten(flat_obs)
                steps += 1
                score_max = np.maximum(score_max, [info.get("score", r) for info, r in zip(infos, rewards)])
                coverage_max = np.maximum(coverage_max, [info.get("coverage", -np.inf) for info in infos])
                if "frame" in infos[0] and running(0) and _videos_done(records) < self.num_videos:
                    frames.append(infos[0]["frame"])
                push_history(history, obs)
                restarted = np.array(["worker_restart" in info for info in infos])
                for i in np.flatnonzero(dones | restarted):
                    if restarted[i]:  # a fresh worker: obs[i] is the interrupted episode's first observation again
                        restarts[i] += 1
                        if i == 0:
                            frames = []
                    elif running(i):
                        k, j, start = schedules[i][done_count[i]]
                        records.append({"task": self.tasks[k].name, "episode": j,
                                        "seed": start if isinstance(start, int) else None, "rank": rank, "env": int(i),
                                        "success": bool(infos[i].get("is_success", False)),
                                        "length": int(steps[i]), "max_score": float(score_max[i]),
                                        "restarts": restarts[i]})
                        if np.isfinite(coverage_max[i]):
                            records[-1]["max_coverage"] = float(coverage_max[i])
                        done_count[i] += 1
                        restarts[i] = 0
                        bar.update(1)
                        if i == 0 and frames and video_dir is not None:
                            name = f"{self.tasks[k].name}_episode{j}" if len(self.tasks) > 1 else f"rank{rank}_episode{j}"
                            _write_video(frames, video_dir, name, self.video_fps)
                            frames = []
                    steps[i], score_max[i], coverage_max[i] = 0, -np.inf, -np.inf
                    actions.clear(i)
                    reset_history(history, obs, i)  # obs[i] is already the next episode's first observation
        bar.close()
        return records


def new_history(obs: dict, horizon: int) -> dict:
    """First observations ``(n, ...)`` -> windows ``(n, horizon, ...)`` that repeat them (the newest is last).

    ``rgb`` stays a ``{camera: ...}`` dict.
    """
    if isinstance(obs, dict):
        return {k: new_history(v, horizon) for k, v in obs.items()}
    return np.repeat(obs[:, None], horizon, axis=1)


def push_history(history: dict, obs: dict) -> None:
    """Shift every window one step in place and append ``obs`` ``(n, ...)`` as the newest."""
    for k, h in history.items():
        if isinstance(h, dict):
            push_history(h, obs[k])
        else:
            h[:, :-1] = h[:, 1:]
            h[:, -1] = obs[k]


def reset_history(history: dict, obs: dict, i: int) -> None:
    """Fill worker ``i``'s whole window with its first observation ``obs[...][i]`` of a new episode."""
    for k, h in history.items():
        if isinstance(h, dict):
            reset_history(h, obs[k], i)
        else:
            h[i] = obs[k][i]


def window_of(history: dict, workers: list[int], tasks: Sequence[EvalTask] = ()) -> dict:
    """The policy's window for ``workers``: their histories, plus each one's task id and instruction
    from ``tasks`` (one per worker; none to leave them out)."""
    window = {k: ({cam: v[workers] for cam, v in h.items()} if isinstance(h, dict) else h[workers])
              for k, h in history.items()}
    if tasks and tasks[0].task is not None:
        window["task"] = np.array([t.task for t in tasks], dtype=np.int64)  # (n,)
    if tasks and tasks[0].lang is not None:
        window["lang"] = [t.lang for t in tasks]
    return window


def _to_device(tree, device: torch.device):
    """numpy arrays (in nested dicts) -> tensors on ``device``; strings and lists of strings pass through."""
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tree)).to(device)
    return tree


def _videos_done(records: list[dict]) -> int:
    return sum(r["env"] == 0 for r in records)


def _write_video(frames: list[np.ndarray], folder: str, name: str, fps: int) -> None:
    os.makedirs(folder, exist_ok=True)
    imageio.mimsave(os.path.join(folder, f"{name}.mp4"), frames, fps=fps, macro_block_size=1)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate, in percent (Wilson 1927), clipped to [0, 100]."""
    if n == 0:
        return 0.0, 100.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval contains p; rounding alone would put 50/50's upper bound at 99.99999999999999.
    return 100.0 * max(0.0, min(p, centre - half)), 100.0 * min(1.0, max(p, centre + half))


def _rates(records: list[dict]) -> dict:
    n, wins = len(records), sum(r["success"] for r in records)
    return {
        "success_rate": 100.0 * wins / n,
        "success_ci95": list(wilson_interval(wins, n)),
        "episodes": n,
        "mean_length": float(np.mean([r["length"] for r in records])),
        "mean_max_score": float(np.mean([r["max_score"] for r in records])),
        **({"mean_max_coverage": float(np.mean([r["max_coverage"] for r in records]))}
           if all("max_coverage" in r for r in records) else {}),
    }


def summarize(records: list[dict]) -> dict:
    """Over all episodes: success rate (%) with its 95% Wilson interval, episode count, mean length
    (steps), the mean of each episode's best score and the worker restarts; per task the same but
    restarts, and the mean of the tasks' success rates."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    per_task = {t: _rates([r for r in records if r["task"] == t]) for t in tasks}
    return {**_rates(records), "mean_task_success": float(np.mean([v["success_rate"] for v in per_task.values()])),
            "worker_restarts": sum(r.get("restarts", 0) for r in records),  # hand-made records may have none
            "tasks": per_task}


def format_table(summary: dict) -> str:
    """A per-task success table (plain text) of a ``summarize`` result."""
    rows = [(name, v) for name, v in summary["tasks"].items()] + [("all episodes", summary)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'task':<{width}}  success  95% CI          episodes  mean length"]
    for name, v in rows:
        lo, hi = v["success_ci95"]
        lines.append(f"{name:<{width}}  {v['success_rate']:6.1f}%  [{lo:5.1f}, {hi:5.1f}]%  {v['episodes']:8d}  "
                     f"{v['mean_length']:8.0f}")
    lines.append(f"{'mean over tasks':<{width}}  {summary['mean_task_success']:6.1f}%")
    return "\n".join(lines)


def save_results(summary: dict, records: list[dict], path: str) -> None:
    """``{"summary", "episodes"}`` to ``path`` as JSON, atomically."""
    write_json(path, {"summary": summary, "episodes": records})


if __name__ == "__main__":  # python -m mimictest.evaluate POLICY_DIR --episodes 50 (mimictest.hub)
    from mimictest.hub import evaluate_main

    evaluate_main()
