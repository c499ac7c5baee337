"""Meta-World tasks as gymnasium envs with mimictest's ``{"rgb", "low_dim"}`` observations.

Meta-World (Yu et al., "Meta-World: A Benchmark and Evaluation for Multi-Task and Meta Reinforcement
Learning", CoRL 2019; https://github.com/Farama-Foundation/Metaworld, release 3.1.1, the ``-v3``
tasks on MuJoCo 3.3.0) is 50 tabletop tasks for one Sawyer arm. The simulation, the 39-d state, the
rewards, the success test and the scripted experts are Meta-World's; this module only picks what a
policy sees and how a seed maps to a start:

- Observations: ``{"rgb": {cam: (H, W, 3) uint8}, "low_dim": (4,) float32}`` (no ``"rgb"`` when
  ``cams=()``). ``low_dim`` is the proprioceptive part of Meta-World's observation, its first 4
  dims: the ``hand`` body's xyz (metres, world frame) and the gripper opening (finger distance /
  0.1 m, clipped to [0, 1]). The other 35 dims (objects, the previous frame, the goal) are what
  the scripted experts read; they are available as ``full_state`` and stored by the demos as
  ``data/full_state``. (3D Diffusion Policy, Ze et al. RSS 2024, gives its policy a 9-d robot
  state, the hand and both fingertip sites, ``robot_state()`` here and ``data/state`` in its files.)
- Goals are observable, as in Meta-World's multi-task benchmarks (MT1/MT10/MT50 build their tasks
  with ``partially_observable=False``): the last 3 dims of ``full_state`` are the goal position.
- Seeds: ``reset(seed=s)`` seeds the Meta-World env's own generator (``SawyerXYZEnv.seed``) and
  lets it draw the task's random initialisation vector (object and goal positions) from its
  ``_random_reset_space`` (``seeded_rand_vec``), the distribution Meta-World's benchmarks draw
  their 50 fixed goals per task from. The same seed gives the same start, every seed a fresh one;
  ``reset()`` without a seed continues the generator. The scripted demos use seeds below 100000,
  evaluations 100000 and up (``EVAL_SEED_START``).
- Actions: Meta-World's 4-d action, an xyz end-effector displacement in [-1, 1] (times 1 cm per
  step) and the gripper effort in [-1, 1] (+1 closes), clipped to the action space.
- Episodes: ``terminated`` at the first step where Meta-World's ``info["success"]`` is set (its
  success-rate evaluations count an episode as solved once this happens; its
  ``AutoTerminateOnSuccessWrapper`` ends episodes the same way), ``truncated`` after
  ``max_episode_steps`` (default Meta-World's ``max_path_length``, 500). ``info["score"]`` is
  Meta-World's reward divided by its maximum of 10 (a shaped progress measure: at the first success
  it is 1 for about half the tasks and 0.03 to 0.99 for the others), ``info["is_success"]`` the flag.

Images are rendered offscreen by MuJoCo (``mujoco.Renderer``, headless through EGL unless
``MUJOCO_GL`` says otherwise; Mesa kept single-threaded so forked workers do not hang, as in
``mimictest.envs.aloha``). Meta-World's fixed corner cameras (``corner``, ``corner2``, ``corner3``,
``corner4``) are defined with their image-up axis pointing at the floor, so their raw renders are
upside down (Farama-Foundation/Metaworld#505, #516). Any camera whose up axis points below the
horizon is turned 180 degrees here, which is the view of an upright camera at the same place; a
vertical flip alone, the common fix, gives a mirror image instead.

Rendering on a CPU (Mesa's llvmpipe behind EGL) is dominated by Meta-World's shadow map (4096
texels), reflections and 4x multisampling: about 100 ms for one 84x84 image on one core. With
``render_quality="fast"`` (the default) shadows, reflections and multisampling are off, about 7 ms
for the same image (mean absolute pixel difference 5 of 255: the shadows are gone, the rest is
unchanged); ``"full"`` renders Meta-World's own look. Demos and evaluation should use the same setting.
"""

from __future__ import annotations

import os

# Read when MuJoCo first creates a rendering context (see the module docstring).
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("LP_NUM_THREADS", "0")

import atexit
import weakref
from typing import Any, Sequence

import gymnasium
import mujoco
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from mimictest.preprocess import per_camera

# Meta-World 3.1.1's MT10 (``metaworld.env_dict.MT10_V3``), in its order.
MT10_TASKS: list[str] = [
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
    "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
]
# Short instructions for all 50 tasks, paraphrased from the task descriptions in Appendix A of the
# Meta-World paper (Yu et al. 2019). Rotation directions are left out of the faucet, dial and lock
# tasks: the paper's descriptions and the simulated motions disagree (Farama-Foundation/Metaworld#516).
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "dunk the basketball into the basket",
    "bin-picking-v3": "pick the puck from one bin and place it into the other bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "reach over the wall and press the button from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "reach around the wall and press the button",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pick the nut off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "put the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet handle to open the faucet",
    "faucet-close-v3": "turn the faucet handle to close the faucet",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "push the soccer ball into the goal",
    "stick-push-v3": "grasp the stick and push the box with it",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
TASKS: tuple[str, ...] = tuple(ALL_V3_ENVIRONMENTS)  # all 50, in Meta-World's order
# The cameras of Meta-World's Sawyer scene (``xyz_base.xml``).
CAMERAS: tuple[str, ...] = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
LOW_DIM = 4  # hand xyz + gripper opening, Meta-World's obs[:4]
ACTION_DIM = 4
MAX_REWARD = 10.0  # Meta-World's v2 reward functions (the default) lie in [0, 10]
RENDER_QUALITIES = ("fast", "full")
EVAL_SEED_START = 100_000  # demos use seeds below this, evaluations this and up
_OPEN_ENVS: weakref.WeakSet = weakref.WeakSet()  # envs whose renderers are still open
_exit_hook_registered = False


def _close_open_envs() -> None:
    """Free the renderers still open at exit (freeing them after EGL's display is gone raises errors)."""
    for env in list(_OPEN_ENVS):
        env.close()


def _track_open_env(env: MetaWorldEnv) -> None:
    """Close ``env`` at exit unless closed before. The hook is registered after the first renderer
    exists, hence after MuJoCo's EGL ``atexit`` hook, so it runs first (``atexit`` is last in, first out)."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_close_open_envs)
        _exit_hook_registered = True
    _OPEN_ENVS.add(env)


def check_task(task: str) -> None:
    """Refuse a name that is not one of Meta-World's 50 ``-v3`` tasks."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"unknown Meta-World task {task!r}; the tasks are {sorted(INSTRUCTIONS)}")


def instruction(task: str) -> str:
    """The English instruction of ``task`` (e.g. ``"drawer-open-v3"`` -> ``"open the drawer"``)."""
    check_task(task)
    return INSTRUCTIONS[task]


def check_cams(cams: Sequence[str]) -> tuple[str, ...]:
    """Refuse unknown or repeated camera names; returns them as a tuple."""
    cams = tuple(cams)
    unknown = [cam for cam in cams if cam not in CAMERAS]
    if unknown:
        raise ValueError(f"unknown Meta-World camera(s) {unknown}; the cameras are {list(CAMERAS)}")
    if len(set(cams)) != len(cams):
        raise ValueError(f"cams lists a camera twice: {list(cams)}")
    return cams


class MetaWorldEnv(gymnasium.Env):
    """One Meta-World task, seeded starts, observations for imitation policies.

    Args:
        task: a Meta-World 3 task name, e.g. ``"drawer-open-v3"`` (``TASKS``; MT10 is ``MT10_TASKS``).
        cams: cameras to render into ``obs["rgb"]`` (``CAMERAS``); ``()`` for low-dim observations only.
        image_size: ``(H, W)`` of the observation images, or ``{camera: (H, W)}`` for cameras of
            different sizes.
        max_episode_steps: truncation limit; ``None`` for Meta-World's ``max_path_length`` (500).
        render_video: add ``info["frame"]``, a ``(video_size, video_size, 3)`` uint8 render of the
            first camera (``corner`` when ``cams`` is empty).
        video_size: side of the video frames.
        render_quality: ``"fast"`` (no shadows, reflections or multisampling) or ``"full"``
            (Meta-World's settings); see the module docstring.

    See the module docstring for what observations, seeds, actions and episode ends mean.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        task: str,
        cams: Sequence[str] = ("corner",),
        image_size: tuple[int, int] | dict[str, tuple[int, int]] = (84, 84),
        max_episode_steps: int | None = None,
        render_video: bool = False,
        video_size: int = 256,
        render_quality: str = "fast",
    ) -> None:
        super().__init__()
        check_task(task)
        if render_quality not in RENDER_QUALITIES:
            raise ValueError(f"render_quality must be one of {RENDER_QUALITIES}, got {render_quality!r}")
        self.render_quality = render_quality
        self.task, self.cams = task, check_cams(cams)
        self.image_sizes = {cam: (int(size[0]), int(size[1])) for cam, size in
                            per_camera(image_size, list(self.cams), "image_size").items()}
        if any(min(size) <= 0 for size in self.image_sizes.values()):
            raise ValueError(f"image_size must be positive (H, W), got {image_size}")
        env = ALL_V3_ENVIRONMENTS[task]()
        self.max_episode_steps = env.max_path_length if max_episode_steps is None else int(max_episode_steps)
        if self.max_episode_steps <= 0:
            raise ValueError(f"max_episode_steps must be positive, got {max_episode_steps}")
        # What Meta-World's MT benchmarks and goal-observable envs set up, with seeded random starts
        # instead of a fixed task vector (see the module docstring).
        env._partially_observable = False
        env.__dict__.pop("sawyer_observation_space", None)  # a cached_property built goal-hidden at init
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.max_path_length = self.max_episode_steps  # Meta-World refuses to step past it
        self._env = env
        self.render_video, self.video_size = render_video, int(video_size)
        self.video_cam = self.cams[0] if self.cams else "corner"

        model = env.model
        sizes = list(self.image_sizes.values())
        if render_video:
            sizes.append((self.video_size, self.video_size))
        if sizes:  # the offscreen buffer must hold the largest image
            model.vis.global_.offheight = max(model.vis.global_.offheight, *(h for h, _ in sizes))
            model.vis.global_.offwidth = max(model.vis.global_.offwidth, *(w for _, w in sizes))
        if render_quality == "fast":
            model.vis.quality.offsamples = 0  # read when a renderer creates its framebuffer
        self._renderers = {size: mujoco.Renderer(model, *size) for size in dict.fromkeys(sizes)}
        for renderer in self._renderers.values():  # the scene flags persist across update_scene
            if render_quality == "fast":
                renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
                renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        if self._renderers:
            _track_open_env(self)
        mujoco.mj_forward(model, env.data)
        # Fixed and tracking cameras keep their world orientation, so this is decided once.
        self._turn = {cam: bool(env.data.camera(cam).xmat.reshape(3, 3)[2, 1] < 0) for cam in CAMERAS}

        spaces: dict[str, gymnasium.spaces.Space] = {}
        if self.cams:
            spaces["rgb"] = gymnasium.spaces.Dict(
                {cam: gymnasium.spaces.Box(0, 255, shape=(*size, 3), dtype=np.uint8) for cam, size in self.image_sizes.items()})
        spaces["low_dim"] = gymnasium.spaces.Box(-np.inf, np.inf, shape=(LOW_DIM,), dtype=np.float32)
        self.observation_space = gymnasium.spaces.Dict(spaces)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self._full_state = np.zeros(39)
        self._steps = 0

    @property
    def raw(self) -> Any:
        """The underlying Meta-World env (``SawyerXYZEnv``: ``model``, ``data``, ``_last_rand_vec``)."""
        return self._env

    @property
    def full_state(self) -> np.ndarray:
        """Meta-World's ``(39,)`` float64 observation at the current step, what its scripted policies read."""
        return self._full_state.copy()

    def robot_state(self) -> np.ndarray:
        """``(9,)`` hand xyz, right and left fingertip xyz: 3D Diffusion Policy's ``agent_pos`` / ``data/state``."""
        env = self._env
        return np.concatenate([env.get_endeff_pos(), env._get_site_pos("rightEndEffector"),
                               env._get_site_pos("leftEndEffector")])

    def render_camera(self, cam: str, size: tuple[int, int]) -> np.ndarray:
        """An upright ``(H, W, 3)`` uint8 image from camera ``cam`` at one of this env's image sizes."""
        renderer = self._renderers[size]
        renderer.update_scene(self._env.data, camera=cam)
        image = renderer.render()
        return np.ascontiguousarray(image[::-1, ::-1]) if self._turn[cam] else image.copy()

    def _observation(self) -> dict:
        obs: dict = {}
        if self.cams:
            obs["rgb"] = {cam: self.render_camera(cam, size) for cam, size in self.image_sizes.items()}
        obs["low_dim"] = self._full_state[:LOW_DIM].astype(np.float32)
        return obs

    def _info(self, success: bool, reward: float) -> dict[str, Any]:
        info: dict[str, Any] = {"is_success": success, "score": reward / MAX_REWARD}
        if self.render_video:
            info["frame"] = self.render_camera(self.video_cam, (self.video_size, self.video_size))
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """A new start; ``seed`` fixes the object and goal positions (see the module docstring)."""
        if options:
            raise ValueError(f"MetaWorldEnv starts from seeds only; reset options are not supported, got {options}")
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))
        self._full_state, _ = self._env.reset()
        self._steps = 0
        return self._observation(), self._info(False, 0.0)

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict[str, Any]]:
        """One Meta-World control step (5 physics steps of 2.5 ms) with ``action`` clipped to [-1, 1]."""
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"a Meta-World action is (4,) xyz displacement + gripper effort, got shape {action.shape}")
        action = np.clip(action, -1.0, 1.0)
        self._full_state, reward, _, _, raw_info = self._env.step(action)
        self._steps += 1
        success = bool(raw_info["success"] >= 1.0)
        truncated = self._steps >= self.max_episode_steps
        reward = float(reward)
        return self._observation(), reward, success, truncated, self._info(success, reward)

    def close(self) -> None:
        """Release the renderers' GL contexts and Meta-World's env."""
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers = {}
        _OPEN_ENVS.discard(self)
        self._env.close()
