"""ALOHA sim: the scripted experts, the ACT-format reader and the env (real gym-aloha scenes, small images)."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import pickle
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest

from mimictest.data.aloha import AlohaDataset
from mimictest.demos.__main__ import main as demos_main
from mimictest.demos.aloha import generate_aloha_demos
from mimictest.envs.aloha import TASKS, AlohaEnv
from mimictest.envs.vector import ScheduledEnv, make_vec_env, unflatten

SIZE = (48, 64)


@pytest.fixture(scope="module", params=TASKS)
def expert(request, tmp_path_factory) -> tuple[str, str, dict]:
    """One rendered expert episode (seed 0) per task."""
    folder = str(tmp_path_factory.mktemp("aloha") / request.param)
    stats = generate_aloha_demos(request.param, folder, episodes=1, seed=0, cams=("top",), image_size=SIZE)
    return request.param, folder, stats


def test_expert_files_are_act_format_and_match_the_env(expert) -> None:
    task, folder, stats = expert
    assert stats["successes"] == 1 and stats["success_rate"] == 1.0
    with h5py.File(os.path.join(folder, "episode_0.hdf5"), "r") as f:
        assert f.attrs["sim"]
        assert f["observations/qpos"].shape == f["observations/qvel"].shape == f["action"].shape == (400, 14)
        assert f["observations/images/top"].shape == (400, *SIZE, 3)
        assert f["observations/images/top"].dtype == np.uint8

    ds = AlohaDataset(folder, ["top"], obs_horizon=2, chunk_size=10, image_size=SIZE)
    assert len(ds) == 400 and ds.num_episodes == 1 and ds.image_size == SIZE and ds.low_dim_dim == 14
    assert ds.cams == ["top"]
    assert set(ds.stats) == {"action", "low_dim"} and len(ds.stats["action"]["mean"]) == 14
    assert os.path.isfile(folder + ".mimictest-stats.json")
    item = ds[0]
    assert list(item["rgb"]) == ["top"]
    assert item["rgb"]["top"].shape == (2, *SIZE, 3) and item["low_dim"].shape == (2, 14)
    assert item["action"].shape == (10, 14) and item["is_pad"].tolist() == [True] + [False] * 9

    env = AlohaEnv(task, cams=("top",), image_size=SIZE)
    obs, info = env.reset(seed=0)  # the expert's episode 0 used seed 0
    assert env.observation_space.contains(obs) and info == {"is_success": False, "score": 0.0}
    assert list(obs["rgb"]) == ["top"]
    assert obs["rgb"]["top"].shape == item["rgb"]["top"].shape[1:] and obs["rgb"]["top"].dtype == item["rgb"]["top"].dtype
    assert obs["low_dim"].shape == item["low_dim"].shape[1:] and obs["low_dim"].dtype == item["low_dim"].dtype
    np.testing.assert_array_equal(obs["low_dim"], item["low_dim"][-1])
    np.testing.assert_array_equal(obs["rgb"]["top"], item["rgb"]["top"][-1])
    env.close()

    # The recorded actions replayed in a fresh env with the same seed reproduce the success.
    replay = AlohaEnv(task, cams=())
    replay.reset(seed=0)
    success = False
    for action in ds.action:
        obs, reward, terminated, truncated, info = replay.step(action)
        if terminated:
            success = info["is_success"] and info["score"] == 1.0 and reward == 4.0
            break
    replay.close()
    assert success


def test_reader_without_cache_gives_the_same_items(expert) -> None:
    _, folder, _ = expert
    cached = AlohaDataset(folder, ["top"], obs_horizon=2, chunk_size=5)
    lazy = AlohaDataset(folder, ["top"], obs_horizon=2, chunk_size=5, cache_images=False)
    lazy = pickle.loads(pickle.dumps(lazy))  # as a DataLoader worker receives it
    for i in (0, 1, 217, 399):
        assert list(cached[i]["rgb"]) == list(lazy[i]["rgb"]) == ["top"]
        np.testing.assert_array_equal(cached[i]["rgb"]["top"], lazy[i]["rgb"]["top"])


def test_env_spaces_seeding_truncation_and_video() -> None:
    env = AlohaEnv("insertion", cams=("top", "angle"), image_size=(24, 32), max_episode_steps=3, render_video=True,
                   video_size=(30, 40))
    obs, info = env.reset(seed=7)
    assert env.observation_space.contains(obs) and list(obs["rgb"]) == ["top", "angle"]
    assert all(image.shape == (24, 32, 3) for image in obs["rgb"].values())
    assert not np.array_equal(obs["rgb"]["top"], obs["rgb"]["angle"]), "each camera renders its own view"
    assert info["frame"].shape == (30, 40, 3) and info["frame"].dtype == np.uint8
    pose = env.object_pose
    assert pose.shape == (14,)
    env.reset(seed=7)
    np.testing.assert_array_equal(env.object_pose, pose)
    env.reset(seed=8)
    assert not np.allclose(env.object_pose, pose)

    def poses_after_seeding() -> list[np.ndarray]:
        """Placements of two unseeded resets after reset(seed=1), as a vector env's auto-resets run."""
        env.reset(seed=1)
        poses = []
        for _ in range(2):
            env.reset()
            poses.append(env.object_pose)
        return poses

    first = poses_after_seeding()
    np.testing.assert_array_equal(poses_after_seeding(), first)
    assert not np.allclose(first[0], first[1])

    hold = obs["low_dim"].astype(np.float64)
    for step in range(3):
        obs, reward, terminated, truncated, info = env.step(hold)
        assert env.observation_space.contains(obs) and not terminated and truncated == (step == 2)
        assert 0.0 <= info["score"] <= 1.0 and "frame" in info
    with pytest.raises(ValueError, match=r"action must be \(14,\)"):
        env.step(np.zeros(7))
    env.close()

    with pytest.raises(ValueError, match="unknown ALOHA task"):
        AlohaEnv("pick_place")
    with pytest.raises(ValueError, match=r"unknown camera\(s\) \['wrist'\].*available cameras"):
        AlohaEnv("transfer_cube", cams=("wrist",))


def test_env_runs_in_forked_workers() -> None:
    make_env = partial(AlohaEnv, "transfer_cube", cams=("top",), image_size=(24, 32), max_episode_steps=5)
    make_env = pickle.loads(pickle.dumps(make_env))
    in_parent = make_env()
    in_parent.reset(seed=0)  # this process renders before forking, as a script that first records demos does
    venv = make_vec_env([partial(ScheduledEnv, [make_env], [(0, seed)]) for seed in (3, 4)])
    try:
        obs = unflatten(venv.reset())
        assert list(obs["rgb"]) == ["top"]
        assert obs["rgb"]["top"].shape == (2, 24, 32, 3) and obs["low_dim"].shape == (2, 14)
        obs, _, dones, infos = venv.step(np.repeat(obs["low_dim"][:1], 2, axis=0))
        obs = unflatten(obs)
        assert obs["rgb"]["top"].dtype == np.uint8 and not dones.any() and all("is_success" in i for i in infos)
    finally:
        venv.close()
        in_parent.close()


def _write_episode(path: Path, cams: list[str], size: tuple[int, int] = (8, 8), steps: int = 5) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["sim"] = True
        f["action"] = np.zeros((steps, 14), np.float32)
        f["observations/qpos"] = np.zeros((steps, 14), np.float32)
        f["observations/qvel"] = np.zeros((steps, 14), np.float32)
        for cam in cams:
            f[f"observations/images/{cam}"] = np.zeros((steps, *size, 3), np.uint8)


def _episode_folder(folder: Path, cams_by_episode: dict[int, list[str]]) -> Path:
    """A folder with ``episode_<i>.hdf5`` for each ``i`` given, recording those cameras."""
    folder.mkdir()
    for i, cams in cams_by_episode.items():
        _write_episode(folder / f"episode_{i}.hdf5", cams)
    return folder


def test_reader_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        AlohaDataset(str(tmp_path / "missing"), ["top"], 1, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no episode_<i>\.hdf5 files"):
        AlohaDataset(str(empty), ["top"], 1, 4)

    mixed = _episode_folder(tmp_path / "mixed", {0: ["top"], 1: ["angle"]})
    with pytest.raises(ValueError, match=r"different cameras.*\['top'\].*\['angle'\]"):
        AlohaDataset(str(mixed), ["top"], 1, 4)

    good = _episode_folder(tmp_path / "good", {0: ["top"], 1: ["top"]})
    with pytest.raises(KeyError, match=r"no camera\(s\) \['angle'\].*it has \['top'\]"):
        AlohaDataset(str(good), ["angle"], 1, 4)
    with pytest.raises(ValueError, match=r"8x8 images but 48x64 are expected"):
        AlohaDataset(str(good), ["top"], 1, 4, image_size=(48, 64))
    assert AlohaDataset(str(good), [], 1, 4).image_size is None

    gap = _episode_folder(tmp_path / "gap", {0: ["top"], 2: ["top"]})
    with pytest.raises(ValueError, match=r"numbered 0..N-1.*\[1\]"):
        AlohaDataset(str(gap), ["top"], 1, 4)

    broken = tmp_path / "broken"
    broken.mkdir()
    with h5py.File(broken / "episode_0.hdf5", "w") as f:
        f["observations/qpos"] = np.zeros((5, 14))
    with pytest.raises(KeyError, match=r"no \['action'\]"):
        AlohaDataset(str(broken), [], 1, 4)


def test_cli_low_dim_demos_and_overwrite(tmp_path: Path) -> None:
    out = str(tmp_path / "cube")
    demos_main(["aloha-transfer-cube", "--episodes", "1", "--out", out, "--cams"])
    ds = AlohaDataset(out, [], obs_horizon=1, chunk_size=100)
    assert len(ds) == 400 and "rgb" not in ds[0] and ds.image_size is None
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_aloha_demos("transfer_cube", out, episodes=1, cams=())
    stats = generate_aloha_demos("transfer_cube", out, episodes=1, seed=1, cams=(), overwrite=True)
    assert stats["successes"] == 1 and sorted(os.listdir(out)) == ["episode_0.hdf5"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")], "no temporary folder is left behind"
