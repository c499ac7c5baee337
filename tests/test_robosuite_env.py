"""Tests for the robosuite env wrapper, the robomimic writer and the scripted Lift expert (real robosuite)."""

from __future__ import annotations

import gzip
import json
import os
import re

os.environ.setdefault("MUJOCO_GL", "egl")

from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mimictest.data.robomimic_writer import RobomimicWriter
from mimictest.demos.lift import LOW_DIM_KEYS, generate_lift_demos, lift_env_args
from mimictest.envs.robosuite import (
    RobosuiteEnv,
    import_robosuite,
    legacy_osc_pose_config,
    load_env_meta,
    remap_model_xml,
    translate_controller_config,
)

ROBOSUITE_141_LIFT = Path(__file__).parent / "data" / "robosuite141_lift.json.gz"


def _lift_meta(control_delta: bool) -> dict:
    return {
        "env_name": "Lift",
        "type": 1,
        "env_kwargs": {
            "robots": ["Panda"],
            "controller_configs": legacy_osc_pose_config(control_delta),
            "control_freq": 20,
            "reward_shaping": False,
            "camera_heights": 84,
            "camera_widths": 84,
        },
    }


@pytest.fixture(scope="module")
def low_dim_env() -> RobosuiteEnv:
    env = RobosuiteEnv(_lift_meta(control_delta=False), [], LOW_DIM_KEYS, max_episode_steps=50)
    yield env
    env.close()


@pytest.mark.parametrize("control_delta", [True, False])
def test_legacy_config_translation_is_accepted_by_robosuite(control_delta: bool) -> None:
    config = translate_controller_config(legacy_osc_pose_config(control_delta), "Panda")
    arm = config["body_parts"]["right"]
    assert config["type"] == "BASIC"
    assert arm["gripper"] == {"type": "GRIP"}
    assert "control_delta" not in arm and arm["damping_ratio"] == 1
    assert arm["input_type"] == ("delta" if control_delta else "absolute")
    assert arm["input_ref_frame"] == ("base" if control_delta else "world")

    robosuite = import_robosuite()
    env = robosuite.make(
        "Lift", robots="Panda", controller_configs=config, has_renderer=False, has_offscreen_renderer=False,
        use_camera_obs=False, ignore_done=True,
    )
    controller = env.robots[0].composite_controller.part_controllers["right"]
    assert controller.input_type == arm["input_type"]
    assert controller.input_ref_frame == arm["input_ref_frame"]
    env.close()

    overridden = translate_controller_config(config, "Panda", absolute=control_delta)
    assert overridden["body_parts"]["right"]["input_type"] == ("absolute" if control_delta else "delta")
    assert config["body_parts"]["right"]["input_type"] == arm["input_type"], "pass-through must not mutate its input"


def test_absolute_control_reaches_world_pose(low_dim_env: RobosuiteEnv) -> None:
    env = low_dim_env
    assert env.absolute
    env.reset(seed=0)
    sim, site = env.raw.sim, env.raw.robots[0].eef_site_id["right"]
    target_pos = sim.data.site_xpos[site] + np.array([0.08, -0.06, -0.1])
    target_rot = Rotation.from_euler("z", 0.4) * Rotation.from_matrix(sim.data.site_xmat[site].reshape(3, 3))
    action = np.concatenate([target_pos, target_rot.as_rotvec(), [-1.0]])
    for _ in range(40):
        env.step(action)
    reached_rot = Rotation.from_matrix(sim.data.site_xmat[site].reshape(3, 3))
    assert np.linalg.norm(sim.data.site_xpos[site] - target_pos) < 0.005
    assert np.degrees((reached_rot.inv() * target_rot).magnitude()) < 2.0


def test_low_dim_observation_matches_space_and_seeding(low_dim_env: RobosuiteEnv) -> None:
    env = low_dim_env
    obs, info = env.reset(seed=3)
    assert set(obs) == {"low_dim"} and info["is_success"] is False
    assert env.observation_space.contains(obs)
    assert obs["low_dim"].shape == (10 + 3 + 4 + 2,) and obs["low_dim"].dtype == np.float32
    obs, reward, terminated, truncated, info = env.step(np.concatenate([obs["low_dim"][10:13], [3.0, 0, 0, -1]]))
    assert env.observation_space.contains(obs) and isinstance(reward, float)
    assert not terminated and not truncated and info["is_success"] is False

    first, _ = env.reset(seed=3)
    again, _ = env.reset(seed=3)
    other, _ = env.reset(seed=4)
    np.testing.assert_array_equal(first["low_dim"], again["low_dim"])
    assert not np.allclose(first["low_dim"][:3], other["low_dim"][:3]), "seed must change the cube placement"


def test_unknown_low_dim_key_lists_available() -> None:
    with pytest.raises(KeyError, match="robot0_eef_pos"):
        RobosuiteEnv(_lift_meta(control_delta=True), [], ["robot0_eef_position"], max_episode_steps=10)


def test_image_observation_is_upright_and_matches_space() -> None:
    rgb_keys = ["agentview_image", "robot0_eye_in_hand_image"]
    env = RobosuiteEnv(
        _lift_meta(control_delta=True), rgb_keys, ["robot0_eef_pos"], max_episode_steps=2,
        image_size=(32, 40), render_video=True, video_size=48,
    )
    assert not env.absolute
    obs, info = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    assert list(obs["rgb"]) == rgb_keys  # robomimic's obs keys name the cameras
    assert all(image.shape == (32, 40, 3) and image.dtype == np.uint8 for image in obs["rgb"].values())
    assert info["frame"].shape == (48, 48, 3) and info["frame"].dtype == np.uint8
    raw = env.raw.sim.render(camera_name="agentview", height=32, width=40)
    np.testing.assert_array_equal(obs["rgb"]["agentview_image"], raw[::-1])
    assert not np.array_equal(obs["rgb"]["agentview_image"], raw)
    raw = env.raw.sim.render(camera_name="robot0_eye_in_hand", height=32, width=40)
    np.testing.assert_array_equal(obs["rgb"]["robot0_eye_in_hand_image"], raw[::-1])
    obs, _, _, truncated, info = env.step(np.zeros(7))
    obs, _, _, truncated, info = env.step(np.zeros(7))
    assert env.observation_space.contains(obs) and truncated and "frame" in info
    env.close()


def test_expert_demos_replay_from_recorded_state(tmp_path: Path) -> None:
    path = str(tmp_path / "lift.hdf5")
    stats = generate_lift_demos(path, episodes=2, seed=100)
    assert stats["successes"] >= 1

    env_meta = load_env_meta(path)
    assert env_meta["env_kwargs"]["controller_configs"]["control_delta"] is False
    env = RobosuiteEnv(env_meta, [], LOW_DIM_KEYS, max_episode_steps=200)
    assert env.absolute
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert data.attrs["total"] == sum(data[name].attrs["num_samples"] for name in data)
        masks = sorted([*f["mask/train"][:], *f["mask/valid"][:]])
        assert masks == sorted(name.encode() for name in data)
        for name in data:
            demo = data[name]
            obs, _ = env.reset_to(demo["states"][0], demo.attrs["model_file"])
            recorded = np.concatenate([demo["obs"][key][0] for key in LOW_DIM_KEYS]).astype(np.float32)
            np.testing.assert_allclose(obs["low_dim"], recorded, atol=1e-5)
            success = False
            for action in demo["actions"][:]:
                success = env.step(action)[2] or success
            assert success, f"replaying {name} did not lift the cube"
        # The same demo recorded on another machine: its assets under someone else's robosuite checkout.
        demo = data[sorted(data)[0]]
        foreign = re.sub(r'file="[^"]*/robosuite/models/', 'file="/home/someone/robosuite/robosuite/models/',
                         demo.attrs["model_file"])
        assert "/home/someone/robosuite/robosuite/models/assets/bases/" in foreign
        obs, _ = env.reset_to(demo["states"][0], foreign)
        recorded = np.concatenate([demo["obs"][key][0] for key in LOW_DIM_KEYS]).astype(np.float32)
        np.testing.assert_allclose(obs["low_dim"], recorded, atol=1e-5)
        assert "/home/someone" not in env.model_xml()
    env.close()


def test_robosuite_14_model_xml_is_remapped_then_refused_in_one_line(low_dim_env: RobosuiteEnv) -> None:
    """A real robosuite 1.4.1 Lift model (tests/data, see its "note"): recorded under /tmp/rs14/robosuite."""
    with gzip.open(ROBOSUITE_141_LIFT, "rt") as fh:
        recording = json.load(fh)
    old_xml = recording["model_xml"]
    assert "/tmp/rs14/robosuite/models/assets/mounts/meshes/rethink_mount/pedestal.stl" in old_xml
    package = Path(import_robosuite().__file__).parent
    files = re.findall(r'file="([^"]+)"', remap_model_xml(old_xml))
    assert len(files) == len(re.findall(r'file="', old_xml)) > 60
    assert all(f.startswith(str(package)) and os.path.isfile(f) for f in files)  # mounts/ moved to bases/ in 1.5
    assert str(package / "models/assets/bases/meshes/rethink_mount/pedestal.stl") in files
    with pytest.raises(ValueError, match=r"^model_xml lacks this env's site\(s\) \['robot0_right_center'.*another "
                                         r"robosuite version .*reset_to\(state\) without model_xml") as err:
        low_dim_env.reset_to(np.asarray(recording["states"][0]), old_xml)
    assert "\n" not in str(err.value)
    obs, _ = low_dim_env.reset(seed=3)  # nothing was loaded: the env still works
    assert low_dim_env.observation_space.contains(obs)
    missing = old_xml.replace("/tmp/rs14/robosuite/models/assets/textures/ceramic.png",
                              "/tmp/rs14/robosuite/models/assets/textures/gone.png")
    with pytest.raises(FileNotFoundError, match=r"names 1 asset file\(s\) absent from this robosuite .*gone\.png"):
        low_dim_env.reset_to(np.asarray(recording["states"][0]), missing)


def test_writer_refuses_overwrite_and_never_leaves_partial_files(tmp_path: Path) -> None:
    path = tmp_path / "demo.hdf5"
    args = lift_env_args(image=False)
    demo = {
        "obs": {"robot0_eef_pos": np.zeros((3, 3))},
        "actions": np.zeros((3, 7)),
        "states": np.zeros((3, 5)),
        "rewards": np.zeros(3),
        "dones": np.array([0, 0, 1]),
        "model_xml": "<mujoco/>",
    }
    with pytest.raises(RuntimeError, match="boom"):
        with RobomimicWriter(str(path), args) as writer:
            writer.add_demo(**demo)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with RobomimicWriter(str(path), args) as writer:
        writer.add_demo(**demo)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        RobomimicWriter(str(path), args)
    with RobomimicWriter(str(path), args, overwrite=True) as writer:
        writer.add_demo(**demo)
        writer.add_demo(**demo)
    assert load_env_meta(str(path))["env_name"] == "Lift"
    with h5py.File(path, "r") as f:
        assert f["data"].attrs["total"] == 6 and f["data/demo_1"].attrs["num_samples"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.hdf5"]
