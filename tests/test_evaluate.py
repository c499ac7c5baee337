"""Evaluation helpers that need no simulator: ACT temporal ensembling on a hand-made sequence, and
the model -> env action mapping of whole chunks."""

import numpy as np
import pytest
import torch

from mimictest.evaluate import (
    EvalTask,
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
    assert summary == {**lift, "mean_task_success": 50.0}


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
