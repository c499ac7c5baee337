"""PushT (Florence et al. 2021; Chi et al. 2023) as a gymnasium env with diffusion_policy's observations.

Simulation and rendering are gym-pusht's (github.com/huggingface/gym-pusht, a port of
diffusion_policy's ``PushTEnv``: pymunk physics, a PD-controlled disc whose action is its target
position in [0, 512]^2, success when the T covers more than 95% of the goal). The observations follow
diffusion_policy's (github.com/real-stanford/diffusion_policy) datasets, so that a policy trained on
``pusht_cchi_v7_replay.zarr`` sees the same inputs here:

- ``obs_mode="image"``: ``{"rgb": {"image": (96, 96, 3) uint8}, "low_dim": (2,) agent_pos}``. The image is
  gym-pusht's 96x96 render (pygame canvas, ``cv2.resize``, no action marker), the renderer
  diffusion_policy's ``PushTImageEnv`` and its data collection use.
- ``obs_mode="keypoint"``: ``{"low_dim": (20,)}``, the 9 block keypoints flattened then agent_pos,
  as diffusion_policy's ``PushTKeypointsEnv`` (all keypoints visible) and its ``data/keypoint``.

gym-pusht's ``get_keypoints`` returns the 8 polygon vertices instead, so the 9 keypoints are
reproduced here: diffusion_policy's ``PymunkKeypointManager.create_from_pusht_env`` draws the T at
pose (256, 300, 0), takes the farthest-point samples of its pixels in the body frame with
``np.random.default_rng(0)`` and adds a uniform [0, 1) shift; ``BLOCK_KEYPOINTS`` holds the result
(``tests/test_pusht.py`` recomputes it), and ``block_keypoints`` maps it to the world frame.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium
import numpy as np

from mimictest.data.pusht import CAMERA

GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])  # x, y, angle of the goal T (gym-pusht, diffusion_policy)
IMAGE_SIZE = 96
SUCCESS_COVERAGE = 0.95
OBS_MODES = ("image", "keypoint")
# (9, 2) block keypoints in the T's body frame (x right, y down; the bar spans y in [0, 30]).
BLOCK_KEYPOINTS = np.array([
    [9.26978671, 90.04097352], [-60.98347236, -1.18672976], [60.91275558, -1.39336422],
    [-0.27050344, 25.54362499], [-14.06492758, 122.81585355], [39.0027385, 32.85740428],
    [-39.96641442, 32.72965545], [-16.82434438, 62.86317892], [23.54146122, -1.70028811],
])


def block_keypoints(block_pose: np.ndarray) -> np.ndarray:
    """``(3,)`` block x, y, angle -> ``(9, 2)`` keypoints in world (pixel) coordinates."""
    x, y, angle = np.asarray(block_pose, dtype=np.float64)
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    return BLOCK_KEYPOINTS @ rotation.T + np.array([x, y])


def score(coverage: float) -> float:
    """PushT's score ``clip(coverage / 0.95, 0, 1)`` (gym-pusht's and Diffusion Policy's reward)."""
    return float(np.clip(coverage / SUCCESS_COVERAGE, 0.0, 1.0))


def import_gym_pusht() -> type:
    """gym-pusht's env class, imported without pygame's greeting (pygame renders off-screen here)."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    from gym_pusht.envs import PushTEnv as GymPushTEnv

    return GymPushTEnv


class PushTEnv(gymnasium.Env):
    """gym-pusht's ``PushT-v0`` with mimictest's ``{"rgb", "low_dim"}`` observations.

    Args:
        obs_mode: ``"image"`` or ``"keypoint"`` (see the module docstring).
        max_episode_steps: truncation limit (diffusion_policy evaluates PushT for 300 steps).
        render_video: add ``info["frame"]``, a ``(video_size, video_size, 3)`` uint8 upright render
            with the commanded target drawn as a cross.
        video_size: side of the video frames.

    ``info["coverage"]`` is the raw fraction of the goal the T covers, in [0, 1]; ``info["score"]``
    is ``clip(coverage / 0.95, 0, 1)``, the reward of gym-pusht and Diffusion Policy's ``PushTEnv``,
    whose episode maximum both Diffusion Policy (``test/mean_score``) and LeRobot
    (``avg_max_reward``) report as the PushT score. ``terminated`` and ``info["is_success"]`` when
    the coverage exceeds 0.95 (all three references' success).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        obs_mode: str = "image",
        max_episode_steps: int = 300,
        render_video: bool = False,
        video_size: int = 256,
    ) -> None:
        super().__init__()
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        if max_episode_steps <= 0:
            raise ValueError(f"max_episode_steps must be positive, got {max_episode_steps}")
        self.obs_mode = obs_mode
        self.max_episode_steps = max_episode_steps
        self.render_video = render_video
        self._env = import_gym_pusht()(
            obs_type="pixels_agent_pos" if obs_mode == "image" else "state",
            render_mode="rgb_array",
            observation_width=IMAGE_SIZE,
            observation_height=IMAGE_SIZE,
            visualization_width=video_size,
            visualization_height=video_size,
        )
        spaces: dict[str, gymnasium.spaces.Space] = {}
        if obs_mode == "image":
            image = gymnasium.spaces.Box(0, 255, shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            spaces["rgb"] = gymnasium.spaces.Dict({CAMERA: image})
        # Pixel coordinates, normally in [0, 512]; the disc is kinematic and can be driven past the walls.
        dim = 2 if obs_mode == "image" else BLOCK_KEYPOINTS.size + 2
        spaces["low_dim"] = gymnasium.spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)
        self.observation_space = gymnasium.spaces.Dict(spaces)
        self.action_space = gymnasium.spaces.Box(0.0, 512.0, shape=(2,), dtype=np.float32)
        self._steps = 0

    @property
    def raw(self) -> Any:
        """The underlying gym-pusht env (pymunk ``space``, ``agent`` and ``block`` bodies)."""
        return self._env

    def state(self) -> np.ndarray:
        """``(5,)`` float64 agent x, y, block x, y, block angle (unwrapped), as diffusion_policy's ``data/state``."""
        agent, block = self._env.agent, self._env.block
        return np.array([agent.position.x, agent.position.y, block.position.x, block.position.y, block.angle])

    def _observation(self, raw_obs: Any) -> dict:
        agent_pos = np.asarray(self._env.agent.position, dtype=np.float32)  # (2,)
        if self.obs_mode == "image":
            return {"rgb": {CAMERA: raw_obs["pixels"].copy()}, "low_dim": agent_pos}  # (96, 96, 3), (2,)
        keypoints = block_keypoints(self.state()[2:]).astype(np.float32).ravel()  # (18,)
        return {"low_dim": np.concatenate([keypoints, agent_pos])}  # (20,)

    def _info(self, success: bool, coverage: float) -> dict[str, Any]:
        info: dict[str, Any] = {"is_success": success, "score": score(coverage), "coverage": coverage}
        if self.render_video:
            info["frame"] = self._env.render()
        return info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Random agent and block placement from gym-pusht's seeded RNG; ``options`` pass through
        (``{"reset_to_state": [agent x, y, block x, y, angle]}``)."""
        super().reset(seed=seed)
        raw_obs, _ = self._env.reset(seed=seed, options=options)
        self._steps = 0
        return self._observation(raw_obs), self._info(False, float(self._env._get_coverage()))

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Move the disc's PD target to ``action`` (2,) for one 0.1 s control step."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"a PushT action is the (2,) target position of the disc, got shape {action.shape}")
        raw_obs, reward, _, _, raw_info = self._env.step(action)
        self._steps += 1
        coverage = float(raw_info["coverage"])
        success = coverage > SUCCESS_COVERAGE
        truncated = self._steps >= self.max_episode_steps
        return self._observation(raw_obs), float(reward), success, truncated, self._info(success, coverage)

    def close(self) -> None:
        """Release gym-pusht (it only holds a window in human render mode, unused here)."""
        self._env.close()
