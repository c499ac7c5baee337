"""CALVIN's play table (calvin_env, PyBullet) as a gymnasium env with mimictest's observations.

CALVIN (Mees et al., "CALVIN: A Benchmark for Language-Conditioned Policy Learning for
Long-Horizon Robot Manipulation Tasks", RA-L 2022; github.com/mees/calvin_env) is a Franka Panda at
a desk with a drawer, a sliding door, a button (the green LED), a switch (the lightbulb) and three
blocks, in four scenes A to D. The simulation, its scenes and cameras, the relative-action
controller and the task oracle (``calvin_env.envs.tasks.Tasks``) are calvin_env's; this module
picks what a policy sees and how an episode starts and ends:

- Observations: ``{"rgb": {"static": (200, 200, 3), "gripper": (84, 84, 3)} uint8, "low_dim":
  (15,) float32}``; ``low_dim`` is CALVIN's ``robot_obs``: tcp xyz, tcp euler (PyBullet's
  convention), gripper opening width, the 7 arm joints and the last gripper action (-1 closed,
  1 open).
- Actions, 7-d, by ``action_mode``:
  - ``"relative"``: CALVIN's ``rel_actions``, xyz and euler deltas in [-1, 1] (times 2 cm and
    0.05 rad per step, calvin_env's ``max_rel_pos`` / ``max_rel_orn``), clipped, and the gripper;
  - ``"absolute"``: the tcp target xyz (metres, world frame), the target orientation as
    mimictest's intrinsic X-Y-Z euler angles (``mimictest.rotation``'s ``euler_xyz``, so the
    unified 6D action space maps it exactly) and the gripper. CALVIN's own ``actions`` use
    PyBullet's extrinsic x-y-z angles; ``pybullet_to_euler_xyz`` converts them (the dataset
    readers do), and this env converts back before PyBullet's IK.
  The gripper is open for a value > 0 and closed otherwise (CALVIN's -1 / 1).
- Episodes are chains of subtasks (CALVIN's long-horizon evaluation, one subtask for single-task
  rollouts). ``reset(options={"robot_obs": ..., "scene_obs": ..., "tasks": [...]})`` puts the
  robot and the scene in the given state, as CALVIN's evaluation does
  (``PlayTableSimEnv.reset(robot_obs, scene_obs)``), and ``"condition"`` instead of the two arrays
  builds them from a symbolic start state (``mimictest.chained.condition_state``). ``reset(seed=s)``
  lets calvin_env place the blocks at random with seed ``s`` (its own randomised start).
- Success: after every step the task oracle compares the scene at the start of the current
  subtask with the current one; when it reports the subtask, ``info["subtask_success"]`` is set
  and the next subtask (and its instruction) begins from the current state. The episode is
  ``terminated`` when every subtask is done (``info["is_success"]``), ``truncated`` when a subtask
  is not done within ``max_subtask_steps`` (CALVIN: 360). ``info["completed"]`` counts the
  subtasks done, ``info["score"]`` is that over the chain's length, ``info["subtask"]`` is the
  index of the current subtask.

The env is built from a dataset's ``.hydra/merged_config.yaml`` when ``dataset_path`` is given
(CALVIN's convention: its evaluation reads ``<dataset>/validation/.hydra/merged_config.yaml``),
otherwise from calvin_env's own ``conf/`` (cameras ``static_and_gripper``, robot
``panda_longer_finger``, the tasks of ``new_playtable_tasks``, the scene given, D by default).
Images are rendered with PyBullet's TinyRenderer on the CPU (``use_egl=False``, about 12 steps/s
with both cameras on one core); ``use_egl=True`` asks for PyBullet's EGL plugin.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Any, Sequence

import gymnasium
import numpy as np
from scipy.spatial.transform import Rotation

INSTALL = ("calvin_env is not installed; it is not on PyPI: git clone --recursive "
           "https://github.com/mees/calvin_env, then pip install -e calvin_env (and pip install -e \".[calvin]\" "
           "here for its dependencies)")
CAMERAS = ("static", "gripper")
IMAGE_SIZES = {"static": (200, 200), "gripper": (84, 84)}  # CALVIN's standard cameras
LOW_DIM = 15  # robot_obs
SCENE_DIM = 24  # scene_obs
ACTION_DIM = 7
ACTION_MODES = ("relative", "absolute")
EP_LEN = 360  # CALVIN's steps per subtask (evaluate_policy.py's EP_LEN)
MAX_REL_POS, MAX_REL_ORN = 0.02, 0.05  # calvin_env Robot defaults: metres / radians per unit relative action
# The values of calvin_env's conf/env/play_table_env.yaml (which the dataset's merged config repeats).
ENV_NODE = {"_target_": "calvin_env.envs.play_table_env.PlayTableSimEnv", "_recursive_": False,
            "cameras": "${cameras}", "seed": 0, "bullet_time_step": 240.0, "use_vr": False, "show_gui": False,
            "robot_cfg": "${robot}", "scene_cfg": "${scene}", "use_scene_info": True, "use_egl": False,
            "control_freq": 30}


def require_calvin():
    """Import calvin_env, or raise one line saying how to install it."""
    try:
        import calvin_env
    except ImportError as err:
        raise ImportError(INSTALL) from err
    return calvin_env


def conf_dir() -> str:
    """calvin_env's ``conf/`` folder (beside its package in a source checkout)."""
    calvin_env = require_calvin()
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(calvin_env.__file__))), "conf")
    if not os.path.isdir(os.path.join(path, "scene")):
        raise FileNotFoundError(f"calvin_env's conf/ folder is not at {path}; install calvin_env from its source "
                                "checkout with pip install -e (its scenes and configs live beside the package)")
    return path


def merged_config_path(dataset_path: str) -> str:
    """The ``.hydra/merged_config.yaml`` of a CALVIN dataset folder (itself, ``validation/`` or ``training/``)."""
    for sub in ("", "validation", "training"):
        path = os.path.join(dataset_path, sub, ".hydra", "merged_config.yaml")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{dataset_path!r} has no .hydra/merged_config.yaml (nor validation/ or training/ with "
                            "one); give a CALVIN dataset folder, or dataset_path=None to use calvin_env's conf/")


def env_config(dataset_path: str | None = None, scene: str | None = None, use_egl: bool = False):
    """The OmegaConf config (``env``, ``cameras``, ``robot``, ``scene``, ``tasks``) the env is built from.

    ``scene``: a scene of calvin_env's ``conf/scene`` (``"calvin_scene_D"``...); with a dataset it
    replaces the dataset's scene (as calvin_env's ``get_env(scene=...)`` does), without one it
    defaults to ``"calvin_scene_D"``.
    """
    require_calvin()
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    conf = conf_dir()
    if dataset_path is not None:
        cfg = OmegaConf.load(merged_config_path(dataset_path))
        if scene is not None:
            cfg.scene = OmegaConf.load(os.path.join(conf, "scene", f"{scene}.yaml"))
    else:
        # Each group composed on its own: calvin_env's primary configs also pull in VR and recorder groups.
        with initialize_config_dir(config_dir=conf, version_base=None):
            cfg = compose(overrides=["+cameras=static_and_gripper", f"+scene={scene or 'calvin_scene_D'}",
                                     "+robot=panda_longer_finger", "+tasks=new_playtable_tasks"])
        with open_dict(cfg):
            cfg.data_path = "data"
            cfg.env = ENV_NODE
    with open_dict(cfg):
        missing = [cam for cam in CAMERAS if cam not in cfg.cameras]
        if missing:
            raise KeyError(f"the CALVIN config has no camera(s) {missing}; it has {list(cfg.cameras)}")
        for cam in [c for c in cfg.cameras if c not in CAMERAS]:  # e.g. the tactile sensor (needs tacto)
            del cfg.cameras[cam]
        cfg.env.use_egl, cfg.env.show_gui, cfg.env.use_vr, cfg.env.use_scene_info = use_egl, False, False, True
    return cfg


def pybullet_to_euler_xyz(euler: np.ndarray) -> np.ndarray:
    """``(..., 3)`` PyBullet (extrinsic x-y-z) euler angles -> mimictest's intrinsic X-Y-Z angles, same rotation."""
    euler = np.asarray(euler, dtype=np.float64)
    return Rotation.from_euler("xyz", euler.reshape(-1, 3)).as_euler("XYZ").reshape(euler.shape)


def euler_xyz_to_pybullet(euler: np.ndarray) -> np.ndarray:
    """The inverse of ``pybullet_to_euler_xyz``."""
    euler = np.asarray(euler, dtype=np.float64)
    return Rotation.from_euler("XYZ", euler.reshape(-1, 3)).as_euler("xyz").reshape(euler.shape)


@contextlib.contextmanager
def _quiet():
    """Silence calvin_env's prints and hydra's log lines while building or closing an env."""
    level = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hydra's version_base notice on calvin_env's @hydra.main
            yield
    finally:
        logging.disable(level)


class CalvinEnv(gymnasium.Env):
    """A CALVIN play table running chains of subtasks, judged by calvin_env's task oracle.

    Args:
        dataset_path: a CALVIN dataset folder whose ``.hydra/merged_config.yaml`` defines the env,
            or ``None`` for calvin_env's ``conf/``.
        scene: the scene (``"calvin_scene_A"`` .. ``"calvin_scene_D"``); ``None``: the dataset's, or D.
        action_mode: ``"relative"`` or ``"absolute"`` (see the module docstring).
        tasks: the default chain of subtasks for resets whose options name none (e.g. seeded ones).
        max_subtask_steps: steps allowed per subtask (CALVIN: 360).
        render_video: add ``info["frame"]``, the static camera's image.
        use_egl: render with PyBullet's EGL plugin instead of the TinyRenderer.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        dataset_path: str | None = None,
        scene: str | None = None,
        action_mode: str = "relative",
        tasks: Sequence[str] = (),
        max_subtask_steps: int = EP_LEN,
        render_video: bool = False,
        use_egl: bool = False,
    ) -> None:
        super().__init__()
        if action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {action_mode!r}")
        if max_subtask_steps < 1:
            raise ValueError(f"max_subtask_steps must be >= 1, got {max_subtask_steps}")
        import hydra

        self.config = env_config(dataset_path, scene, use_egl)
        with _quiet():  # calvin_env prints and logs while it builds
            self._env = hydra.utils.instantiate(self.config.env)
            self.oracle = hydra.utils.instantiate(self.config.tasks)
        self.task_names: list[str] = list(self.oracle.tasks)
        self.default_tasks = self._check_tasks(tasks) if tasks else []
        self.action_mode, self.max_subtask_steps, self.render_video = action_mode, int(max_subtask_steps), render_video
        self.observation_space = gymnasium.spaces.Dict({
            "rgb": gymnasium.spaces.Dict({cam: gymnasium.spaces.Box(0, 255, (*IMAGE_SIZES[cam], 3), np.uint8)
                                          for cam in CAMERAS}),
            "low_dim": gymnasium.spaces.Box(-np.inf, np.inf, (LOW_DIM,), np.float32),
        })
        low = -np.ones(ACTION_DIM, np.float32) if action_mode == "relative" else np.full(ACTION_DIM, -np.inf, np.float32)
        self.action_space = gymnasium.spaces.Box(low, -low, dtype=np.float32)
        self.tasks: list[str] = []
        self.subtask = self.subtask_steps = 0
        self.start_info: dict = {}
        self._obs: dict = {}

    @property
    def raw(self) -> Any:
        """calvin_env's ``PlayTableSimEnv`` (``robot``, ``scene``, ``get_info()``, ``get_obs()``)."""
        return self._env

    @property
    def robot_obs(self) -> np.ndarray:
        """CALVIN's ``(15,)`` robot state at the current step."""
        return np.asarray(self._obs["robot_obs"], dtype=np.float64).copy()

    @property
    def scene_obs(self) -> np.ndarray:
        """CALVIN's ``(24,)`` scene state: drawer, slider, button, switch, lightbulb, LED, then each block's xyz + euler."""
        return np.asarray(self._obs["scene_obs"], dtype=np.float64).copy()

    @property
    def raw_obs(self) -> dict:
        """calvin_env's last observation (``rgb_obs``, ``depth_obs``, ``robot_obs``, ``scene_obs``)."""
        return self._obs

    def _check_tasks(self, tasks: Sequence[str]) -> list[str]:
        tasks = [str(t) for t in tasks]
        unknown = [t for t in tasks if t not in self.oracle.tasks]
        if unknown:
            raise ValueError(f"unknown CALVIN task(s) {unknown}; the oracle knows {self.task_names}")
        return tasks

    def achieved(self) -> set[str]:
        """Every task the oracle sees done between the current subtask's start and now."""
        return self.oracle.get_task_info(self.start_info, self._env.get_info())

    def _observation(self) -> dict:
        rgb = self._obs["rgb_obs"]
        return {"rgb": {cam: np.ascontiguousarray(rgb[f"rgb_{cam}"], dtype=np.uint8) for cam in CAMERAS},
                "low_dim": np.asarray(self._obs["robot_obs"], dtype=np.float32)}

    def _info(self, subtask_success: bool) -> dict[str, Any]:
        n = max(len(self.tasks), 1)
        info: dict[str, Any] = {"is_success": bool(self.tasks) and self.subtask >= len(self.tasks),
                                "completed": self.subtask, "subtask": min(self.subtask, n - 1),
                                "subtask_success": subtask_success, "score": self.subtask / n}
        if self.render_video:
            info["frame"] = np.asarray(self._obs["rgb_obs"]["rgb_static"], dtype=np.uint8).copy()
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Start a chain: from ``options`` (``robot_obs`` + ``scene_obs``, or ``condition``; ``tasks``), or seeded."""
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"robot_obs", "scene_obs", "condition", "tasks"}
        if unknown:
            raise ValueError(f"unknown CalvinEnv reset options {sorted(unknown)}; "
                             "use robot_obs + scene_obs or condition, and tasks")
        if "condition" in options:
            from mimictest.chained import condition_state

            options["robot_obs"], options["scene_obs"] = condition_state(options.pop("condition"))
        robot_obs, scene_obs = options.get("robot_obs"), options.get("scene_obs")
        for name, value, dim in (("robot_obs", robot_obs, LOW_DIM), ("scene_obs", scene_obs, SCENE_DIM)):
            if value is not None and np.shape(value) != (dim,):
                raise ValueError(f"reset option {name} must have shape ({dim},), got {np.shape(value)}")
        if seed is not None:
            self._env.seed(int(seed))
            # The scene and its blocks keep the generator they were built with; give them the new one.
            self._env.scene.np_random = self._env.np_random
            for block in self._env.scene.movable_objects:
                block.np_random = self._env.np_random
        self._obs = self._env.reset(
            robot_obs=None if robot_obs is None else np.asarray(robot_obs, dtype=np.float64),
            scene_obs=None if scene_obs is None else np.asarray(scene_obs, dtype=np.float64))
        self.tasks = self._check_tasks(options["tasks"]) if "tasks" in options else list(self.default_tasks)
        self.subtask = self.subtask_steps = 0
        self.start_info = self._env.get_info()
        return self._observation(), self._info(False)

    def _calvin_action(self, action: np.ndarray):
        gripper = 1 if action[6] > 0 else -1
        if self.action_mode == "relative":
            return np.concatenate((np.clip(action[:6], -1.0, 1.0), [gripper]))
        return action[:3].astype(np.float64), euler_xyz_to_pybullet(action[3:6]), gripper

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict[str, Any]]:
        """One CALVIN control step (30 Hz: 8 PyBullet steps), then the oracle's verdict on the current subtask."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"a CALVIN action is (7,) xyz, euler, gripper ({self.action_mode}), got shape {action.shape}")
        self._obs, _, _, info = self._env.step(self._calvin_action(action))
        self.subtask_steps += 1
        done_now = False
        if self.subtask < len(self.tasks):
            current = self.tasks[self.subtask]
            if self.oracle.get_task_info_for_set(self.start_info, info, {current}):
                done_now = True
                self.subtask += 1
                self.subtask_steps = 0
                self.start_info = info
        terminated = bool(self.tasks) and self.subtask >= len(self.tasks)
        truncated = not terminated and self.subtask_steps >= self.max_subtask_steps
        return self._observation(), float(done_now), terminated, truncated, self._info(done_now)

    def close(self) -> None:
        """Disconnect PyBullet."""
        if getattr(self, "_env", None) is not None:
            with _quiet():
                self._env.close()
            self._env.close = lambda: None  # its __del__ would disconnect again, and raise
            self._env = None
