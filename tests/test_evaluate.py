"""The evaluation loop against a small scripted env, and its helpers.

- ``ScriptedEnv`` is a real gymnasium env with scripted dynamics (its episode lengths and
  successes follow from the seed) that logs every action it receives to a file, and ``StepPolicy``
  a policy whose chunks say which step of the chunk they are and when they were predicted. Together
  they check the episode quota, the executed slice ``[exec_start, exec_end)``, the observation
  history and its reset at done, per-task records, temporal ensembling with coefficient 0, and that
  videos decode with one frame per step. ``tests/test_worker_faults.py`` kills and hangs its workers.
- ACT temporal ensembling on a hand-made sequence, and the model -> env action mapping of whole chunks.
"""

import os
from functools import partial

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from mimictest.evaluate import (
    EvalTask,
    Evaluator,
    Predictor,
    TemporalEnsembler,
    format_table,
    new_history,
    push_history,
    reset_history,
    summarize,
    window_of,
)
from mimictest.preprocess import ActionSpace, Preprocessor

FRAME = 16  # side of ScriptedEnv's video frames


class ScriptedEnv(gym.Env):
    """An episode of seed ``s`` lasts ``base + s % 4`` steps and succeeds when ``s`` is even.

    Observations: ``low_dim = (step t, seed)``. ``info["score"]`` is ``t``, ``info["frame"]`` (with
    ``render_video``) a ``(16, 16, 3)`` frame of grey level ``20 t``. With ``log_dir``, every run of
    an episode appends a ``reset`` line, then one ``t a0 a1`` line per executed action, to
    ``<log_dir>/<seed>.txt`` (a worker past its schedule runs its last episode again).
    """

    def __init__(self, base: int = 3, render_video: bool = False, log_dir: str | None = None) -> None:
        self.observation_space = gym.spaces.Dict({"low_dim": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)})
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.base, self.render_video, self.log_dir = base, render_video, log_dir

    def _obs(self) -> dict:
        return {"low_dim": np.array([self.t, self.seed], dtype=np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        self.seed, self.t = seed, 0
        self.length = self.base + seed % 4
        if self.log_dir is not None:
            with open(os.path.join(self.log_dir, f"{seed}.txt"), "a") as fh:
                fh.write("reset\n")
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        if self.log_dir is not None:
            with open(os.path.join(self.log_dir, f"{self.seed}.txt"), "a") as fh:
                fh.write(f"{self.t} {action[0]:g} {action[1]:g}\n")
        self.t += 1
        done = self.t == self.length
        info = {"is_success": done and self.seed % 2 == 0, "score": float(self.t)}
        if self.render_video:
            info["frame"] = np.full((FRAME, FRAME, 3), 20 * self.t, dtype=np.uint8)
        return self._obs(), 0.0, done, False, info


class StepPolicy(torch.nn.Module):
    """``predict``: row ``h`` of every chunk is ``(h, t)``, ``t`` the newest observation's first value (the
    step, in ``ScriptedEnv``); keeps every window."""

    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.chunk = chunk
        self.windows: list[np.ndarray] = []  # (B, T_obs, 2) each

    def predict(self, batch: dict) -> torch.Tensor:
        low_dim = batch["low_dim"]  # (B, T_obs, D), unchanged by the identity statistics below
        self.windows.append(low_dim.numpy().copy())
        h = torch.arange(self.chunk, dtype=torch.float32).expand(len(low_dim), -1)  # (B, chunk)
        return torch.stack([h, low_dim[:, -1, 0, None].expand(-1, self.chunk)], dim=-1)  # (B, chunk, 2)


def step_predictor(chunk: int = 6, low_dim: int = 2) -> Predictor:
    stats = {"action": {"min": [-1.0] * 2, "max": [1.0] * 2}, "low_dim": {"min": [-1.0] * low_dim, "max": [1.0] * low_dim}}
    return Predictor(StepPolicy(chunk), Preprocessor(stats, ActionSpace(None, env_dim=2)), torch.device("cpu"))


def executed(log_dir, seed: int) -> np.ndarray:
    """``(steps, 3)``: ``t, a0, a1`` of every action the first run of the episode of ``seed`` executed."""
    with open(os.path.join(log_dir, f"{seed}.txt")) as fh:
        first = fh.read().split("reset\n")[1]
    return np.loadtxt(first.splitlines(), ndmin=2)


def outcomes(records: list[dict]) -> dict:
    return {(r["task"], r["episode"]): (r["seed"], r["success"], r["length"], r["max_score"]) for r in records}


def test_loop_runs_the_quota_executes_the_slice_and_resets_histories(tmp_path):
    make = partial(ScriptedEnv, log_dir=str(tmp_path))
    tasks = [EvalTask("short", partial(make, base=3), 3), EvalTask("long", partial(make, base=5), 2, starts=(7, 8))]
    evaluator = Evaluator(tasks=tasks, num_envs=2, obs_horizon=2, exec_start=1, exec_end=4, num_videos=0)
    predictor = step_predictor(chunk=6)
    records = evaluator.rollouts(predictor, progress=False)
    evaluator.close()

    expected = {("short", j): (100_000 + j, j % 2 == 0, 3 + j, 3.0 + j) for j in range(3)}
    expected |= {("long", j): (s, s % 2 == 0, 5 + s % 4, 5.0 + s % 4) for j, s in enumerate((7, 8))}
    assert len(records) == 5 and outcomes(records) == expected
    assert all(r["restarts"] == 0 for r in records)
    summary = summarize(records)
    assert summary["worker_restarts"] == 0 and summary["episodes"] == 5
    assert {t: v["episodes"] for t, v in summary["tasks"].items()} == {"short": 3, "long": 2}
    assert summary["tasks"]["short"]["success_rate"] == pytest.approx(200 / 3)  # seeds 100000 and 100002 of 3

    for seed, length in [(100_000, 3), (100_001, 4), (100_002, 5), (7, 8), (8, 5)]:
        log = executed(tmp_path, seed)
        t = np.arange(length)
        np.testing.assert_array_equal(log[:, 0], t)
        # Chunks predicted at t = 0, 3, 6 from that step's observation; steps 1, 2, 3 of each are executed.
        np.testing.assert_array_equal(log[:, 1], 1 + t % 3)
        np.testing.assert_array_equal(log[:, 2], 3 * (t // 3))

    windows = np.concatenate(predictor.policy.windows)  # (predictions, T_obs=2, (t, seed))
    assert len(windows) == sum(-(-length // 3) for length in (3, 4, 5, 8, 5))  # one per 3 executed steps
    newest = windows[:, -1, 0]
    np.testing.assert_array_equal(windows[:, 0, 0], np.maximum(newest - 1, 0))  # the step before, or t = 0 repeated
    np.testing.assert_array_equal(windows[:, 0, 1], windows[:, 1, 1])  # never a step of the previous episode
    assert sorted(windows[newest == 0, 0, 1].tolist()) == [7, 8, 100_000, 100_001, 100_002]  # each episode's start


def test_ranks_without_episodes_return_nothing_and_the_gathered_summary_counts_all():
    tasks = [EvalTask("short", ScriptedEnv, 3)]
    gathered = []
    for rank in range(5):  # 3 episodes over 5 processes: ranks 3 and 4 have none
        evaluator = Evaluator(tasks=tasks, num_envs=2, obs_horizon=1, exec_start=0, exec_end=2, num_videos=0)
        records = evaluator.rollouts(step_predictor(), rank=rank, world=5, progress=False)
        evaluator.close()
        assert len(records) == (1 if rank < 3 else 0)
        gathered += records
    summary = summarize(gathered)
    assert summary["episodes"] == 3 and summary["worker_restarts"] == 0
    assert sorted(r["seed"] for r in gathered) == [100_000, 100_001, 100_002]


def test_temporal_ensemble_zero_averages_every_prediction(tmp_path):
    tasks = [EvalTask("long", partial(ScriptedEnv, base=5, log_dir=str(tmp_path)), 1, starts=(2,))]  # 7 steps
    evaluator = Evaluator(tasks=tasks, num_envs=1, obs_horizon=1, exec_start=0, exec_end=3, num_videos=0,
                          temporal_ensemble=0.0)
    assert evaluator.execution == "ensemble0"
    records = evaluator.rollouts(step_predictor(chunk=6), progress=False)
    evaluator.close()
    assert records[0]["length"] == 7
    log = executed(tmp_path, 2)
    for t in range(7):  # the chunks predicted at t' = t-2 .. t hold (t - t', t') for step t, weighed equally
        predicted_at = np.arange(max(0, t - 2), t + 1)
        assert log[t, 1:] == pytest.approx([np.mean(t - predicted_at), np.mean(predicted_at)]), t
    assert log[1, 2] == 0.5  # plain chunking would execute 0, the chunk of step 0


def test_videos_decode_with_one_frame_per_step(tmp_path):
    tasks = [EvalTask("short", ScriptedEnv, 4)]
    evaluator = Evaluator(tasks=tasks, num_envs=2, obs_horizon=1, exec_start=0, exec_end=2, num_videos=2, video_fps=10)
    records = evaluator.rollouts(step_predictor(), video_dir=str(tmp_path), progress=False)
    evaluator.close()
    lengths = {r["episode"]: r["length"] for r in records}
    assert sorted(os.listdir(tmp_path)) == ["rank0_episode0.mp4", "rank0_episode2.mp4"]  # worker 0's first two
    for j in (0, 2):
        frames = iio.imread(tmp_path / f"rank0_episode{j}.mp4")
        assert frames.shape == (lengths[j], FRAME, FRAME, 3)
        grey = frames.reshape(len(frames), -1).mean(1)  # 20, 40, ... after lossy coding
        np.testing.assert_allclose(grey, 20 * np.arange(1, lengths[j] + 1), atol=4)


def test_temporal_ensembling_weights_oldest_first():
    ens = TemporalEnsembler(coeff=0.5)
    w = np.exp(-0.5 * np.arange(3))
    for t in range(3):  # the chunk predicted at step t holds 10 t + (0, 1, 2) for steps t, t+1, t+2
        ens.add(np.array([[10.0 * t], [10.0 * t + 1], [10.0 * t + 2]]))
        got = ens.pop()
        expected = {0: 0.0, 1: (1 * w[0] + 10 * w[1]) / w[:2].sum(), 2: (2 * w[0] + 11 * w[1] + 20 * w[2]) / w.sum()}[t]
        assert got.shape == (1,) and got[0] == pytest.approx(expected)
    assert len(ens.chunks) == 2  # the chunk from step 0 is used up
    ens.reset()
    with pytest.raises(RuntimeError):
        ens.pop()


def test_summarize_units():
    records = [{"task": "lift", "success": True, "length": 10, "max_score": 1.0},
               {"task": "lift", "success": False, "length": 30, "max_score": 0.5}]
    summary = summarize(records)
    lift = {"success_rate": 50.0, "episodes": 2, "mean_length": 20.0, "mean_max_score": 0.75}
    ci = summary.pop("success_ci95")
    assert ci == pytest.approx([9.4531, 90.5469], abs=1e-3)  # Wilson's 95% interval of 1 in 2
    assert summary.pop("tasks") == {"lift": {**lift, "success_ci95": ci}}
    assert summary == {**lift, "mean_task_success": 50.0, "worker_restarts": 0}
    records[0]["restarts"], records[1]["restarts"] = 2, 1
    assert summarize(records)["worker_restarts"] == 3


def test_summarize_over_tasks():
    records = [{"task": "lift", "success": True, "length": 10, "max_score": 1.0},
               {"task": "lift", "success": False, "length": 30, "max_score": 0.5},
               {"task": "can", "success": True, "length": 20, "max_score": 1.0}]
    summary = summarize(records)
    assert list(summary["tasks"]) == ["lift", "can"]  # in order of first appearance
    assert summary["success_rate"] == pytest.approx(200 / 3) and summary["episodes"] == 3
    assert summary["mean_length"] == 20.0 and summary["mean_max_score"] == pytest.approx(2.5 / 3)
    assert summary["mean_task_success"] == 75.0  # the mean of 50% and 100%, not the pooled 66.7%
    assert summary["success_ci95"] == pytest.approx([20.766, 93.851], abs=1e-3)
    can = summary["tasks"]["can"]
    assert can["success_rate"] == 100.0 and can["episodes"] == 1 and can["success_ci95"] == pytest.approx([20.655, 100.0], abs=1e-3)
    table = format_table(summary)
    lines = table.splitlines()
    assert [line.split("  ")[0].strip() for line in lines[1:]] == ["lift", "can", "all episodes", "mean over tasks"]
    assert "100.0%" in lines[2] and "75.0%" in lines[-1]


def test_histories_keep_each_cameras_window():
    """The evaluation window: nested per-camera rgb, newest step last, reset per worker, picked per worker."""
    def obs(t):  # two workers; worker i's observation at step t is 10 i + t everywhere
        v = 10 * np.arange(2) + t
        return {"rgb": {"top": np.broadcast_to(v[:, None, None, None], (2, 4, 6, 3)).astype(np.uint8),
                        "wrist": np.broadcast_to(v[:, None, None, None], (2, 2, 2, 3)).astype(np.uint8)},
                "low_dim": v[:, None].astype(np.float32)}

    history = new_history(obs(0), horizon=3)
    assert set(history["rgb"]) == {"top", "wrist"}
    assert history["rgb"]["top"].shape == (2, 3, 4, 6, 3) and history["rgb"]["wrist"].shape == (2, 3, 2, 2, 3)
    assert history["low_dim"].shape == (2, 3, 1)
    push_history(history, obs(1))
    push_history(history, obs(2))
    assert history["rgb"]["top"][:, :, 0, 0, 0].tolist() == [[0, 1, 2], [10, 11, 12]]
    assert history["rgb"]["wrist"][:, :, 0, 0, 0].tolist() == [[0, 1, 2], [10, 11, 12]]
    reset_history(history, obs(5), 1)  # worker 1 starts a new episode; worker 0 is untouched
    assert history["low_dim"][:, :, 0].tolist() == [[0, 1, 2], [15, 15, 15]]
    assert history["rgb"]["wrist"][:, :, 0, 0, 0].tolist() == [[0, 1, 2], [15, 15, 15]]

    plain = EvalTask("lift", make_env=None, num_episodes=1)
    window = window_of(history, [1], [plain])
    assert set(window) == {"rgb", "low_dim"} and window["rgb"]["top"].shape == (1, 3, 4, 6, 3)
    assert window["rgb"]["top"][0, :, 0, 0, 0].tolist() == [15, 15, 15]
    tasks = [EvalTask("a", None, 1, task=3, lang="open"), EvalTask("b", None, 1, task=1, lang="close")]
    window = window_of(history, [0, 1], tasks)
    assert window["task"].tolist() == [3, 1] and window["task"].dtype == np.int64 and window["lang"] == ["open", "close"]


def test_chunks_map_to_env_actions_as_their_steps_do():
    """Evaluation maps a whole (n, H, 10) chunk at once; it must equal mapping each step's (n, 10)."""
    stats = {"action": {"min": [-0.3, -0.3, 0.8, -3.0, -3.0, -3.0, -1.0], "max": [0.3, 0.3, 1.1, 3.0, 3.0, 3.0, 1.0]}}
    predictor = Predictor(torch.nn.Identity(), Preprocessor(stats, ActionSpace("axis_angle")), torch.device("cpu"))
    chunk = np.random.default_rng(0).uniform(-1, 1, (3, 8, 10)).astype(np.float32)  # (n, H, xyz + 6D + gripper)
    whole = predictor.to_env(chunk)
    assert whole.shape == (3, 8, 7)
    np.testing.assert_array_equal(whole, np.stack([predictor.to_env(chunk[:, h]) for h in range(8)], axis=1))
    assert np.all(whole[..., :3] >= np.array([-0.3, -0.3, 0.8]) - 1e-6) and np.all(whole[..., :3] <= np.array([0.3, 0.3, 1.1]) + 1e-6)
