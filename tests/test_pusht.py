"""PushT end to end without downloads: expert -> zarr writer -> reader windows, and the env's
observations against the expert's recorded rows (real gym-pusht)."""

import os
import pickle
from functools import partial

import numpy as np
import pymunk
import pytest
import zarr

from mimictest.data.pusht import CAMERA, PushTDataset
from mimictest.data.pusht_writer import PushTZarrWriter
from mimictest.demos.__main__ import main as demos_main
from mimictest.demos.pusht import generate_pusht_demos, pose_error
from mimictest.envs.pusht import BLOCK_KEYPOINTS, GOAL_POSE, PushTEnv, block_keypoints, import_gym_pusht
from mimictest.envs.vector import ScheduledEnv, make_vec_env, unflatten

SEED = 3


@pytest.fixture(scope="module")
def expert_zarr(tmp_path_factory):
    """Two expert episodes (seeds SEED, SEED + 1), float32 images like pusht_cchi_v7_replay.zarr."""
    path = str(tmp_path_factory.mktemp("pusht") / "expert.zarr")
    stats = generate_pusht_demos(path, episodes=2, seed=SEED, keep_failures=True)
    assert stats["saved"] == 2 and stats["episodes"] == 2 and 0.0 <= stats["mean_max_coverage"] <= 1.0
    return path, stats


@pytest.fixture(scope="module")
def uint8_zarr(expert_zarr, tmp_path_factory):
    """The same episodes rewritten with uint8 images."""
    path = str(tmp_path_factory.mktemp("pusht") / "uint8.zarr")
    root = zarr.open_group(expert_zarr[0], mode="r")
    ends = root["meta/episode_ends"][:]
    with PushTZarrWriter(path, image_dtype="uint8") as writer:
        for lo, hi in zip(np.concatenate(([0], ends[:-1])), ends):
            writer.add_episode(**{k: root[f"data/{k}"][lo:hi] for k in ("img", "state", "keypoint", "action")})
    return path


def _copy_without(src, dst, drop=None, truncate=None):
    """Copy a replay buffer, leaving out the array ``drop`` and cutting ``truncate`` to 5 rows."""
    root, out = zarr.open_group(src, mode="r"), zarr.open_group(dst, mode="w")
    for name in ("data/img", "data/state", "data/keypoint", "data/action", "meta/episode_ends"):
        if name != drop:
            value = root[name][:]
            out.create_dataset(name, data=value[:5] if name == truncate else value)
    return dst


def test_block_keypoints_reproduce_diffusion_policy():
    """diffusion_policy's PymunkKeypointManager: farthest-point samples of the drawn T, rng seed 0."""
    gym_env = import_gym_pusht()
    import pygame
    from gym_pusht.envs.pymunk_override import DrawOptions

    space = pymunk.Space()
    body, _ = gym_env.add_tee(space, (256, 300), 0)
    screen = pygame.Surface((512, 512))
    screen.fill(pygame.Color("white"))
    space.debug_draw(DrawOptions(screen))
    mask = (pygame.surfarray.array3d(screen).transpose(1, 0, 2) != 255).any(-1)
    ys, xs = np.nonzero(mask)
    points = np.stack([xs, ys], axis=1) - np.array(body.position)  # body angle is 0
    rng = np.random.default_rng(0)
    chosen = [points[rng.choice(len(points))]]
    for _ in range(8):
        distance = np.linalg.norm(points[:, None] - np.array(chosen)[None], axis=-1).min(1)
        chosen.append(points[np.argmax(distance)])
    expected = np.array(chosen) + rng.uniform(0, 1, size=(9, 2))
    np.testing.assert_allclose(BLOCK_KEYPOINTS, expected, atol=1e-6)
    np.testing.assert_allclose(block_keypoints([10.0, 20.0, np.pi / 2])[0], [10.0 - 90.04097352, 20.0 + 9.26978671])


def test_expert_writes_valid_replay_buffer(expert_zarr):
    path, stats = expert_zarr
    root = zarr.open_group(path, mode="r")
    ends = root["meta/episode_ends"][:]
    n = int(ends[-1])
    assert ends.dtype == np.int64 and len(ends) == 2 and stats["mean_length"] == n / 2
    assert root["data/img"].shape == (n, 96, 96, 3) and root["data/img"].dtype == np.float32
    assert root["data/state"].shape == (n, 5) and root["data/keypoint"].shape == (n, 9, 2)
    assert root["data/action"].shape == (n, 2)
    assert all(root[f"data/{k}"].dtype == np.float32 for k in ("state", "keypoint", "action"))
    img, state, action = root["data/img"][:], root["data/state"][:], root["data/action"][:]
    assert img.min() >= 0 and img.max() == 255 and np.array_equal(img, np.rint(img))
    assert (action >= 0).all() and (action <= 512).all()
    kp = np.stack([block_keypoints(s[2:]) for s in state])
    np.testing.assert_allclose(root["data/keypoint"][:], kp, atol=1e-3)
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")], "temp folder left behind"
    if stats["successes"] == 2:
        assert pose_error(np.array([*state[-1, 2:4], state[-1, 4]])) < 15.0


@pytest.mark.parametrize("cache_images", [True, False])
def test_reader_image_windows(expert_zarr, uint8_zarr, cache_images):
    path = expert_zarr[0]
    root = zarr.open_group(path, mode="r")
    ends = root["meta/episode_ends"][:]
    ds = PushTDataset(path, "image", obs_horizon=2, chunk_size=16, cache_images=cache_images)
    ds8 = PushTDataset(uint8_zarr, "image", obs_horizon=2, chunk_size=16, cache_images=cache_images)
    assert len(ds) == ends[-1] and ds.num_episodes == 2 and ds.image_size == (96, 96) and ds.low_dim_dim == 2
    assert CAMERA == "image" and ds.cams == [CAMERA]
    first = int(ends[0])
    item = ds[first]  # episode 1, t = 0: history and the first action padded
    assert list(item["rgb"]) == [CAMERA]
    image = item["rgb"][CAMERA]
    assert image.shape == (2, 96, 96, 3) and image.dtype == np.uint8
    assert np.array_equal(image[0], root["data/img"][first].astype(np.uint8))
    assert np.array_equal(image[0], image[1])
    assert item["low_dim"].shape == (2, 2) and item["low_dim"].dtype == np.float32
    np.testing.assert_array_equal(item["low_dim"][1], root["data/state"][first, :2])
    assert item["action"].shape == (16, 2) and item["is_pad"].tolist() == [True] + [False] * 15
    np.testing.assert_array_equal(item["action"][1:], root["data/action"][first : first + 15])
    last = ds[first - 1]  # episode 0, last step: the chunk runs past the end and is padded
    assert last["is_pad"].tolist() == [False, False] + [True] * 14
    np.testing.assert_array_equal(last["action"][2:], np.repeat(root["data/action"][first - 1 : first], 14, 0))
    for i in (0, first - 1, first, len(ds) - 1):
        assert all(np.array_equal(ds[i][k], ds8[i][k]) for k in ("low_dim", "action", "is_pad"))
        assert list(ds8[i]["rgb"]) == [CAMERA] and np.array_equal(ds[i]["rgb"][CAMERA], ds8[i]["rgb"][CAMERA])
    action = root["data/action"][:]
    np.testing.assert_allclose(ds.stats["action"]["min"], action.min(0), rtol=1e-6)
    np.testing.assert_allclose(ds.stats["low_dim"]["max"], root["data/state"][:, :2].max(0), rtol=1e-6)
    assert os.path.isfile(path + ".mimictest-stats.json")
    assert pickle.loads(pickle.dumps(ds))[3]["rgb"][CAMERA].shape == (2, 96, 96, 3)


def test_reader_keypoint_windows(expert_zarr):
    path = expert_zarr[0]
    root = zarr.open_group(path, mode="r")
    ds = PushTDataset(path, "keypoint", obs_horizon=2, chunk_size=8)
    assert ds.low_dim_dim == 20 and ds.image_size is None and ds.cams == []
    item = ds[5]
    assert set(item) == {"action", "is_pad", "low_dim"} and item["low_dim"].shape == (2, 20)
    np.testing.assert_array_equal(item["low_dim"][1, :18], root["data/keypoint"][5].ravel())
    np.testing.assert_array_equal(item["low_dim"][1, 18:], root["data/state"][5, :2])
    assert len(ds.stats["low_dim"]["min"]) == 20 and len(ds.stats["action"]["max"]) == 2
    short = PushTDataset(path, "keypoint", obs_horizon=2, chunk_size=8, pad_after=1)  # 8 - 2 - 1 steps fewer per episode
    assert len(short) == len(ds) - 5 * ds.num_episodes and short[0]["low_dim"].shape == (2, 20)


@pytest.mark.parametrize("obs_mode", ["image", "keypoint"])
def test_env_observations_match_dataset(expert_zarr, obs_mode):
    """Replaying episode 0's actions reproduces its recorded observations exactly."""
    path = expert_zarr[0]
    ds = PushTDataset(path, obs_mode, obs_horizon=1, chunk_size=1)
    steps = int(ds.episode_ends[0])
    env = PushTEnv(obs_mode, max_episode_steps=steps, render_video=True, video_size=128)
    obs, info = env.reset(seed=SEED)
    assert info["frame"].shape == (128, 128, 3) and info["frame"].dtype == np.uint8
    for t in range(steps):
        assert env.observation_space.contains(obs) and set(obs) == set(env.observation_space.spaces)
        assert obs["low_dim"].dtype == np.float32 and (obs["low_dim"] >= 0).all() and (obs["low_dim"] <= 512).all()
        row = ds[t]
        np.testing.assert_array_equal(obs["low_dim"], row["low_dim"][0])
        if obs_mode == "image":
            assert list(obs["rgb"]) == [CAMERA]
            assert obs["rgb"][CAMERA].shape == (96, 96, 3) and obs["rgb"][CAMERA].dtype == np.uint8
            assert np.array_equal(obs["rgb"][CAMERA], row["rgb"][CAMERA][0])
        obs, reward, terminated, truncated, info = env.step(row["action"][0])
        assert 0.0 <= info["coverage"] <= 1.0 and info["is_success"] == terminated == (info["coverage"] > 0.95)
        assert info["score"] == reward == min(info["coverage"] / 0.95, 1.0)  # gym-pusht's reward is the score
        assert not terminated or (t == steps - 1 and info["score"] == 1.0), "the expert stops recording at success"
    assert truncated
    env.close()


def test_env_in_forked_workers():
    make_env = partial(PushTEnv, "image", max_episode_steps=3)
    fns = [partial(ScheduledEnv, [partial(pickle.loads(pickle.dumps(make_env)), render_video=False)], [(0, 100_000 + i)])
           for i in range(2)]
    venv = make_vec_env(fns)
    try:
        obs = unflatten(venv.reset())
        assert list(obs["rgb"]) == [CAMERA]
        assert obs["rgb"][CAMERA].shape == (2, 96, 96, 3) and obs["low_dim"].shape == (2, 2)
        assert not np.array_equal(obs["low_dim"][0], obs["low_dim"][1]), "workers should have different seeds"
        alone = PushTEnv("image", max_episode_steps=3)
        reference, _ = alone.reset(seed=100_001)
        alone.close()
        np.testing.assert_array_equal(obs["low_dim"][1], reference["low_dim"])  # the scheduled seed
        np.testing.assert_array_equal(obs["rgb"][CAMERA][1], reference["rgb"][CAMERA])
        for _ in range(3):
            obs, _, dones, infos = venv.step(np.tile(GOAL_POSE[:2], (2, 1)))
        assert dones.all() and all(info["TimeLimit.truncated"] or info["is_success"] for info in infos)
    finally:
        venv.close()


def test_worker_renders_only_its_video_episodes():
    """A worker made with render_video renders frames in its first video_episodes episodes only, again after a rewind."""
    env = ScheduledEnv([partial(PushTEnv, "keypoint", max_episode_steps=2, render_video=True)],
                       [(0, 100_000 + i) for i in range(3)], video_episodes=2)
    try:
        framed = []
        for _ in range(3):
            env.reset()
            framed.append("frame" in env.step(GOAL_POSE[:2])[4])
        env.rewind()
        env.reset()
        framed.append("frame" in env.step(GOAL_POSE[:2])[4])
        assert framed == [True, True, False, True]
    finally:
        env.close()


def test_bad_datasets_raise_clear_errors(expert_zarr, tmp_path):
    path = expert_zarr[0]
    with pytest.raises(FileNotFoundError, match="mimictest.demos pusht"):
        PushTDataset(str(tmp_path / "missing.zarr"), "image", 2, 16)
    no_ends = _copy_without(path, str(tmp_path / "no_ends.zarr"), drop="meta/episode_ends")
    with pytest.raises(KeyError, match="meta/episode_ends"):
        PushTDataset(no_ends, "image", 2, 16)
    short = _copy_without(path, str(tmp_path / "short.zarr"), truncate="data/action")
    with pytest.raises(ValueError, match="episode_ends does not match data/action"):
        PushTDataset(short, "keypoint", 2, 16)
    no_img = _copy_without(path, str(tmp_path / "no_img.zarr"), drop="data/img")
    with pytest.raises(KeyError, match=r"no data/img \(N, H, W, 3\)"):
        PushTDataset(no_img, "image", 2, 16)
    with pytest.raises(ValueError, match="obs_mode"):
        PushTDataset(path, "pixels", 2, 16)
    scaled = str(tmp_path / "scaled.zarr")
    _copy_without(path, scaled)
    img = zarr.open_group(scaled, mode="r+")["data/img"]
    img[:] = img[:] / 255.0
    with pytest.raises(ValueError, match="multiply them by 255"):
        PushTDataset(scaled, "image", 2, 16)


def test_writer_refuses_overwrite_and_cleans_up(expert_zarr, tmp_path):
    path = str(tmp_path / "w.zarr")
    episode = {"img": np.full((3, 96, 96, 3), 255, np.uint8), "state": np.zeros((3, 5)),
               "keypoint": np.zeros((3, 9, 2)), "action": np.zeros((3, 2))}
    with PushTZarrWriter(path) as writer:
        writer.add_episode(**episode)
    with pytest.raises(FileExistsError, match="overwrite"):
        PushTZarrWriter(path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        demos_main(["pusht", "--episodes", "1", "--out", path])
    with pytest.raises(ValueError, match="same number"):
        with PushTZarrWriter(path, overwrite=True) as writer:
            writer.add_episode(**{**episode, "action": np.zeros((2, 2))})
    assert zarr.open_group(path, mode="r")["meta/episode_ends"][:].tolist() == [3], "a failed write keeps the old data"
    with PushTZarrWriter(path, overwrite=True) as writer:
        writer.add_episode(**episode)
        writer.add_episode(**episode)
    assert zarr.open_group(path, mode="r")["meta/episode_ends"][:].tolist() == [3, 6]
    assert sorted(os.listdir(tmp_path)) == ["w.zarr"]
