"""Meta-World: the env, Meta-World's scripted experts writing DP3's zarr layout, and the multi-task
reader (real Meta-World 3.1.1 scenes, 32x32 images)."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import pickle
import shutil
from functools import partial

import numpy as np
import pytest

metaworld = pytest.importorskip("metaworld", reason="Meta-World is in the [sim] extra: pip install -e '.[sim]'")
zarr = pytest.importorskip("zarr")

from mimictest.data.metaworld import MetaWorldDataset, zarr_name  # noqa: E402
from mimictest.demos.__main__ import main as demos_main  # noqa: E402
from mimictest.demos.metaworld import generate_metaworld_demos  # noqa: E402
from mimictest.envs.metaworld import (  # noqa: E402
    CAMERAS, INSTRUCTIONS, MT10_TASKS, MetaWorldEnv, instruction,
)
from mimictest.envs.vector import ScheduledEnv, make_vec_env, unflatten  # noqa: E402

TASKS = ["drawer-open-v3", "reach-v3"]
CAMS = ("corner", "topview")
SIZE = (32, 32)


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> tuple[str, dict]:
    """Two expert episodes of two tasks, two cameras (seeds 0, 1, ...)."""
    folder = str(tmp_path_factory.mktemp("metaworld") / "mt2")
    summary = generate_metaworld_demos(folder, tasks=TASKS, episodes_per_task=2, cams=CAMS, image_size=SIZE)
    return folder, summary


def test_task_names_instructions_and_cameras_are_metaworlds() -> None:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3

    assert MT10_TASKS == list(MT10_V3)
    assert sorted(INSTRUCTIONS) == sorted(ALL_V3_ENVIRONMENTS) and len(INSTRUCTIONS) == 50
    assert len(set(INSTRUCTIONS.values())) == 50 and all(text.islower() for text in INSTRUCTIONS.values())
    assert instruction("drawer-open-v3") == "open the drawer"
    with pytest.raises(ValueError, match=r"unknown Meta-World task 'drawer-open-v2'.*'assembly-v3'"):
        instruction("drawer-open-v2")
    env = MetaWorldEnv("reach-v3", cams=())
    model = env.raw.model
    assert tuple(model.camera(i).name for i in range(model.ncam)) == CAMERAS
    env.close()


def test_env_observations_spaces_actions_and_truncation() -> None:
    env = MetaWorldEnv("push-v3", cams=("corner", "gripperPOV"), image_size=(24, 40), max_episode_steps=3,
                       render_video=True, video_size=64)
    space = env.observation_space
    assert set(space.spaces) == {"rgb", "low_dim"} and list(space["rgb"].spaces) == ["corner", "gripperPOV"]
    assert space["rgb"]["corner"].shape == (24, 40, 3) and space["rgb"]["corner"].dtype == np.uint8
    assert space["low_dim"].shape == (4,) and space["low_dim"].dtype == np.float32
    assert env.action_space.shape == (4,) and (env.action_space.low == -1).all() and (env.action_space.high == 1).all()
    obs, info = env.reset(seed=7)
    assert space.contains(obs) and set(obs["rgb"]) == {"corner", "gripperPOV"}
    assert info["frame"].shape == (64, 64, 3) and info["frame"].dtype == np.uint8 and not info["is_success"]
    full = env.full_state
    assert full.shape == (39,) and np.array_equal(obs["low_dim"], full[:4].astype(np.float32))
    assert 0.0 <= obs["low_dim"][3] <= 1.0 and np.abs(full[-3:]).sum() > 0, "gripper opening, observable goal"
    np.testing.assert_allclose(env.robot_state()[:3], full[:3])
    obs2, reward, terminated, truncated, info = env.step(np.array([5.0, -5.0, 0.0, 1.0]))  # clipped to [-1, 1]
    clipped = MetaWorldEnv("push-v3", cams=(), max_episode_steps=3)
    clipped.reset(seed=7)
    obs_c = clipped.step(np.array([1.0, -1.0, 0.0, 1.0]))[0]
    np.testing.assert_array_equal(obs2["low_dim"], obs_c["low_dim"])
    assert set(obs_c) == {"low_dim"} and set(clipped.observation_space.spaces) == {"low_dim"}
    assert 0.0 <= info["score"] <= 1.0 and info["score"] == pytest.approx(reward / 10)
    assert not terminated and not truncated
    env.step(np.zeros(4))
    assert env.step(np.zeros(4))[3], "truncated after max_episode_steps"
    with pytest.raises(ValueError, match=r"\(4,\)"):
        env.step(np.zeros(3))
    env.close()
    clipped.close()
    with pytest.raises(ValueError, match=r"unknown Meta-World camera\(s\) \['front'\]; the cameras are \['topview'"):
        MetaWorldEnv("push-v3", cams=("front",))


def test_reset_seed_fixes_the_start() -> None:
    env = MetaWorldEnv("pick-place-v3", cams=("corner",), image_size=SIZE)
    starts = []
    for seed in (3, 3, 4):
        obs, _ = env.reset(seed=seed)
        for _ in range(3):
            obs = env.step(np.array([0.5, 0.2, -0.3, 1.0]))[0]
        starts.append((env.full_state, obs["rgb"]["corner"]))
    assert np.array_equal(starts[0][0], starts[1][0]) and np.array_equal(starts[0][1], starts[1][1])
    assert np.abs(starts[0][0][4:7] - starts[2][0][4:7]).max() > 1e-3, "another seed moves the puck"
    assert np.abs(starts[0][0][-3:] - starts[2][0][-3:]).max() > 1e-3, "and the goal"
    env.close()


@pytest.mark.parametrize("cam", ["corner", "topview"])
def test_images_are_upright_and_not_mirrored(cam) -> None:
    """A blue marker on the goal appears where an upright pinhole camera at the camera's pose sees it."""
    size = (64, 64)
    env = MetaWorldEnv("reach-v3", cams=(cam,), image_size=size)
    env.reset(seed=0)
    model, data = env.raw.model, env.raw.data
    goal = model.site("goal").id
    model.site_rgba[goal] = (0.0, 0.0, 1.0, 1.0)
    model.site_size[goal] = 0.03
    image = env.render_camera(cam, size).astype(int)
    blue = (image[..., 2] > 150) & (image[..., 0] < 80) & (image[..., 1] < 80)
    assert blue.sum() >= 4, "the marker should be visible"
    rows, cols = np.nonzero(blue)
    axes = data.camera(cam).xmat.reshape(3, 3)  # columns: the camera's x (right), y (up), z (backwards)
    right, up, back = axes[:, 0], axes[:, 1], axes[:, 2]
    if up[2] < 0:  # an upright camera at the same place: up towards the sky
        right, up = -right, -up
    offset = data.site_xpos[goal] - data.camera(cam).xpos
    depth = -offset @ back
    focal = size[0] / 2 / np.tan(np.deg2rad(model.camera(cam).fovy[0]) / 2)
    expected_col = size[1] / 2 + focal * (offset @ right) / depth
    expected_row = size[0] / 2 - focal * (offset @ up) / depth
    assert abs(cols.mean() + 0.5 - expected_col) < 2 and abs(rows.mean() + 0.5 - expected_row) < 2
    env.close()


def test_expert_writes_dp3_layout(demos) -> None:
    folder, summary = demos
    entries = os.listdir(folder)
    assert all(zarr_name(t) in entries for t in TASKS)
    assert not [e for e in entries if e.startswith(".")], "no temporary folder left behind"
    assert summary["episodes"] == 4 and set(summary["tasks"]) == set(TASKS)
    for task in TASKS:
        stats = summary["tasks"][task]
        assert stats["successes"] == 2 and stats["attempts"] >= 2 and stats["success_rate"] == 2 / stats["attempts"]
        root = zarr.open_group(os.path.join(folder, zarr_name(task)), mode="r")
        ends = root["meta/episode_ends"][:]
        n = int(ends[-1])
        assert ends.dtype == np.int64 and len(ends) == 2
        assert root["data/img"].shape == root["data/img_topview"].shape == (n, *SIZE, 3)
        assert root["data/img"].dtype == np.uint8 and root["data/img"].chunks[0] == 100
        assert root["data/state"].shape == (n, 9) and root["data/full_state"].shape == (n, 39)
        assert root["data/action"].shape == (n, 4)
        assert all(root[f"data/{k}"].dtype == np.float32 for k in ("state", "full_state", "action"))
        assert root["data/action"].compressor.cname == "zstd"
        attrs = dict(root.attrs)
        assert attrs["task"] == task and attrs["instruction"] == INSTRUCTIONS[task]
        assert attrs["cams"] == list(CAMS) and attrs["image_size"] == list(SIZE)
        assert attrs["metaworld_version"] == "3.1.1" and len(attrs["episode_seeds"]) == 2
        assert max(attrs["episode_seeds"]) < 100_000


def test_episode_replays_to_success_with_the_recorded_observations(demos) -> None:
    folder, _ = demos
    root = zarr.open_group(os.path.join(folder, zarr_name("drawer-open-v3")), mode="r")
    first = int(root["meta/episode_ends"][0])
    full_state, action = root["data/full_state"][:first], root["data/action"][:first]
    corner, topview = root["data/img"][:first], root["data/img_topview"][:first]
    env = MetaWorldEnv("drawer-open-v3", cams=CAMS, image_size=SIZE)
    obs, _ = env.reset(seed=root.attrs["episode_seeds"][0])
    for t in range(first):
        np.testing.assert_array_equal(env.full_state.astype(np.float32), full_state[t])
        assert np.array_equal(obs["rgb"]["corner"], corner[t]) and np.array_equal(obs["rgb"]["topview"], topview[t])
        obs, _, terminated, _, info = env.step(action[t])
        assert terminated == info["is_success"] == (t == first - 1), "the episode ends at its first success"
    env.close()


@pytest.mark.parametrize("cache_images", [True, False])
def test_reader_concatenates_tasks_with_ids_and_instructions(demos, cache_images) -> None:
    folder, _ = demos
    tasks = ["reach-v3", "drawer-open-v3"]  # ids follow this order, not the files'
    ds = MetaWorldDataset(folder, tasks, ["topview", "corner"], obs_horizon=2, chunk_size=8, cache_images=cache_images)
    roots = [zarr.open_group(os.path.join(folder, zarr_name(t)), mode="r") for t in tasks]
    lengths = [len(r["data/action"]) for r in roots]
    assert len(ds) == sum(lengths) and ds.num_episodes == 4 and ds.task_names == tasks
    assert ds.episode_task.tolist() == [0, 0, 1, 1] and ds.low_dim_dim == 4
    assert ds.image_sizes == {"topview": SIZE, "corner": SIZE}
    assert ds.action_space.rotation is None and ds.action_space.mode == "relative" and ds.action_space.env_dim == 4
    assert ds.episode_lang == [INSTRUCTIONS["reach-v3"]] * 2 + [INSTRUCTIONS["drawer-open-v3"]] * 2
    i = lengths[0] + 5  # drawer-open, episode 0, t = 5
    item = ds[i]
    assert set(item) == {"action", "is_pad", "low_dim", "rgb", "task", "lang"}
    assert item["task"] == 1 and item["task"].dtype == np.int64 and item["lang"] == "open the drawer"
    assert list(item["rgb"]) == ["topview", "corner"] and item["rgb"]["corner"].shape == (2, *SIZE, 3)
    assert np.array_equal(item["rgb"]["corner"][1], roots[1]["data/img"][5])
    assert np.array_equal(item["rgb"]["topview"][0], roots[1]["data/img_topview"][4])
    np.testing.assert_array_equal(item["low_dim"][1], roots[1]["data/full_state"][5, :4])
    np.testing.assert_array_equal(item["action"], roots[1]["data/action"][4:12])
    assert not item["is_pad"].any() and ds[0]["task"] == 0 and ds[0]["is_pad"][0]
    action = np.concatenate([r["data/action"][:] for r in roots])
    low_dim = np.concatenate([r["data/full_state"][:, :4] for r in roots])
    for key, values in (("action", action), ("low_dim", low_dim)):
        np.testing.assert_allclose(ds.stats[key]["min"], values.min(0), rtol=1e-6)
        np.testing.assert_allclose(ds.stats[key]["max"], values.max(0), rtol=1e-6)
        np.testing.assert_allclose(ds.stats[key]["mean"], values.mean(0, dtype=np.float64), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ds.stats[key]["std"], values.std(0, dtype=np.float64), rtol=1e-4, atol=1e-6)
    assert os.path.isfile(os.path.join(folder, zarr_name("reach-v3")) + ".mimictest-stats.json")
    again = pickle.loads(pickle.dumps(ds))[i]
    assert all(np.array_equal(again["rgb"][c], item["rgb"][c]) for c in item["rgb"])


def test_reader_takes_a_dp3_file_without_attributes(demos, tmp_path) -> None:
    """DP3's files have no attributes (data/img is corner2) and carry point clouds and depth."""
    folder, _ = demos
    dp3 = tmp_path / "dp3"
    dp3.mkdir()
    shutil.copytree(os.path.join(folder, zarr_name("reach-v3")), dp3 / "metaworld_reach_expert.zarr")
    root = zarr.open_group(str(dp3 / "metaworld_reach_expert.zarr"), mode="r+")
    root.attrs.clear()
    n = len(root["data/action"])
    root["data"].create_dataset("point_cloud", data=np.zeros((n, 16, 6), np.float32))
    root["data"].create_dataset("depth", data=np.zeros((n, *SIZE), np.float32))
    ds = MetaWorldDataset(str(dp3), ["reach-v3"], ["corner2"], obs_horizon=1, chunk_size=4)
    assert ds.episode_lang[0] == INSTRUCTIONS["reach-v3"] and ds[3]["rgb"]["corner2"].shape == (1, *SIZE, 3)
    with pytest.raises(KeyError, match=r"no camera\(s\) \['corner'\]; it has \['corner2'\]"):
        MetaWorldDataset(str(dp3), ["reach-v3"], ["corner"], 1, 4)


def test_reader_and_generator_refuse_bad_input(demos, tmp_path) -> None:
    folder, _ = demos
    with pytest.raises(FileNotFoundError, match="python -m mimictest.demos metaworld"):
        MetaWorldDataset(str(tmp_path / "missing"), TASKS, [], 1, 4)
    with pytest.raises(FileNotFoundError, match=r"no metaworld_push_expert.zarr.*'metaworld_drawer-open_expert.zarr'"):
        MetaWorldDataset(folder, ["push-v3"], [], 1, 4)
    with pytest.raises(KeyError, match=r"no camera\(s\) \['corner3'\]; it has \['corner', 'topview'\]"):
        MetaWorldDataset(folder, TASKS, ["corner3"], 1, 4)
    with pytest.raises(ValueError, match="unknown Meta-World task 'push'"):
        MetaWorldDataset(folder, ["push"], [], 1, 4)
    short = tmp_path / "short"
    shutil.copytree(folder, short)
    action = zarr.open_group(str(short / zarr_name("reach-v3")), mode="r+")["data/action"]
    action.resize(len(action) - 1, 4)
    with pytest.raises(ValueError, match="episode_ends does not match data/action"):
        MetaWorldDataset(str(short), ["reach-v3"], [], 1, 4)
    with pytest.raises(FileExistsError, match=r"never overwritten.*remaining tasks \(push-v3\)"):
        generate_metaworld_demos(folder, tasks=["reach-v3", "push-v3"], episodes_per_task=1, cams=())
    with pytest.raises(ValueError, match="kept for evaluation"):
        generate_metaworld_demos(str(tmp_path / "late"), tasks=["reach-v3"], episodes_per_task=1, seed=99_995)


def test_cli_low_dim_demos(tmp_path) -> None:
    out = str(tmp_path / "lowdim")
    demos_main(["metaworld", "--episodes", "1", "--out", out, "--tasks", "reach-v3", "--cams"])
    ds = MetaWorldDataset(out, ["reach-v3"], [], obs_horizon=2, chunk_size=4)
    assert ds.num_episodes == 1 and ds.cams == [] and set(ds[0]) == {"action", "is_pad", "low_dim", "task", "lang"}
    assert "img" not in zarr.open_group(os.path.join(out, zarr_name("reach-v3")), mode="r")["data"]


def test_env_runs_in_forked_workers() -> None:
    make_env = partial(MetaWorldEnv, "window-open-v3", cams=("corner",), image_size=(16, 24), max_episode_steps=5)
    make_env = pickle.loads(pickle.dumps(make_env))
    in_parent = make_env()
    in_parent.reset(seed=0)  # this process renders before forking, as a script that first records demos does
    venv = make_vec_env([partial(ScheduledEnv, [make_env], [(0, seed)]) for seed in (100_000, 100_001)])
    try:
        obs = unflatten(venv.reset())
        assert obs["rgb"]["corner"].shape == (2, 16, 24, 3) and obs["low_dim"].shape == (2, 4)
        obs, _, dones, infos = venv.step(np.zeros((2, 4), np.float32))
        assert unflatten(obs)["rgb"]["corner"].dtype == np.uint8 and not dones.any()
        assert all("is_success" in info for info in infos)
    finally:
        venv.close()
        in_parent.close()
