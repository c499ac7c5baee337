"""Tests for the robosuite env wrapper, the robomimic writer and the scripted Lift expert (real robosuite)."""

from __future__ import annotations

import gzip
import json
import os
import re
from functools import partial

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


def _absolute_to_delta(env: RobosuiteEnv, target: np.ndarray) -> np.ndarray:
    """The delta OSC_POSE command (7,) that moves the gripper towards an absolute world-frame target.

    robosuite's OSC scales delta inputs in [-1, 1] by ``output_max`` (0.05 m, 0.5 rad: ``legacy_osc_pose_config``)
    in the Panda's base frame, which Lift places unrotated, so world and base deltas coincide.
    """
    site = env.raw.robots[0].eef_site_id["right"]
    position = env.raw.sim.data.site_xpos[site]
    rotation = Rotation.from_matrix(env.raw.sim.data.site_xmat[site].reshape(3, 3))
    turn = (Rotation.from_rotvec(target[3:6]) * rotation.inv()).as_rotvec()
    return np.concatenate([np.clip((target[:3] - position) / 0.05, -1, 1), np.clip(turn / 0.5, -1, 1), target[6:]])


def test_relative_action_dataset_trains_and_evaluates(tmp_path: Path) -> None:
    """A delta-action robomimic file (robomimic's own Lift PH layout: OSC_POSE with control_delta true):
    the expert's absolute demos re-recorded as delta commands in a delta env, then read, trained on
    for a few steps and evaluated in the delta env rebuilt from the file."""
    import torch

    from mimictest.data.robomimic import RobomimicDataset
    from mimictest.evaluate import EvalTask, Evaluator
    from mimictest.nets.obs_encoder import ObsEncoder
    from mimictest.nets.unet1d import ConditionalUnet1D
    from mimictest.policies.diffusion import DiffusionPolicy
    from mimictest.preprocess import ActionSpace, Preprocessor
    from mimictest.train import TrainConfig, train

    absolute = str(tmp_path / "lift_abs.hdf5")
    assert generate_lift_demos(absolute, episodes=2, seed=7)["successes"] == 2
    env_args = lift_env_args(image=False)
    env_args["env_kwargs"]["controller_configs"] = legacy_osc_pose_config(control_delta=True)
    env = RobosuiteEnv(env_args, [], LOW_DIM_KEYS, max_episode_steps=200)
    assert not env.absolute and env.action_space.low.min() == -1 and env.action_space.high.max() == 1
    delta = str(tmp_path / "lift_delta.hdf5")
    with h5py.File(absolute, "r") as f, RobomimicWriter(delta, env_args) as writer:
        for name in f["data"]:
            demo = f["data"][name]
            env.reset_to(demo["states"][0], demo.attrs["model_file"])
            obs, actions, states, rewards, successes = {k: [] for k in env.robomimic_obs()}, [], [], [], []
            for target in demo["actions"][()]:
                for key, value in env.robomimic_obs().items():
                    obs[key].append(value)
                states.append(env.sim_state())
                actions.append(_absolute_to_delta(env, target))
                _, reward, success, _, _ = env.step(actions[-1])
                rewards.append(reward)
                successes.append(success)
            assert any(successes), f"{name} re-recorded as deltas no longer lifts the cube"
            writer.add_demo({k: np.stack(v) for k, v in obs.items()}, np.stack(actions), np.stack(states),
                            np.asarray(rewards), np.asarray(successes, dtype=int), demo.attrs["model_file"])
    env.close()

    dataset = RobomimicDataset(delta, [], LOW_DIM_KEYS, obs_horizon=2, chunk_size=8, pad_after=3)
    assert not dataset.absolute_actions and dataset.num_episodes == 2
    assert -1 <= min(dataset.stats["action"]["min"]) and max(dataset.stats["action"]["max"]) <= 1
    action_space = ActionSpace("axis_angle", "relative")
    preprocess = Preprocessor(dataset.stats, action_space)
    chunk = torch.from_numpy(dataset[5]["action"])  # (8, 7)
    torch.testing.assert_close(preprocess.unnormalize_action(preprocess.normalize_action(chunk)), chunk, atol=1e-5, rtol=0)

    torch.manual_seed(0)
    encoder = ObsEncoder([], low_dim_dim=dataset.low_dim_dim)
    net = ConditionalUnet1D(action_space.model_dim, encoder.out_dim, 2, down_dims=(16, 32), diffusion_step_embed_dim=16)
    policy = DiffusionPolicy(encoder, net, action_space.model_dim, 8, sampler="ddim", num_inference_steps=3)
    make_env = partial(RobosuiteEnv, dataset.env_meta, rgb_keys=[], low_dim_keys=LOW_DIM_KEYS, max_episode_steps=12)
    evaluator = Evaluator(tasks=[EvalTask("lift_delta", make_env, 2)], num_envs=2, obs_horizon=2, exec_start=1,
                          exec_end=5, num_videos=0)
    cfg = TrainConfig(run_name="delta", max_steps=10, batch_size=16, lr=1e-4, weight_decay=1e-6, betas=(0.95, 0.999),
                      lr_schedule="cosine", warmup_steps=2, grad_clip=0.0, ema=True, num_workers=0, log_every=5,
                      save_every=10, save_root=str(tmp_path / "runs"))
    summary = train(policy, preprocess, dataset, cfg, evaluator)
    assert summary["episodes"] == 2
    results = json.load(open(tmp_path / "runs" / "delta" / "eval_step10.json"))
    assert len(results["episodes"]) == 2 and all(1 <= e["length"] <= 12 for e in results["episodes"])
    rebuilt = make_env()
    assert not rebuilt.absolute  # the evaluation env commands deltas, as the data does
    rebuilt.close()
    window = {"low_dim": torch.from_numpy(np.stack([dataset[i]["low_dim"] for i in range(4)]))}  # (4, 2, 19)
    env_actions = preprocess.unnormalize_action(policy.eval().predict(preprocess(window, train=False)))  # (4, 8, 7)
    low, high = (torch.tensor(dataset.stats["action"][k]) for k in ("min", "max"))
    assert env_actions.shape == (4, 8, 7) and torch.isfinite(env_actions).all()
    span = high - low
    assert (env_actions[..., :3] >= low[:3] - span[:3]).all() and (env_actions[..., :3] <= high[:3] + span[:3]).all()
