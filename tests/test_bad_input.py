"""The bad-input suite: each broken dataset gives a one-line error saying what was expected and how
to fix it, and the reader writes nothing (every file's bytes and mtime are unchanged, none added).

Cases: a raw robosuite ``demo.hdf5`` (no ``env_args``, no ``obs/``), a converted one whose
observations were never extracted, a demo without ``actions``, a truncated hdf5 (robomimic and
ALOHA), a zarr whose ``meta/episode_ends`` disagrees with its arrays, and NaN in the data that
batches are drawn from. (A checkpoint from another script is tested with the training loop.)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from mimictest.data.aloha import AlohaDataset
from mimictest.data.pusht import PushTDataset
from mimictest.data.pusht_writer import PushTZarrWriter
from mimictest.data.robomimic import RobomimicDataset
from mimictest.data.robomimic_writer import RobomimicWriter
from mimictest.envs.pusht import block_keypoints

ROBOSUITE_141_LIFT = Path(__file__).parent / "data" / "robosuite141_lift.json.gz"
LIFT_ACTION = [0.3, 0.0, -0.2, 0.0, 0.0, 0.0, -1.0]  # the action each recorded 1.4.1 step applied
ENV_ARGS = {"env_name": "Lift", "type": 1, "env_kwargs": {"controller_configs": {"type": "OSC_POSE", "control_delta": True}}}
KEYS = ["robot0_eef_pos", "object"]


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """``{relative path: (size, mtime_ns, sha256)}`` of every file under ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = (path.stat().st_size, path.stat().st_mtime_ns,
                                                  hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def refused(folder: Path, error: type[Exception], pattern: str, read) -> str:
    """Run ``read()``; it must raise ``error`` matching ``pattern`` in one line and leave ``folder`` as it was."""
    before = snapshot(folder)
    with pytest.raises(error, match=pattern) as info:
        read()
    message = str(info.value)
    assert "\n" not in message, message
    assert snapshot(folder) == before, "the reader wrote or changed a file"
    return message


def write_robomimic(path: Path, lengths: tuple[int, ...] = (6, 9)) -> Path:
    """A robomimic low-dim file through the project's writer: demo k has actions[t] = 0.01 * (k + t)."""
    with RobomimicWriter(str(path), ENV_ARGS, valid_fraction=0.0) as writer:
        for k, n in enumerate(lengths):
            t = np.arange(n, dtype=np.float64)[:, None]
            writer.add_demo(obs={"robot0_eef_pos": np.tile(t, 3), "object": np.tile(t + k, 10)},
                            actions=np.tile(0.01 * (k + t), 7), states=np.zeros((n, 32)), rewards=np.zeros(n),
                            dones=np.zeros(n), model_xml="<mujoco/>")
    return path


def test_raw_robosuite_demo_names_both_robomimic_steps(tmp_path: Path) -> None:
    """The layout of robosuite's collect_human_demonstrations.py, with a real robosuite 1.4.1 recording."""
    with gzip.open(ROBOSUITE_141_LIFT, "rt") as fh:
        recording = json.load(fh)
    states = np.asarray(recording["states"])[:-1]  # (10, 32): the state before each of the 10 actions
    path = tmp_path / "demo.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs.update(date="12-02-2026", time="00:00:00", repository_version=recording["robosuite_version"],
                          env=recording["env_name"], env_info=json.dumps({"robots": "Panda"}))
        demo = data.create_group("demo_1")
        demo.attrs["model_file"] = recording["model_xml"]
        demo.create_dataset("states", data=states)
        demo.create_dataset("actions", data=np.tile(LIFT_ACTION, (len(states), 1)))
    message = refused(tmp_path, ValueError, "is a raw robosuite demo.hdf5",
                      lambda: RobomimicDataset(str(path), [], KEYS, obs_horizon=2, chunk_size=8))
    assert f"convert_robosuite.py --dataset {path}" in message
    assert f"dataset_states_to_obs.py --dataset {path} --output_name low_dim.hdf5 --done_mode 2" in message
    # After robomimic's convert_robosuite.py (env_args added) the observations are still missing.
    with h5py.File(path, "a") as f:
        f["data"].attrs["env_args"] = json.dumps(ENV_ARGS)
        del f["data"].attrs["env"]
    message = refused(tmp_path, KeyError, r"data/demo_1 \(1 of 1 demos\) has no obs/ group, only \['actions', 'states'\]",
                      lambda: RobomimicDataset(str(path), [], KEYS, obs_horizon=2, chunk_size=8))
    assert "robomimic's observation extraction was not run; run `python robomimic/scripts/dataset_states_to_obs.py" in message


def test_missing_actions(tmp_path: Path) -> None:
    path = write_robomimic(tmp_path / "low_dim.hdf5")
    with h5py.File(path, "a") as f:
        del f["data/demo_1/actions"]
    refused(tmp_path, KeyError, r"1 of 2 demos have no 'actions' dataset \(first: data/demo_1, which holds "
                                r"\['dones', 'obs', 'rewards', 'states'\]\)",
            lambda: RobomimicDataset(str(path), [], KEYS, obs_horizon=2, chunk_size=8))


def test_truncated_hdf5(tmp_path: Path) -> None:
    path = write_robomimic(tmp_path / "low_dim.hdf5")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)  # an interrupted download
    refused(tmp_path, OSError, r"low_dim.hdf5' is not a readable hdf5 file \(.*truncated file.*\); is the download complete\?",
            lambda: RobomimicDataset(str(path), [], KEYS, obs_horizon=2, chunk_size=8))
    folder = tmp_path / "aloha"
    folder.mkdir()
    for i in range(2):  # ACT's episode_<i>.hdf5 layout, low-dim only
        with h5py.File(folder / f"episode_{i}.hdf5", "w") as f:
            f.attrs["sim"] = True
            f.create_dataset("action", data=np.zeros((20, 14)))
            f.create_dataset("observations/qpos", data=np.zeros((20, 14)))
            f.create_dataset("observations/qvel", data=np.zeros((20, 14)))
    episode = folder / "episode_1.hdf5"
    with open(episode, "r+b") as fh:
        fh.truncate(os.path.getsize(episode) - 100)
    refused(tmp_path, OSError, r"episode_1.hdf5' is not a readable hdf5 file \(.*\); regenerate or re-download it",
            lambda: AlohaDataset(str(folder), [], obs_horizon=1, chunk_size=10))


def write_pusht(path: Path, lengths: tuple[int, ...] = (12, 15)) -> Path:
    """A PushT replay buffer through the project's writer (the block slides along x, the disc follows)."""
    with PushTZarrWriter(str(path), image_dtype="uint8") as writer:
        for n in lengths:
            t = np.arange(n, dtype=np.float64)
            state = np.stack([100 + t, 200 + t, 256 + t, 300 + 0 * t, 0 * t], axis=1)  # (T, 5)
            writer.add_episode(img=np.zeros((n, 96, 96, 3), np.uint8), state=state,
                               keypoint=np.stack([block_keypoints(s[2:]) for s in state]), action=state[:, :2] + 5)
    return path


def test_zarr_with_mismatched_episode_ends(tmp_path: Path) -> None:
    path = write_pusht(tmp_path / "pusht.zarr")
    ends = zarr.open_group(str(path), mode="r+")["meta/episode_ends"]
    ends[-1] = 30  # the data has 27 rows
    message = refused(tmp_path, ValueError, r"meta/episode_ends does not match data/action \(episode_ends ends at 30 but "
                                            r"the data has 27 steps",
                      lambda: PushTDataset(str(path), "keypoint", obs_horizon=2, chunk_size=8))
    assert "re-copy the dataset, or generate demos with `python -m mimictest.demos pusht" in message
    ends[:] = [15, 12]
    refused(tmp_path, ValueError, "episode_ends must be strictly increasing and every episode non-empty",
            lambda: PushTDataset(str(path), "keypoint", obs_horizon=2, chunk_size=8))


def test_nan_is_refused_with_its_key_and_index(tmp_path: Path) -> None:
    path = write_robomimic(tmp_path / "low_dim.hdf5")
    with h5py.File(path, "a") as f:
        f["data/demo_1/actions"][4, 2] = np.nan
    refused(tmp_path, ValueError, r"data/demo_1/actions contains 1 NaN/inf value\(s\), the first at step 4, dim 2; "
                                  "remove or repair that demo",
            lambda: RobomimicDataset(str(path), [], KEYS, obs_horizon=2, chunk_size=8))
    zarr_path = write_pusht(tmp_path / "pusht.zarr")  # refused by the windows, on every load whatever the stats cache
    zarr.open_group(str(zarr_path), mode="r+")["data/keypoint"][14, 3, 1] = np.inf  # episode 1, step 2
    refused(tmp_path, ValueError, r"pusht.zarr': low_dim holds 1 NaN/inf value\(s\), the first at episode 1, step 2, "
                                  r"dim 7 \(flat row 14\)",
            lambda: PushTDataset(str(zarr_path), "keypoint", obs_horizon=2, chunk_size=8))

