"""Simulated ALOHA bimanual tasks (transfer cube, insertion) as a gymnasium env.

The tasks are ACT's (Zhao et al., "Learning Fine-Grained Bimanual Manipulation with Low-Cost
Hardware", RSS 2023, https://github.com/tonyzhaozh/act): two ViperX 300 arms under joint-position
control at 50 Hz, a 14-d action ``[left arm (6), left gripper (1), right arm (6), right gripper (1)]``
with the grippers normalised to 0 (closed) .. 1 (open), and a staged reward whose maximum, 4, is
success. The MuJoCo scenes and reward functions are gym-aloha's (https://github.com/huggingface/gym-aloha).

Two things differ from ``gym_aloha.env.AlohaEnv``:
- gym-aloha's task renders three 480x640 cameras every step; here only the cameras the policy
  reads are rendered, at the policy's resolution, with one reusable camera each, and the shadow
  map is scaled to that resolution (``fit_renderer``).
- gym-aloha places the objects through the module-global ``BOX_POSE``; here the pose is an
  attribute of this env's own task, drawn by gym-aloha's samplers from the ``reset`` seed, so
  ``reset(seed=s)`` gives the same placement as gym-aloha with seed ``s`` and forked workers
  share no state.

``EndEffectorSim`` is the mocap (end-effector) scene ACT's scripted expert drives. ACT pins MuJoCo
2.3.7 and its scripted data fails on MuJoCo 3 (tonyzhaozh/act#45): MuJoCo 3.0 changed the scaling
of weld constraints' rotational rows (google-deepmind/mujoco#1483), so the mocap welds hold the
gripper orientation too loosely and the fingers miss the object. The welds' ``torquescale`` is
raised to 3.75, the value Meta-World adopted for the same migration (Farama-Foundation/Metaworld#493).

Rendering is headless (EGL) unless ``MUJOCO_GL`` says otherwise, and Mesa's software renderer is
kept single-threaded (``LP_NUM_THREADS=0``): its worker threads do not survive ``fork``, so env
workers forked from a process that has already rendered would hang in their first render.
"""

from __future__ import annotations

import os

# Read when dm_control is first imported (see the module docstring).
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("LP_NUM_THREADS", "0")

from typing import Any

import gymnasium
import numpy as np
import torchvision  # noqa: F401  (before dm_control: loading torchvision's triton after dm_control's EGL context segfaults)
from dm_control import mujoco
from dm_control.rl import control
from dm_control.suite import base
from gym_aloha.constants import ASSETS_DIR, DT, START_ARM_POSE
from gym_aloha.tasks.sim import InsertionTask, TransferCubeTask
from gym_aloha.tasks.sim_end_effector import InsertionEndEffectorTask, TransferCubeEndEffectorTask
from gym_aloha.utils import sample_box_pose, sample_insertion_pose

TASKS = ("transfer_cube", "insertion")
MAX_REWARD = 4
ACTION_DIM = 14
NUM_ROBOT_QPOS = 16  # 2 x (6 arm joints + 2 fingers); the objects' free joints follow
SCENE_IMAGE_SIZE = (480, 640)  # the image size gym-aloha renders and its scenes' render settings serve
MIN_SHADOW_SIZE = 256
WELD_TORQUESCALE = 10  # index of a weld's torquescale in eq_data: anchor (3), relpose (7), torquescale (1)
MOCAP_TORQUESCALE = 3.75  # see the module docstring


def check_task(task: str) -> None:
    """Refuse an unknown task name."""
    if task not in TASKS:
        raise ValueError(f"unknown ALOHA task {task!r}; expected one of {TASKS}")


def sample_object_pose(task: str, seed: int) -> np.ndarray:
    """Initial object pose for ``seed`` from gym-aloha's samplers.

    ``(7,)`` cube ``[xyz, quat wxyz]`` for transfer_cube; ``(14,)`` peg then socket for insertion.
    """
    check_task(task)
    if task == "transfer_cube":
        return sample_box_pose(seed)
    return np.concatenate(sample_insertion_pose(seed))


def scene_path(task: str, end_effector: bool = False) -> str:
    """MJCF of a task: joint-position control, or the mocap (end-effector) variant."""
    check_task(task)
    prefix = "bimanual_viperx_end_effector_" if end_effector else "bimanual_viperx_"
    return str(ASSETS_DIR / f"{prefix}{task}.xml")


def camera_names(physics: mujoco.Physics) -> list[str]:
    """Names of the cameras defined in a scene."""
    return [physics.model.id2name(i, "camera") for i in range(physics.model.ncam)]


def fit_renderer(physics: mujoco.Physics, sizes: list[tuple[int, int]]) -> None:
    """Size the offscreen buffers for images of the given ``(H, W)`` sizes, before the first render.

    The framebuffer grows to fit the largest image. The shadow map shrinks in proportion to it: the
    scenes' 4096-texel map serves 480x640 images, and on a CPU renderer it dominates the cost of a
    small image (about 4x at 48x64), so a smaller image gets a map of the same texels per pixel.
    """
    if not sizes:
        return
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    vis = physics.model.vis
    vis.global_.offheight = max(vis.global_.offheight, height)
    vis.global_.offwidth = max(vis.global_.offwidth, width)
    scale = max(height / SCENE_IMAGE_SIZE[0], width / SCENE_IMAGE_SIZE[1])
    texels = 2 ** int(np.ceil(np.log2(max(vis.quality.shadowsize * scale, MIN_SHADOW_SIZE))))
    vis.quality.shadowsize = min(vis.quality.shadowsize, texels)


class _PlacedObjects:
    """Task mixin: objects start at ``object_pose``; observations render only ``cams``."""

    object_pose: np.ndarray
    cameras: dict[str, mujoco.Camera]

    def initialize_episode(self, physics: mujoco.Physics) -> None:
        physics.data.qpos[:NUM_ROBOT_QPOS] = START_ARM_POSE
        np.copyto(physics.data.ctrl, START_ARM_POSE)
        physics.data.qpos[NUM_ROBOT_QPOS:] = self.object_pose
        base.Task.initialize_episode(self, physics)

    def get_observation(self, physics: mujoco.Physics) -> dict[str, Any]:
        return {
            "qpos": self.get_qpos(physics),  # (14,) arms in rad, grippers normalised
            "qvel": self.get_qvel(physics),  # (14,)
            # (H, W, 3) uint8 each; a camera's render is a view of its reused buffer, hence the copy.
            "images": {name: np.ascontiguousarray(cam.render()) for name, cam in self.cameras.items()},
        }


class _TransferCube(_PlacedObjects, TransferCubeTask):
    """gym-aloha's transfer-cube task with explicit placement and selective rendering."""


class _Insertion(_PlacedObjects, InsertionTask):
    """gym-aloha's insertion task with explicit placement and selective rendering."""


class _PlacedEndEffectorObjects:
    """Mocap-task mixin: objects start at ``object_pose`` (gym-aloha draws them unseeded); nothing is rendered."""

    object_pose: np.ndarray

    def initialize_episode(self, physics: mujoco.Physics) -> None:
        self.initialize_robots(physics)
        physics.data.qpos[NUM_ROBOT_QPOS:] = self.object_pose
        base.Task.initialize_episode(self, physics)

    def get_observation(self, physics: mujoco.Physics) -> dict[str, np.ndarray]:
        return {
            "qpos": self.get_qpos(physics),  # (14,) arms in rad, grippers normalised
            "gripper_ctrl": physics.data.ctrl.copy(),  # (4,) finger position targets: left arm (2), right arm (2)
            "mocap_left": np.concatenate([physics.data.mocap_pos[0], physics.data.mocap_quat[0]]),  # (7,) xyz, wxyz
            "mocap_right": np.concatenate([physics.data.mocap_pos[1], physics.data.mocap_quat[1]]),  # (7,)
            "objects": physics.data.qpos[NUM_ROBOT_QPOS:].copy(),  # (7,) or (14,) object poses
        }


class _TransferCubeEndEffector(_PlacedEndEffectorObjects, TransferCubeEndEffectorTask):
    """gym-aloha's mocap transfer-cube task with explicit placement."""


class _InsertionEndEffector(_PlacedEndEffectorObjects, InsertionEndEffectorTask):
    """gym-aloha's mocap insertion task with explicit placement."""


class EndEffectorSim:
    """The mocap scene of a task: each gripper follows a pose target through a weld (no rendering).

    ``step`` takes ``[left xyz (3), left quat wxyz (4), left gripper (1), right ... (8)]`` (16,),
    grippers normalised 0 (closed) .. 1 (open). Observations: ``qpos`` (14,), ``gripper_ctrl`` (4,),
    ``mocap_left`` / ``mocap_right`` (7,) and ``objects`` (the object poses).
    """

    def __init__(self, task: str) -> None:
        check_task(task)
        self._task = _TransferCubeEndEffector() if task == "transfer_cube" else _InsertionEndEffector()
        self._physics = mujoco.Physics.from_xml_path(scene_path(task, end_effector=True))
        self._physics.model.eq_data[:, WELD_TORQUESCALE] = MOCAP_TORQUESCALE
        self._env = control.Environment(
            self._physics, self._task, time_limit=float("inf"), control_timestep=DT, flat_observation=False
        )

    def reset(self, object_pose: np.ndarray) -> dict[str, np.ndarray]:
        """Start pose of the arms, objects at ``object_pose``; returns the first observation."""
        self._task.object_pose = np.asarray(object_pose, dtype=np.float64)
        return self._env.reset().observation

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """Move the mocap targets and grippers one control step; returns the observation and the task reward."""
        timestep = self._env.step(np.asarray(action, dtype=np.float64))
        return timestep.observation, float(timestep.reward)

    def close(self) -> None:
        """Release the simulator."""
        self._physics.free()


class AlohaEnv(gymnasium.Env):
    """ALOHA transfer-cube or insertion with observations ``{"rgb": {cam: (H, W, 3) uint8}, "low_dim": (14,)}``.

    ``low_dim`` is the joint position ``qpos`` (ACT's observation); ``rgb`` is absent when ``cams`` is
    empty. ``terminated`` when the reward reaches 4; ``info["score"]`` is reward / 4. Stepping after
    termination keeps simulating (the scripted expert replays whole trajectories).

    Args:
        task: ``"transfer_cube"`` or ``"insertion"``.
        cams: scene cameras to render, e.g. ``("top",)`` (ACT's choice) or ``("top", "angle")``.
        image_size: ``(H, W)`` of the rendered observations.
        max_episode_steps: truncation horizon (ACT: 400 steps, 8 s).
        render_video: add an upright ``(h, w, 3)`` frame from ``video_camera`` to every ``info``.
        video_camera, video_size: camera and ``(h, w)`` of those frames.
    """

    metadata = {"render_modes": [], "render_fps": round(1 / DT)}

    def __init__(
        self,
        task: str,
        cams: tuple[str, ...] | list[str] = ("top",),
        image_size: tuple[int, int] = (480, 640),
        max_episode_steps: int = 400,
        render_video: bool = False,
        video_camera: str = "angle",
        video_size: tuple[int, int] = (240, 320),
    ) -> None:
        super().__init__()
        check_task(task)
        if max_episode_steps <= 0:
            raise ValueError(f"max_episode_steps must be positive, got {max_episode_steps}")
        if len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"image_size must be a positive (H, W), got {image_size}")
        self.task = task
        self.cams = tuple(cams)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_episode_steps = max_episode_steps
        self.render_video = render_video
        self.video_size = (int(video_size[0]), int(video_size[1]))

        self._physics = mujoco.Physics.from_xml_path(scene_path(task))
        available = camera_names(self._physics)
        unknown = [cam for cam in (*self.cams, video_camera) if cam not in available]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown} for ALOHA {task}; available cameras: {available}")
        if len(set(self.cams)) != len(self.cams):
            raise ValueError(f"cams lists a camera twice: {self.cams}")
        rendered = ([self.image_size] if self.cams else []) + ([self.video_size] if render_video else [])
        fit_renderer(self._physics, rendered)
        self._task = _TransferCube() if task == "transfer_cube" else _Insertion()
        self._task.object_pose = sample_object_pose(task, 0)  # replaced at every reset
        # Cameras are made lazily: a rendering context must be created in the process that renders.
        self._task.cameras = {}
        self._video_camera_name = video_camera
        self._video_camera: mujoco.Camera | None = None
        self._env = control.Environment(
            self._physics, self._task, time_limit=float("inf"), control_timestep=DT, flat_observation=False
        )
        self._raw: dict[str, Any] = {}
        self._steps = 0

        spaces: dict[str, gymnasium.spaces.Space] = {}
        if self.cams:
            image = gymnasium.spaces.Box(0, 255, shape=(*self.image_size, 3), dtype=np.uint8)
            spaces["rgb"] = gymnasium.spaces.Dict({cam: image for cam in self.cams})
        spaces["low_dim"] = gymnasium.spaces.Box(-np.inf, np.inf, shape=(ACTION_DIM,), dtype=np.float32)
        self.observation_space = gymnasium.spaces.Dict(spaces)
        # Arm joints within their actuators' ranges; grippers as normalised openings.
        ctrl_range = self._physics.model.actuator_ctrlrange  # (16, 2): per arm 6 joints + 2 fingers
        arm = np.r_[0:6, 8:14]
        low, high = np.zeros(ACTION_DIM), np.ones(ACTION_DIM)
        low[np.r_[0:6, 7:13]], high[np.r_[0:6, 7:13]] = ctrl_range[arm, 0], ctrl_range[arm, 1]
        self.action_space = gymnasium.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)

    @property
    def object_pose(self) -> np.ndarray:
        """Initial object pose of the current episode (see ``sample_object_pose``)."""
        return self._task.object_pose.copy()

    @property
    def raw_observation(self) -> dict[str, Any]:
        """Latest task observation: ``qpos`` (14,), ``qvel`` (14,) float64, ``images`` {cam: (H, W, 3) uint8}."""
        return self._raw

    def _make_cameras(self) -> None:
        if self.cams and not self._task.cameras:
            h, w = self.image_size
            self._task.cameras = {cam: mujoco.Camera(self._physics, h, w, cam) for cam in self.cams}
        if self.render_video and self._video_camera is None:
            self._video_camera = mujoco.Camera(self._physics, *self.video_size, self._video_camera_name)

    def _observation(self) -> dict:
        obs: dict = {"low_dim": self._raw["qpos"].astype(np.float32)}  # (14,)
        if self.cams:
            obs["rgb"] = {cam: self._raw["images"][cam] for cam in self.cams}  # {cam: (H, W, 3)}
        return obs

    def _info(self, reward: float) -> dict[str, Any]:
        info: dict[str, Any] = {"is_success": reward >= MAX_REWARD, "score": reward / MAX_REWARD}
        if self.render_video:
            assert self._video_camera is not None
            info["frame"] = np.ascontiguousarray(self._video_camera.render())  # (h, w, 3) uint8, upright
        return info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """New episode; the objects are placed from ``seed`` (as gym-aloha does) or ``options["object_pose"]``.

        Without a seed, the placement seed is drawn from the env's generator, so a vector env seeded
        once stays deterministic across its automatic resets.
        """
        super().reset(seed=seed)
        options = options or {}
        if "object_pose" in options:
            pose = np.asarray(options["object_pose"], dtype=np.float64)
            expected = self._task.object_pose.shape
            if pose.shape != expected:
                raise ValueError(f"object_pose for {self.task} must have shape {expected}, got {pose.shape}")
        else:
            placement_seed = seed if seed is not None else int(self.np_random.integers(2**31))
            pose = sample_object_pose(self.task, placement_seed)
        self._task.object_pose = pose
        self._make_cameras()
        self._raw = self._env.reset().observation
        self._steps = 0
        return self._observation(), self._info(0.0)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Apply a 14-d joint-position action; terminated at reward 4, truncated at ``max_episode_steps``."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(
                f"action must be (14,) = [left arm (6), left gripper, right arm (6), right gripper], got {action.shape}"
            )
        if not self._raw:
            raise RuntimeError("call reset() before step()")
        timestep = self._env.step(action)
        self._raw = timestep.observation
        self._steps += 1
        reward = float(timestep.reward)
        info = self._info(reward)
        return self._observation(), reward, info["is_success"], self._steps >= self.max_episode_steps, info

    def close(self) -> None:
        """Release the renderer and the simulator."""
        self._task.cameras, self._video_camera = {}, None
        self._physics.free()
