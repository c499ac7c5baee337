"""Evaluation helpers that need no simulator: ACT temporal ensembling on a hand-made sequence, and
the model -> env action mapping of whole chunks."""

import numpy as np
import pytest
import torch

from mimictest.evaluate import Predictor, TemporalEnsembler, summarize
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
    records = [{"success": True, "length": 10, "max_score": 1.0}, {"success": False, "length": 30, "max_score": 0.5}]
    assert summarize(records) == {"success_rate": 50.0, "episodes": 2, "mean_length": 20.0, "mean_max_score": 0.75}


def test_chunks_map_to_env_actions_as_their_steps_do():
    """Evaluation maps a whole (n, H, 10) chunk at once; it must equal mapping each step's (n, 10)."""
    stats = {"action": {"min": [-0.3, -0.3, 0.8, -3.0, -3.0, -3.0, -1.0], "max": [0.3, 0.3, 1.1, 3.0, 3.0, 3.0, 1.0]}}
    predictor = Predictor(torch.nn.Identity(), Preprocessor(stats, ActionSpace("axis_angle")), torch.device("cpu"))
    chunk = np.random.default_rng(0).uniform(-1, 1, (3, 8, 10)).astype(np.float32)  # (n, H, xyz + 6D + gripper)
    whole = predictor.to_env(chunk)
    assert whole.shape == (3, 8, 7)
    np.testing.assert_array_equal(whole, np.stack([predictor.to_env(chunk[:, h]) for h in range(8)], axis=1))
    assert np.all(whole[..., :3] >= np.array([-0.3, -0.3, 0.8]) - 1e-6) and np.all(whole[..., :3] <= np.array([0.3, 0.3, 1.1]) + 1e-6)
