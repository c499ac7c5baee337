"""Scripted expert for robosuite Lift that writes robomimic-format demonstrations.

The expert reads the true cube pose and commands the Panda's OSC_POSE controller with absolute
world-frame targets, as in robomimic's absolute-action Lift datasets (Mandlekar et al., 2021,
https://github.com/ARISE-Initiative/robomimic): hover above the cube with the gripper open, descend,
close and wait, then lift. Episode ``i`` resets robosuite with seed ``seed + i`` and draws its
motion variations (speed, hover height, grasp wait, lift height, smooth target noise) from
``np.random.default_rng(seed + i)``, so evaluation can use seeds outside ``[seed, seed + episodes)``.
Observations are recorded before each action (robomimic convention) and only successful episodes
are kept; each ends a few steps after the cube first counts as lifted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from mimictest.data.robomimic_writer import RobomimicWriter
from mimictest.envs.robosuite import RobosuiteEnv, import_robosuite, legacy_osc_pose_config

LOW_DIM_KEYS = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
RGB_KEYS = ["agentview_image", "robot0_eye_in_hand_image"]
IMAGE_SIZE = 84
CONTROL_FREQ = 20
MAX_EPISODE_STEPS = 200
STEPS_AFTER_SUCCESS = 4
GRIPPER_OPEN, GRIPPER_CLOSED = -1.0, 1.0


def lift_env_args(image: bool) -> dict:
    """robomimic ``env_args`` for Lift with a Panda and absolute (``control_delta: false``) OSC_POSE."""
    robosuite = import_robosuite()
    return {
        "env_name": "Lift",
        "env_version": robosuite.__version__,
        "type": 1,
        "env_kwargs": {
            "has_renderer": False,
            "has_offscreen_renderer": image,
            "ignore_done": True,
            "use_object_obs": True,
            "use_camera_obs": image,
            "control_freq": CONTROL_FREQ,
            "controller_configs": legacy_osc_pose_config(control_delta=False),
            "robots": ["Panda"],
            "camera_depths": False,
            "camera_heights": IMAGE_SIZE,
            "camera_widths": IMAGE_SIZE,
            "camera_names": [key[: -len("_image")] for key in RGB_KEYS],
            "reward_shaping": False,
        },
    }


def _wrap_quarter_turn(angle: float) -> float:
    """Equivalent yaw in [-pi/4, pi/4) for a square (4-fold symmetric) cube."""
    return (angle + np.pi / 4) % (np.pi / 2) - np.pi / 4


@dataclass
class _Style:
    """Per-episode variations of the scripted motion."""

    speed: float  # max target displacement per step (m)
    descend_speed: float  # max target displacement per step while descending (m)
    hover: float  # height above the cube centre before descending (m)
    grasp_dz: float  # grasp height relative to the cube centre (m)
    wait: int  # steps to hold still while the gripper closes
    lift: float  # lift target above the cube's start height (m)
    noise: float  # std of the smooth noise on the position target (m)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> _Style:
        return cls(
            speed=rng.uniform(0.006, 0.01),
            descend_speed=rng.uniform(0.003, 0.005),
            hover=rng.uniform(0.06, 0.1),
            grasp_dz=rng.uniform(-0.006, 0.0),
            wait=int(rng.integers(8, 15)),
            lift=rng.uniform(0.1, 0.15),
            noise=rng.uniform(0.0, 0.003),
        )


class LiftExpert:
    """Waypoint controller producing absolute 7-d OSC_POSE actions from the true cube pose."""

    def __init__(self, env: RobosuiteEnv, rng: np.random.Generator) -> None:
        if not env.absolute:
            raise ValueError("LiftExpert commands absolute poses; build the env with absolute=True")
        self.env = env
        self.rng = rng
        self.style = _Style.sample(rng)
        raw = env.raw
        self._site = raw.robots[0].eef_site_id["right"]
        self._start_rot = raw.sim.data.site_xmat[self._site].reshape(3, 3).copy()
        self._target = raw.sim.data.site_xpos[self._site].copy()
        self._cube_start_z = float(raw.sim.data.body_xpos[raw.cube_body_id][2])
        cube_rot = raw.sim.data.body_xmat[raw.cube_body_id].reshape(3, 3)
        cube_yaw = np.arctan2(cube_rot[1, 0], cube_rot[0, 0])
        grip_yaw = np.arctan2(self._start_rot[1, 0], self._start_rot[0, 0])
        self._yaw_goal = _wrap_quarter_turn(cube_yaw - grip_yaw)
        self._yaw = 0.0
        self._noise = np.zeros(3)
        self._phase = "approach"
        self._wait_left = self.style.wait

    def _eef(self) -> np.ndarray:
        return self.env.raw.sim.data.site_xpos[self._site]

    def _cube(self) -> np.ndarray:
        raw = self.env.raw
        return raw.sim.data.body_xpos[raw.cube_body_id]

    def _move_towards(self, goal: np.ndarray, speed: float) -> None:
        """Move the commanded position at most ``speed`` metres towards ``goal``."""
        delta = goal - self._target
        distance = float(np.linalg.norm(delta))
        self._target = goal.copy() if distance <= speed else self._target + delta * (speed / distance)

    def act(self) -> np.ndarray:
        """Next absolute action ``[x, y, z, axis-angle (3), gripper]`` (7,)."""
        style = self.style
        eef, cube = self._eef(), self._cube()
        gripper = GRIPPER_OPEN
        noisy = True
        if self._phase == "approach":
            goal = cube + np.array([0.0, 0.0, style.hover])
            self._move_towards(goal, style.speed)
            self._yaw += float(np.clip(self._yaw_goal - self._yaw, -0.08, 0.08))
            if np.linalg.norm(eef - goal) < 0.012 and abs(self._yaw_goal - self._yaw) < 1e-3:
                self._phase = "descend"
        elif self._phase == "descend":
            goal = cube + np.array([0.0, 0.0, style.grasp_dz])
            self._move_towards(goal, style.descend_speed)
            noisy = False
            if np.linalg.norm(eef - goal) < 0.006:
                self._phase = "grasp"
        elif self._phase == "grasp":
            gripper, noisy = GRIPPER_CLOSED, False
            self._wait_left -= 1
            if self._wait_left <= 0:
                self._phase = "lift"
        else:
            gripper = GRIPPER_CLOSED
            goal = np.array([self._target[0], self._target[1], self._cube_start_z + style.lift])
            self._move_towards(goal, style.speed)
        # Low-pass filtered Gaussian noise: smooth wobble of the commanded position.
        self._noise = 0.8 * self._noise + 0.2 * self.rng.normal(0.0, style.noise, size=3)
        position = self._target + (self._noise if noisy else 0.0)
        rotation = Rotation.from_euler("z", self._yaw) * Rotation.from_matrix(self._start_rot)
        return np.concatenate([position, rotation.as_rotvec(), [gripper]])


def _run_episode(env: RobosuiteEnv, episode_seed: int) -> tuple[bool, dict[str, Any]]:
    """Roll out the expert once; returns (success, robomimic demo arrays)."""
    env.reset(seed=episode_seed)
    expert = LiftExpert(env, np.random.default_rng(episode_seed))
    model_xml = env.model_xml()
    obs: dict[str, list[np.ndarray]] = {key: [] for key in env.robomimic_obs()}
    actions, states, rewards, dones = [], [], [], []
    success_steps = 0
    for _ in range(MAX_EPISODE_STEPS):
        for key, value in env.robomimic_obs().items():
            obs[key].append(value)
        states.append(env.sim_state())
        action = expert.act()
        _, reward, success, _, _ = env.step(action)
        actions.append(action)
        rewards.append(reward)
        success_steps += int(success)
        done = success_steps > STEPS_AFTER_SUCCESS
        dones.append(int(success))
        if done:
            break
    demo = {
        "obs": {key: np.stack(values) for key, values in obs.items()},
        "actions": np.stack(actions),  # (T, 7)
        "states": np.stack(states),  # (T, S)
        "rewards": np.asarray(rewards),  # (T,)
        "dones": np.asarray(dones),  # (T,)
        "model_xml": model_xml,
    }
    return success_steps > STEPS_AFTER_SUCCESS, demo


def generate_lift_demos(
    out: str, episodes: int, image: bool = False, seed: int = 0, overwrite: bool = False
) -> dict:
    """Run the scripted expert for ``episodes`` episodes (seeds ``seed + i``) and save the successes.

    Returns stats: ``episodes``, ``successes``, ``success_rate``, ``mean_length``, ``seconds``, ``path``.
    """
    if episodes <= 0:
        raise ValueError(f"episodes must be positive, got {episodes}")
    start = time.perf_counter()
    env_args = lift_env_args(image)
    env = RobosuiteEnv(
        env_args,
        rgb_keys=RGB_KEYS if image else [],
        low_dim_keys=LOW_DIM_KEYS,
        max_episode_steps=MAX_EPISODE_STEPS,
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        absolute=True,
    )
    lengths = []
    try:
        with RobomimicWriter(out, env_args, overwrite=overwrite) as writer:
            with tqdm(range(episodes), desc="lift expert", unit="ep") as progress:
                for i in progress:
                    success, demo = _run_episode(env, seed + i)
                    if success:
                        writer.add_demo(**demo)
                        lengths.append(len(demo["actions"]))
                    progress.set_postfix(success=f"{len(lengths)}/{i + 1}")
    finally:
        env.close()
    stats = {
        "episodes": episodes,
        "successes": len(lengths),
        "success_rate": len(lengths) / episodes,
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "seconds": time.perf_counter() - start,
        "path": out,
    }
    print(
        f"expert success {stats['successes']}/{episodes} = {100 * stats['success_rate']:.1f}% "
        f"(mean length {stats['mean_length']:.1f} steps, {stats['seconds']:.1f} s) -> {out}"
    )
    return stats
