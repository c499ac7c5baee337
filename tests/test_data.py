"""The robomimic reader and the shared windows, on tiny hand-built hdf5 files."""

import json
import os

import h5py
import numpy as np
import pytest

from mimictest.data.robomimic import RobomimicDataset
from mimictest.data.windows import WindowIndex

ENV_ARGS = {"env_name": "Lift", "type": 1, "env_kwargs": {"controller_configs": {"type": "OSC_POSE", "control_delta": False}}}


def write_tiny(path, lengths=(3, 5), first=0, image=True):
    """Demo k has actions[t] = [100 k + t] * 7 and low-dim obs 'a' = [k, t] so windows are checkable."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(ENV_ARGS)
        for k, n in enumerate(lengths):
            g = data.create_group(f"demo_{k + first}")
            t = np.arange(n)
            g.create_dataset("actions", data=np.repeat((100 * k + t)[:, None], 7, axis=1).astype(np.float64))
            g.create_dataset("obs/a", data=np.stack([np.full(n, k), t], axis=1).astype(np.float32))
            g.create_dataset("obs/b", data=np.ones((n, 3), np.float32))
            if image:
                g.create_dataset("obs/cam_image", data=np.broadcast_to((10 * k + t)[:, None, None, None], (n, 8, 8, 3)).astype(np.uint8))
            g.attrs["num_samples"] = n
        f.create_dataset("mask/valid", data=np.array([f"demo_{first}".encode()]))
    return path


def test_window_index_padding():
    idx = WindowIndex(np.array([3, 8]), obs_horizon=2, chunk_size=4)
    assert len(idx) == 8
    obs, act, pad = idx[0]  # first step of episode 0: history padded with step 0
    assert obs.tolist() == [0, 0] and act.tolist() == [0, 0, 1, 2] and pad.tolist() == [True, False, False, False]
    obs, act, pad = idx[2]  # last step of episode 0: future padded with step 2
    assert obs.tolist() == [1, 2] and act.tolist() == [1, 2, 2, 2] and pad.tolist() == [False, False, True, True]
    obs, act, pad = idx[4]  # second step of episode 1: never crosses into episode 0
    assert obs.tolist() == [3, 4] and act.tolist() == [3, 4, 5, 6] and not pad.any()


def test_window_index_pad_after_follows_diffusion_policy_sampler():
    """Diffusion Policy's SequenceSampler (pad_before = n_obs - 1, pad_after = n_action - 1) as windows."""
    ends, obs_horizon, chunk, pad_after = np.array([3, 8, 30]), 2, 4, 1
    idx = WindowIndex(ends, obs_horizon, chunk, pad_after=pad_after)
    assert len(idx) == 2 + 4 + 21  # each episode loses its last chunk - obs_horizon - pad_after = 1 step
    assert idx.episode.tolist() == [0] * 2 + [1] * 4 + [2] * 21
    obs, act, pad = idx[1]  # last sample of episode 0: t = 1, one padded action after the end
    assert obs.tolist() == [0, 1] and act.tolist() == [0, 1, 2, 2] and pad.tolist() == [False, False, False, True]
    obs, act, pad = idx[2]  # first sample of episode 1: history padded before its start
    assert obs.tolist() == [3, 3] and act.tolist() == [3, 3, 4, 5] and pad.tolist() == [True, False, False, False]
    # The same windows as the reference rule: sequence starts from -pad_before to L - chunk + pad_after.
    expected = []
    for lo, hi in zip((0, 3, 8), ends):
        for start in range(-(obs_horizon - 1), (hi - lo) - chunk + pad_after + 1):
            expected.append(np.clip(lo + start + np.arange(chunk), lo, hi - 1).tolist())
    assert [idx[i][1].tolist() for i in range(len(idx))] == expected
    assert max(int(idx[i][2][obs_horizon:].sum()) for i in range(len(idx))) == pad_after
    assert len(WindowIndex(ends, obs_horizon, chunk, pad_after=chunk - obs_horizon)) == len(WindowIndex(ends, obs_horizon, chunk))
    with pytest.raises(ValueError, match=r"pad_after must be in 0..2 \(chunk_size - obs_horizon = 4 - 2\), got 3"):
        WindowIndex(ends, obs_horizon, chunk, pad_after=3)
    with pytest.raises(ValueError, match="no episode is long enough for one window"):
        WindowIndex(np.array([2, 4]), 1, 8, pad_after=0)


@pytest.mark.parametrize("first", [0, 1])
@pytest.mark.parametrize("cache_images", [True, False])
def test_robomimic_windows(tmp_path, first, cache_images):
    path = write_tiny(str(tmp_path / "tiny.hdf5"), first=first)
    ds = RobomimicDataset(path, ["cam_image"], ["a", "b"], obs_horizon=2, chunk_size=4, cache_images=cache_images)
    assert len(ds) == 8 and ds.num_episodes == 2 and ds.image_size == {"cam_image": (8, 8)} and ds.absolute_actions
    assert ds.cams == ["cam_image"]
    item = ds[3]  # demo 1, t = 0
    assert item["action"].shape == (4, 7) and item["action"].dtype == np.float32
    assert item["action"][:, 0].tolist() == [100, 100, 101, 102]
    assert item["is_pad"].tolist() == [True, False, False, False]
    assert item["low_dim"].shape == (2, 5) and item["low_dim"][:, :2].tolist() == [[1, 0], [1, 0]]
    assert list(item["rgb"]) == ["cam_image"]
    assert item["rgb"]["cam_image"].shape == (2, 8, 8, 3) and item["rgb"]["cam_image"].dtype == np.uint8
    assert item["rgb"]["cam_image"][:, 0, 0, 0].tolist() == [10, 10]
    item = ds[7]  # demo 1, t = 4 (last)
    assert item["rgb"]["cam_image"][:, 0, 0, 0].tolist() == [13, 14]
    assert item["is_pad"].tolist() == [False, False, True, True]
    assert ds.stats["action"]["min"] == [0.0] * 7 and ds.stats["action"]["max"] == [104.0] * 7
    assert ds.stats["low_dim"]["max"] == [1.0, 4.0, 1.0, 1.0, 1.0]
    assert os.path.isfile(path + ".mimictest-stats.json")


def test_robomimic_pad_after_drops_windows_past_the_end(tmp_path):
    path = write_tiny(str(tmp_path / "tiny.hdf5"))
    ds = RobomimicDataset(path, [], ["a"], obs_horizon=2, chunk_size=4, pad_after=0)
    assert len(ds) == 1 + 3 and not any(ds[i]["is_pad"][2:].any() for i in range(len(ds)))
    assert ds[0]["action"][:, 0].tolist() == [0, 0, 1, 2] and ds[1]["low_dim"][:, 0].tolist() == [1, 1]


def test_meanstd_normalization_is_acts(tmp_path):
    """ACT's get_norm_stats: (x - mean) / clip(std, 1e-2, 10) for actions and low-dim; 6D columns untouched."""
    import torch

    from mimictest.preprocess import ActionSpace, Preprocessor

    path = write_tiny(str(tmp_path / "tiny.hdf5"), lengths=(30, 50))
    ds = RobomimicDataset(path, [], ["a", "b"], obs_horizon=1, chunk_size=1)
    action, low_dim = torch.from_numpy(ds.action), torch.from_numpy(ds.low_dim)  # (N, 7), (N, 5)
    pre = Preprocessor(ds.stats, ActionSpace(None, "absolute", env_dim=7), normalization="meanstd")
    std = np.clip(ds.low_dim.std(0), 1e-2, 10)  # 'b' is constant: its std is clipped to 0.01
    np.testing.assert_allclose(pre.normalize_low_dim(low_dim).numpy(), (ds.low_dim - ds.low_dim.mean(0)) / std, atol=1e-5)
    normed = pre.normalize_action(action)
    assert ds.action.std(0).min() > 10  # ACT clips a std above 10 as well
    np.testing.assert_allclose(normed.numpy(), (ds.action - ds.action.mean(0)) / 10.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pre.unnormalize_action(normed).numpy(), ds.action, rtol=1e-5)
    space = ActionSpace("axis_angle", "absolute")
    minmax, meanstd = Preprocessor(ds.stats, space), Preprocessor(ds.stats, space, normalization="meanstd")
    for pre in (minmax, meanstd):
        assert pre.action_centre[3:9].tolist() == [0.0] * 6 and pre.action_half[3:9].tolist() == [1.0] * 6
    assert meanstd.action_centre[[0, 9]].tolist() == pytest.approx([ds.action[:, 0].mean()] * 2)
    assert minmax.action_centre[[0, 9]].tolist() == pytest.approx([(ds.action[:, 0].min() + ds.action[:, 0].max()) / 2] * 2)
    with pytest.raises(ValueError, match=r"normalization must be one of \('minmax', 'meanstd'\), got 'zscore'"):
        Preprocessor(ds.stats, space, normalization="zscore")
    with pytest.raises(ValueError, match=r"needs the action statistics \['mean', 'std'\], but they have only \['max', 'min'\]"):
        Preprocessor({"action": {"min": [0.0] * 7, "max": [1.0] * 7}}, space, normalization="meanstd")


def test_filter_key_and_stats_cache(tmp_path):
    path = write_tiny(str(tmp_path / "tiny.hdf5"))
    ds = RobomimicDataset(path, [], ["a"], obs_horizon=1, chunk_size=2, filter_key="valid")
    assert ds.num_episodes == 1 and len(ds) == 3
    cache = json.load(open(path + ".mimictest-stats.json"))
    assert set(cache["keys"]) == {"actions", "obs/a"}
    with pytest.raises(KeyError, match="no filter mask/train; available filters: \\['valid'\\]"):
        RobomimicDataset(path, [], ["a"], 1, 2, filter_key="train")


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="robomimic dataset not found"):
        RobomimicDataset(str(tmp_path / "missing.hdf5"), [], ["a"], 2, 4)
    path = write_tiny(str(tmp_path / "tiny.hdf5"))
    with pytest.raises(KeyError, match=r"no observation key\(s\) \['agentview_image'\].*available keys: \['a', 'b', 'cam_image'\]"):
        RobomimicDataset(path, ["agentview_image"], ["a"], 2, 4)
    with pytest.raises(ValueError, match=r"has 8x8 cam_image images but the script expects 84x84; set IMAGE_SIZE = \(8, 8\)"):
        RobomimicDataset(path, ["cam_image"], [], 2, 4, image_size=(84, 84))
    with pytest.raises(ValueError, match="has 8x8 cam_image images but the script expects 84x84"):
        RobomimicDataset(path, ["cam_image"], [], 2, 4, image_size={"cam_image": (84, 84)})
    with h5py.File(path, "a") as f:
        f["data/demo_1/obs/a"][2, 0] = np.nan
    os.utime(path, (0, 12345))  # the cache is keyed on mtime: make sure the edit is seen
    with pytest.raises(ValueError, match=r"data/demo_1/obs/a contains 1 NaN/inf value\(s\), the first at step 2, dim 0"):
        RobomimicDataset(path, [], ["a"], 2, 4)


def test_script_without_dataset_says_where_to_get_it(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "Script", "DiffusionUNetImageSquare.py")
    out = subprocess.run([sys.executable, os.path.abspath(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset not found: 'Datasets/robomimic/square/ph/image_abs.hdf5'" in lines[0]
    assert "Diffusion Policy data release" in lines[0]


def test_controller_is_absolute_reads_legacy_and_both_composite_layouts():
    from mimictest.data.robomimic import controller_is_absolute

    assert controller_is_absolute({"type": "OSC_POSE", "control_delta": False})
    assert not controller_is_absolute({"type": "OSC_POSE", "control_delta": True})
    arm = {"type": "OSC_POSE", "input_type": "absolute"}
    assert controller_is_absolute({"type": "BASIC", "body_parts": {"right": arm}})
    assert controller_is_absolute({"type": "BASIC", "body_parts": {"arms": {"right": arm}}})
    assert not controller_is_absolute({"type": "BASIC", "body_parts": {"arms": {"right": {**arm, "input_type": "delta"}}}})
