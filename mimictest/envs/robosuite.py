"""robosuite 1.5 environments built from the metadata stored in robomimic hdf5 datasets.

robomimic (Mandlekar et al., 2021, https://github.com/ARISE-Initiative/robomimic) stores the
robosuite constructor arguments as JSON in ``data.attrs["env_args"]``. Its files were recorded with
robosuite 1.2-1.4, whose arm controller configs are flat ``{"type": "OSC_POSE", ...}`` dicts with a
``control_delta`` flag; robosuite 1.5 (https://github.com/ARISE-Initiative/robosuite) wants
composite configs whose OSC parts read ``input_type`` / ``input_ref_frame`` instead. This module
translates between the two and wraps the robosuite env as a gymnasium env following the mimictest
observation convention ``{"rgb": {"<camera>_image": (H, W, 3) uint8}, "low_dim": (D,) float32}``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium
import h5py
import numpy as np

from mimictest.data.robomimic import controller_is_absolute

_ROBOSUITE_LOGGER = "robosuite_logs"
_LEGACY_ARM_TYPES = ("OSC_POSE", "OSC_POSITION", "IK_POSE", "JOINT_POSITION", "JOINT_VELOCITY", "JOINT_TORQUE")
# robosuite <= 1.4 key -> robosuite 1.5 key of the same OSC gain setting.
_RENAMED_KEYS = {"damping": "damping_ratio", "damping_limits": "damping_ratio_limits"}
# robomimic low-dim names that differ from robosuite observable names.
_ROBOMIMIC_TO_ROBOSUITE = {"object": "object-state"}
# Asset folders robosuite 1.5 renamed, relative to robosuite/models/assets (robot mounts became bases).
_MOVED_ASSET_DIRS = {"mounts": "bases"}


class _DropBelowError(logging.Filter):
    """Drops the warnings robosuite logs while being imported (missing private macros, optional extras)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def import_robosuite() -> ModuleType:
    """Import robosuite without its import-time warnings; later INFO messages are hidden, warnings kept."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless offscreen rendering unless the user chose a backend
    logger = logging.getLogger(_ROBOSUITE_LOGGER)
    quiet = _DropBelowError()
    logger.addFilter(quiet)
    try:
        import robosuite
    finally:
        logger.removeFilter(quiet)
    logger.setLevel(logging.WARNING)
    return robosuite


def load_env_meta(dataset_path: str) -> dict:
    """Read robomimic's env metadata (``data.attrs["env_args"]``) from an hdf5 dataset."""
    if not os.path.isfile(dataset_path):
        raise FileNotFoundError(
            f"dataset {dataset_path!r} does not exist; generate it (e.g. `python -m mimictest.demos lift "
            f"--out {dataset_path}`) or pass the path of a robomimic hdf5 file"
        )
    with h5py.File(dataset_path, "r") as f:
        if "data" not in f or "env_args" not in f["data"].attrs:
            raise KeyError(
                f"{dataset_path!r} has no data.attrs['env_args']; expected a robomimic hdf5 file "
                "(group 'data' with a JSON 'env_args' attribute)"
            )
        env_meta = json.loads(f["data"].attrs["env_args"])
    return env_meta


def legacy_osc_pose_config(control_delta: bool) -> dict:
    """The robosuite <= 1.4 OSC_POSE arm config robomimic writes into its datasets' env_args."""
    return {
        "type": "OSC_POSE",
        "input_max": 1,
        "input_min": -1,
        "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
        "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
        "kp": 150,
        "damping": 1,
        "impedance_mode": "fixed",
        "kp_limits": [0, 300],
        "damping_limits": [0, 10],
        "position_limits": None,
        "orientation_limits": None,
        "uncouple_pos_ori": True,
        "control_delta": control_delta,
        "interpolation": None,
        "ramp_ratio": 0.2,
    }


def _set_input_mode(part: dict, absolute: bool) -> None:
    """Make an OSC part config take absolute world-frame poses or base-frame deltas."""
    if not str(part.get("type", "")).startswith("OSC"):
        raise ValueError(
            f"absolute/delta selection is only supported for OSC_POSE / OSC_POSITION arms, got {part.get('type')!r}"
        )
    part["input_type"] = "absolute" if absolute else "delta"
    part["input_ref_frame"] = "world" if absolute else "base"


def _robot_arms(robot: str) -> list[str]:
    """Arm names ("right", maybe "left") of a robot, read from its robosuite default composite config."""
    robosuite = import_robosuite()
    configs = Path(robosuite.__file__).parent / "controllers" / "config" / "robots"
    default_path = configs / f"default_{robot.lower()}.json"
    if not default_path.is_file():
        return ["right"]
    body_parts = json.loads(default_path.read_text()).get("body_parts", {})
    arms = [arm for arm in ("right", "left") if arm in body_parts.get("arms", body_parts)]
    return arms or ["right"]


def translate_controller_config(cfg: dict, robot: str, absolute: bool | None = None) -> dict:
    """Turn a robosuite <= 1.4 arm controller config into a robosuite 1.5 composite config.

    ``control_delta: false`` (or ``absolute=True``, which overrides it) gives an OSC taking absolute
    world-frame poses (``input_type="absolute"``, ``input_ref_frame="world"``); deltas use the base
    frame as robosuite 1.5 does by default. Composite configs pass through, with ``absolute`` applied
    to their OSC arms when given.
    """
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"controller config must be a dict with a 'type' key, got {cfg!r}")
    if "body_parts" in cfg:
        composite = copy.deepcopy(cfg)
        if absolute is not None:
            parts = composite["body_parts"]
            arms = parts.get("arms", parts)
            for arm in ("right", "left"):
                if arm in arms:
                    _set_input_mode(arms[arm], absolute)
        return composite
    if cfg["type"] not in _LEGACY_ARM_TYPES:
        raise ValueError(
            f"unknown controller type {cfg['type']!r}: expected a composite config (with 'body_parts') "
            f"or a robosuite <= 1.4 arm config with type in {_LEGACY_ARM_TYPES}"
        )
    part = {_RENAMED_KEYS.get(key, key): value for key, value in cfg.items() if key != "control_delta"}
    is_absolute = (not cfg.get("control_delta", True)) if absolute is None else absolute
    if str(part["type"]).startswith("OSC"):
        _set_input_mode(part, is_absolute)
    elif is_absolute:
        raise ValueError(f"absolute control is only supported for OSC controllers, got {part['type']!r}")
    import_robosuite()
    from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

    return refactor_composite_controller_config(part, robot, _robot_arms(robot))


def remap_model_xml(model_xml: str) -> str:
    """Point a recorded MJCF's mesh and texture files at this machine's robosuite.

    robomimic's ``EnvRobosuite.reset_to`` (robomimic/envs/env_robosuite.py) passes the demo's
    ``model_file`` through robosuite's ``edit_model_xml`` (``postprocess_model_xml`` before
    robosuite 1.4): every ``file`` path of an ``<asset>`` mesh or texture that has a ``robosuite``
    component keeps what follows the last one, under the installed package's folder. robosuite
    1.5 also renamed ``models/assets/mounts`` to ``models/assets/bases``, which robosuite 1.4 files
    name, so that folder is renamed too. Backslashes count as separators; paths without a
    ``robosuite`` component are kept.
    """
    package = Path(import_robosuite().__file__).parent
    root = ET.fromstring(model_xml)
    asset = root.find("asset")
    for elem in [] if asset is None else [*asset.findall("mesh"), *asset.findall("texture")]:
        old = elem.get("file")
        parts = [] if old is None else old.replace("\\", "/").split("/")  # a Windows recording's too
        if "robosuite" not in parts:
            continue
        rest = parts[max(i for i, part in enumerate(parts) if part == "robosuite") + 1 :]
        if rest[:2] == ["models", "assets"] and len(rest) > 2:
            rest[2] = _MOVED_ASSET_DIRS.get(rest[2], rest[2])
        elem.set("file", str(package.joinpath(*rest)))
    return ET.tostring(root, encoding="unicode")


class RobosuiteEnv(gymnasium.Env):
    """A robosuite task as a gymnasium env with mimictest's ``{"rgb", "low_dim"}`` observations.

    ``rgb_keys`` / ``low_dim_keys`` use robomimic names (``agentview_image``, ``object``,
    ``robot0_eef_pos``, ...). Images are returned upright, as robomimic datasets store them.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        env_meta: dict,
        rgb_keys: list[str],
        low_dim_keys: list[str],
        max_episode_steps: int,
        image_size: tuple[int, int] | None = None,
        absolute: bool | None = None,
        render_video: bool = False,
        video_camera: str = "agentview",
        video_size: int = 256,
    ) -> None:
        super().__init__()
        if env_meta.get("type") != 1 or "env_name" not in env_meta or "env_kwargs" not in env_meta:
            raise ValueError(
                "env_meta must be robomimic robosuite metadata {'env_name': ..., 'type': 1, 'env_kwargs': {...}}, "
                f"got keys {sorted(env_meta)} with type {env_meta.get('type')!r}"
            )
        bad_rgb = [key for key in rgb_keys if not key.endswith("_image")]
        if bad_rgb:
            raise ValueError(f"rgb_keys must be '<camera>_image' names like 'agentview_image', got {bad_rgb}")
        if max_episode_steps <= 0:
            raise ValueError(f"max_episode_steps must be positive, got {max_episode_steps}")
        robosuite = import_robosuite()
        from robosuite import macros

        kwargs: dict[str, Any] = copy.deepcopy(env_meta["env_kwargs"])
        robots = kwargs.get("robots", ["Panda"])
        robot = robots[0] if isinstance(robots, (list, tuple)) else robots
        controller = kwargs.get("controller_configs") or robosuite.load_composite_controller_config(robot=robot)
        kwargs["controller_configs"] = translate_controller_config(controller, robot, absolute)
        self.absolute = controller_is_absolute(kwargs["controller_configs"])

        self._cameras = [key[: -len("_image")] for key in rgb_keys]
        self._rgb_keys = list(rgb_keys)
        if image_size is None:
            height, width = kwargs.get("camera_heights", 84), kwargs.get("camera_widths", 84)
            height = height[0] if isinstance(height, (list, tuple)) else height
            width = width[0] if isinstance(width, (list, tuple)) else width
        else:
            height, width = image_size
        self.image_size = (int(height), int(width))
        kwargs.update(
            has_renderer=False,
            has_offscreen_renderer=bool(self._cameras) or render_video,
            use_camera_obs=bool(self._cameras),
            camera_names=self._cameras or "agentview",
            camera_heights=self.image_size[0],
            camera_widths=self.image_size[1],
            camera_depths=False,
            ignore_done=True,
            use_object_obs=True,
        )
        self._env = robosuite.make(env_meta["env_name"], **kwargs)
        self._flip = macros.IMAGE_CONVENTION == "opengl"

        raw_obs = self._env.observation_spec()
        available = sorted(
            [name for name in raw_obs if not name.endswith(("_image", "_depth")) and name != "object-state"]
            + ["object"]
        )
        unknown = [key for key in low_dim_keys if key not in available]
        if unknown:
            raise KeyError(f"unknown low-dim keys {unknown} for {env_meta['env_name']}; available: {available}")
        self._low_dim_keys = list(low_dim_keys)
        self._raw_low_dim = [_ROBOMIMIC_TO_ROBOSUITE.get(key, key) for key in low_dim_keys]

        spaces: dict[str, gymnasium.spaces.Space] = {}
        if self._cameras:
            image = gymnasium.spaces.Box(0, 255, shape=(*self.image_size, 3), dtype=np.uint8)
            spaces["rgb"] = gymnasium.spaces.Dict({key: image for key in self._rgb_keys})
        if self._low_dim_keys:
            dim = sum(int(np.asarray(raw_obs[key]).size) for key in self._raw_low_dim)
            spaces["low_dim"] = gymnasium.spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)
        self.observation_space = gymnasium.spaces.Dict(spaces)
        low, high = self._env.action_spec
        if self.absolute:
            # Absolute poses are not bounded by the delta input range; only the gripper is.
            low, high = np.full_like(low, -np.inf), np.full_like(high, np.inf)
            low[-1], high[-1] = -1.0, 1.0
        self.action_space = gymnasium.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)

        self.max_episode_steps = max_episode_steps
        self.render_video = render_video
        self.video_camera = video_camera
        self.video_size = video_size
        self._steps = 0
        self._raw_obs: dict[str, np.ndarray] = raw_obs

    @property
    def raw(self) -> Any:
        """The underlying robosuite environment."""
        return self._env

    def _upright(self, image: np.ndarray) -> np.ndarray:
        """Flip an OpenGL-convention (bottom-up) render upright. (H, W, 3) uint8."""
        return np.ascontiguousarray(image[::-1] if self._flip else image)

    def _observation(self) -> dict:
        """mimictest observation from the latest robosuite observation."""
        obs: dict = {}
        if self._cameras:
            obs["rgb"] = {key: self._upright(self._raw_obs[key]) for key in self._rgb_keys}  # {key: (H, W, 3)}
        if self._raw_low_dim:
            obs["low_dim"] = np.concatenate(
                [np.asarray(self._raw_obs[key], dtype=np.float32).ravel() for key in self._raw_low_dim]
            )  # (D,)
        return obs

    def robomimic_obs(self) -> dict[str, np.ndarray]:
        """Latest observation per robomimic key: upright uint8 images and float64 low-dim vectors."""
        obs = {key: self._upright(self._raw_obs[key]) for key in self._rgb_keys}
        for key, raw_key in zip(self._low_dim_keys, self._raw_low_dim):
            obs[key] = np.asarray(self._raw_obs[raw_key], dtype=np.float64).copy()
        return obs

    def _frame(self) -> np.ndarray:
        """Upright (video_size, video_size, 3) uint8 frame from the video camera."""
        image = self._env.sim.render(camera_name=self.video_camera, height=self.video_size, width=self.video_size)
        return self._upright(image)

    def _info(self, success: bool) -> dict[str, Any]:
        info: dict[str, Any] = {"is_success": success}
        if self.render_video:
            info["frame"] = self._frame()
        return info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset; a seed makes the robosuite object placement, cube size and robot init noise deterministic."""
        super().reset(seed=seed)
        if seed is not None:
            # robosuite shares one Generator between the env, its placement sampler and its objects:
            # reseed it in place so every holder sees the new stream.
            self._env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self._raw_obs = self._env.reset()
        self._steps = 0
        return self._observation(), self._info(False)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Apply a 7-d OSC_POSE action; terminated on task success, truncated at max_episode_steps."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {action.shape}")
        self._raw_obs, reward, _, _ = self._env.step(action)
        self._steps += 1
        success = bool(self._env._check_success())
        truncated = self._steps >= self.max_episode_steps
        return self._observation(), float(reward), success, truncated, self._info(success)

    def sim_state(self) -> np.ndarray:
        """Flattened MuJoCo state ``[time, qpos, qvel]``. (1 + nq + nv,) float64."""
        return self._env.sim.get_state().flatten()

    def model_xml(self) -> str:
        """MJCF of the current model (cube size and textures included)."""
        return self._env.sim.model.get_xml()

    def reset_to(self, state: np.ndarray, model_xml: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset to a recorded flattened state, first reloading ``model_xml`` if given (robomimic convention).

        The model's asset paths are remapped to this machine's robosuite (``remap_model_xml``). A
        model whose element names are not this env's (robosuite <= 1.4 names the gripper's sites
        ``gripper0_grip_site``, robosuite 1.5 ``gripper0_right_grip_site``) is refused before
        anything is loaded, so the env stays usable.
        """
        if model_xml is not None:
            xml = remap_model_xml(model_xml)
            root = ET.fromstring(xml)
            files = [e.get("file") for e in root.iter() if e.tag in ("mesh", "texture") and e.get("file")]
            missing_files = [f for f in files if os.path.isabs(f) and not os.path.isfile(f)]
            if missing_files:
                raise FileNotFoundError(
                    f"model_xml names {len(missing_files)} asset file(s) absent from this robosuite "
                    f"{import_robosuite().__version__}, e.g. {missing_files[0]!r}; it was recorded with another "
                    "robosuite version: reset_to(state) without model_xml, or install the version that recorded it"
                )
            sites = {e.get("name") for e in root.iter("site")}
            absent = [name for name in self._env.sim.model.site_names if name not in sites]
            if absent:
                raise ValueError(
                    f"model_xml lacks this env's site(s) {absent[:3]} (it has {sorted(sites)[:3]}...): it was written "
                    f"by another robosuite version (<= 1.4 names them gripper0_*, 1.5 gripper0_right_*) and robosuite "
                    f"{import_robosuite().__version__} cannot run it; reset_to(state) without model_xml restores the "
                    "state in this env's own model, or use robomimic's datasets regenerated for robosuite 1.5 (v0.4+)"
                )
            self._env.reset_from_xml_string(xml)
            self._env.sim.reset()
        state = np.asarray(state, dtype=np.float64).ravel()
        expected = 1 + self._env.sim.model.nq + self._env.sim.model.nv
        if state.shape[0] != expected:
            raise ValueError(
                f"state has {state.shape[0]} values but this model expects {expected} (time, qpos, qvel); "
                "pass the demo's model_xml so the matching model is loaded"
            )
        self._env.sim.set_state_from_flattened(state)
        self._env.sim.forward()
        self._env.update_state()
        self._raw_obs = self._env._get_observations(force_update=True)
        self._steps = 0
        return self._observation(), self._info(bool(self._env._check_success()))

    def close(self) -> None:
        """Release the simulator and renderer."""
        self._env.close()
