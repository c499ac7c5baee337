"""A scripted CALVIN expert that writes CALVIN's raw npz layout, and its chained evaluation subset.

Each demo episode starts from a CALVIN start condition (``mimictest.chained.condition_state``,
with the blocks' yaw jittered) and runs a random chain of the expert's tasks of distinct categories
that is valid from that condition, drawn as CALVIN draws its evaluation chains but with another
generator, so demos and evaluation see the same kind of chains. Every task is a short list of waypoints for the tcp (gripper pointing down, at the
start orientation turned to the block's yaw for grasps), computed from the scene state
(``scene_obs`` and PyBullet's link poses of the drawer, sliding door, button and switch); the tcp
target moves towards the next waypoint by at most ``STEP`` per step, as CALVIN's relative actions
allow, and the gripper closes or opens where the plan says. The task oracle decides: a task's
segment is kept (and annotated in ``auto_lang_ann.npy``) only if the oracle reports the task, and
the episode stops at the first failure. Per-task success rates are printed at the end.
``turn_off_lightbulb`` is left out: with the switch up, its knob is beyond the Panda's reach for a
tcp pointing down (about 0.9 m from the base), and this expert never tilts the gripper.

Written, as CALVIN's dataset: ``episode_XXXXXXX.npz`` per step (``actions`` absolute with
PyBullet euler angles, ``rel_actions``, ``robot_obs``, ``scene_obs``, ``rgb_static``,
``rgb_gripper``; no depth or tactile images), ``ep_start_end_ids.npy``,
``lang_annotations/auto_lang_ann.npy`` (``info.indx``, ``language.ann`` with CALVIN's validation
instruction of each task, ``language.task``, ``language.emb`` from mimictest's text encoder, plus
``text_encoder``, its name) and ``.hydra/merged_config.yaml`` (the env's config, from which the
evaluation builds the same env).

    python -m mimictest.demos calvin --episodes 20 --out Datasets/calvin_raw
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections import Counter

import numpy as np

from mimictest.chained import (INSTRUCTIONS, ROBOT_START, has_chain, get_sequences, start_conditions,
                               valid_chain)
from mimictest.envs.calvin import MAX_REL_ORN, MAX_REL_POS, CalvinEnv, pybullet_to_euler_xyz

EXPERT_TASKS: tuple[str, ...] = (
    "open_drawer", "close_drawer", "move_slider_left", "move_slider_right", "turn_on_led", "turn_off_led",
    "turn_on_lightbulb", "lift_red_block_table", "lift_blue_block_table",
    "lift_pink_block_table", "push_red_block_right", "push_red_block_left", "push_blue_block_right",
    "push_blue_block_left", "push_pink_block_right", "push_pink_block_left",
)
STEP = 0.015  # metres the tcp target moves per step (CALVIN's relative actions allow 0.02)
REACHED = 0.012  # a waypoint counts as reached within this distance of the tcp
WAYPOINT_STEPS = 60  # give up on a waypoint after this many steps and go on with the next
GRIPPER_STEPS = 12  # steps spent closing or opening the gripper
PUSH = 0.16  # metres the closed gripper travels from 6 cm beside a block: it moves the block about 0.12 (the oracle wants 0.1), not off the table
BLOCK_INDEX = {"red": 0, "blue": 1, "pink": 2}
# Link indices of calvin_table_* (button, switch, sliding door, drawer).
BUTTON, SWITCH, SLIDE, DRAWER = 0, 1, 2, 3


def check_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in EXPERT_TASKS]
    if unknown:
        raise ValueError(f"the scripted expert cannot do {unknown}; it does {list(EXPERT_TASKS)}")
    return list(tasks)


class Expert:
    """Waypoint plans for the expert's tasks on one ``CalvinEnv`` (absolute actions)."""

    def __init__(self, env: CalvinEnv) -> None:
        self.env = env
        self.down = ROBOT_START[3:6]  # PyBullet euler of CALVIN's start tcp orientation: pointing down
        p = env.raw.p
        self.p, self.table = p, env.raw.scene.fixed_objects[0].uid

    def _link(self, link: int) -> np.ndarray:
        return np.asarray(self.p.getLinkState(self.table, link)[4])

    def plan(self, task: str) -> list[tuple[np.ndarray, int, float]]:
        """``[(tcp xyz, gripper, yaw offset)]`` waypoints; gripper 1 open, -1 closed."""
        scene = self.env.scene_obs
        up = lambda xyz, dz=0.1: np.array([xyz[0], xyz[1], xyz[2] + dz])  # noqa: E731
        if task == "open_drawer":  # hook the closed fingers behind the handle bar and pull
            gap = self._link(DRAWER) + np.array([0.0, -0.21, 0.03])  # between the bar and the drawer's front
            return [(up(gap, 0.1), -1, 0), (gap, -1, 0), (gap + [0, -0.17, 0], -1, 0), (up(gap + [0, -0.19, 0], 0.1), -1, 0)]
        if task == "close_drawer":  # push the bar's front
            bar = self._link(DRAWER) + np.array([0.0, -0.285, 0.04])
            return [(up(bar, 0.08), -1, 0), (bar, -1, 0), (bar + [0, 0.17, 0], -1, 0), (up(bar + [0, 0.11, 0], 0.08), -1, 0)]
        if task in ("move_slider_left", "move_slider_right"):
            knob = self._link(SLIDE) + np.array([0.14, -0.115, -0.025])  # the door's knob
            shift = np.array([-0.2 if task == "move_slider_left" else 0.2, 0.0, 0.0])
            behind = knob + np.array([0.05 if task == "move_slider_left" else -0.05, -0.0, 0.0])
            return [(up(behind, 0.08) + [0, -0.03, 0], -1, 0), (behind + [0, -0.03, 0], -1, 0), (behind, -1, 0),
                    (behind + shift, -1, 0), (behind + shift + [0, -0.06, 0.05], -1, 0)]
        if task in ("turn_on_led", "turn_off_led"):
            top = self._link(BUTTON) + np.array([0.0, 0.0, 0.025])
            return [(up(top, 0.06), -1, 0), (top - [0, 0, 0.035], -1, 0), (up(top, 0.08), -1, 0)]
        if task == "turn_on_lightbulb":  # slide the switch up its slope from below
            below = self._link(SWITCH) + np.array([0.0, -0.065, -0.01])
            slope = np.array([0.0, 0.5, 0.866])  # the switch's prismatic axis in the world
            return [(below + [0, -0.04, 0], -1, 0), (below, -1, 0), (below + 0.11 * slope, -1, 0),
                    (below + 0.11 * slope + [0, -0.08, 0], -1, 0)]
        colour = task.split("_")[1]
        k = BLOCK_INDEX[colour]
        block = scene[6 + 6 * k: 9 + 6 * k]
        yaw = scene[11 + 6 * k]
        if task.startswith("lift_"):
            offset = ((yaw - self.down[2] + np.pi / 4) % (np.pi / 2)) - np.pi / 4  # the nearest face-aligned grasp
            grasp = block + np.array([0.0, 0.0, 0.0])
            return [(up(grasp, 0.1), 1, offset), (up(grasp, 0.0), 1, offset), (grasp, -1, offset),
                    (up(grasp, 0.12), -1, offset)]
        side = 1.0 if task.endswith("right") else -1.0
        start = block + np.array([-side * 0.06, 0.0, 0.005])
        return [(up(start, 0.08), -1, 0), (start, -1, 0), (start + [side * PUSH, 0, 0], -1, 0),
                (up(start + [side * PUSH, 0, 0], 0.08), -1, 0)]


def _rel_action(target_pos: np.ndarray, target_orn: np.ndarray, gripper: int, robot_obs: np.ndarray) -> np.ndarray:
    """CALVIN's ``rel_actions`` for an absolute target from the current tcp pose."""
    d_orn = (target_orn - robot_obs[3:6] + np.pi) % (2 * np.pi) - np.pi
    return np.concatenate((np.clip((target_pos - robot_obs[:3]) / MAX_REL_POS, -1, 1),
                           np.clip(d_orn / MAX_REL_ORN, -1, 1), [gripper]))


def run_task(env: CalvinEnv, expert: Expert, task: str, max_steps: int, record: list[dict]) -> bool:
    """Drive the tcp through ``task``'s waypoints, appending each step's frame to ``record``; the oracle's verdict."""
    target = env.robot_obs[:3].copy()
    gripper = int(np.sign(env.robot_obs[14]) or 1)
    steps = 0
    for waypoint, want_gripper, yaw in expert.plan(task):
        orn = expert.down + np.array([0.0, 0.0, yaw])
        settle = GRIPPER_STEPS if want_gripper != gripper else 0
        gripper = want_gripper
        for _ in range(WAYPOINT_STEPS):
            delta = waypoint - target
            dist = np.linalg.norm(delta)
            target = target + (delta if dist <= STEP else delta * STEP / dist)
            raw = env.raw_obs
            action_pb = np.concatenate((target, orn, [gripper]))
            frame = {"actions": action_pb, "rel_actions": _rel_action(target, orn, gripper, env.robot_obs),
                     "robot_obs": env.robot_obs, "scene_obs": env.scene_obs,
                     "rgb_static": raw["rgb_obs"]["rgb_static"], "rgb_gripper": raw["rgb_obs"]["rgb_gripper"]}
            _, _, terminated, truncated, info = env.step(np.concatenate((target, pybullet_to_euler_xyz(orn), [gripper])))
            record.append(frame)
            steps += 1
            if info["subtask_success"]:
                return True
            if steps >= max_steps or truncated:
                return False
            settle -= 1
            if np.linalg.norm(env.robot_obs[:3] - waypoint) < REACHED and settle <= 0 and dist <= STEP:
                break
    return False


def sample_chain(rng: np.random.RandomState, tasks: list[str], length: int) -> tuple[dict, tuple[str, ...]]:
    """A random start condition and chain of ``length`` tasks of distinct categories valid from it, drawn
    as CALVIN draws its evaluation chains (``mimictest.chained.get_sequences``) but from ``rng``."""
    states = [s for s in start_conditions() if has_chain(s, tasks, depth=length)]
    if not states:
        raise ValueError(f"no chain of {length} tasks of distinct categories can be made from {tasks}; "
                         "give more tasks or a smaller tasks_per_episode")
    state = states[rng.randint(len(states))]
    while True:
        chain = tuple(tasks[t] for t in rng.permutation(len(tasks))[:length])
        if valid_chain(state, chain):
            return state, chain


def generate_calvin_demos(out: str, episodes: int, tasks: list[str] | tuple[str, ...] = EXPERT_TASKS,
                          tasks_per_episode: int = 5, seed: int = 0, text_encoder: str | None = None,
                          scene: str | None = None, max_task_steps: int = 200) -> dict:
    """Write ``episodes`` scripted play episodes to the raw CALVIN folder ``out``; returns per-task counts."""
    from omegaconf import OmegaConf

    from mimictest.chained import condition_state
    from mimictest.text import TextEncoder

    tasks = check_tasks(list(tasks))
    if os.path.exists(out):
        raise FileExistsError(f"{out!r} already exists; delete it or write to another folder")
    encoder = TextEncoder(text_encoder)
    env = CalvinEnv(scene=scene, action_mode="absolute", max_subtask_steps=max_task_steps)
    expert = Expert(env)
    rng = np.random.RandomState(seed)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.normpath(out))}.", suffix=".tmp")
    tried, done = Counter(), Counter()
    indx, anns, names, ep_ids = [], [], [], []
    frame_id = 0
    try:
        os.makedirs(os.path.join(tmp, "lang_annotations"))
        os.makedirs(os.path.join(tmp, ".hydra"))
        OmegaConf.save(env.config, os.path.join(tmp, ".hydra", "merged_config.yaml"))
        for e in range(episodes):
            condition, chain = sample_chain(rng, tasks, tasks_per_episode)
            robot_obs, scene_obs = condition_state(condition)
            scene_obs[11::6] += rng.uniform(-0.2, 0.2, 3)  # jitter the blocks' yaw
            env.reset(options={"robot_obs": robot_obs, "scene_obs": scene_obs, "tasks": chain})
            start = frame_id
            for task in chain:
                record: list[dict] = []
                tried[task] += 1
                ok = run_task(env, expert, task, max_task_steps, record)
                for frame in record:
                    np.savez_compressed(os.path.join(tmp, f"episode_{frame_id:07d}.npz"), **frame)
                    frame_id += 1
                if not ok:
                    break
                done[task] += 1
                indx.append((frame_id - len(record), frame_id - 1))
                anns.append(INSTRUCTIONS[task])
                names.append(task)
            if frame_id > start:
                ep_ids.append((start, frame_id - 1))
            print(f"episode {e + 1}/{episodes}: {sum(done.values())}/{sum(tried.values())} tasks done so far", flush=True)
        if not indx:
            raise RuntimeError("the expert finished no task; nothing was written")
        emb = encoder.encode(anns).numpy()[:, None]  # (segments, 1, D) as CALVIN stores them
        np.save(os.path.join(tmp, "lang_annotations", "auto_lang_ann.npy"), {
            "info": {"indx": indx, "episodes": []},
            "language": {"ann": anns, "task": names, "emb": emb},
            "text_encoder": encoder.name,
        })
        np.save(os.path.join(tmp, "ep_start_end_ids.npy"), np.asarray(ep_ids, dtype=np.int64))
        if os.path.exists(out):
            raise FileExistsError(f"{out!r} appeared while writing; it was left as it is")
        os.replace(tmp, out)
    finally:
        env.close()
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    print(format_success(tried, done))
    return {"tried": dict(tried), "done": dict(done)}


def format_success(tried: Counter, done: Counter) -> str:
    """The expert's per-task success table."""
    width = max(len(t) for t in tried)
    lines = [f"{'task':<{width}}  success"]
    for t in sorted(tried, key=EXPERT_TASKS.index):
        lines.append(f"{t:<{width}}  {100.0 * done[t] / tried[t]:5.1f}%  {done[t]:3d} / {tried[t]:3d}")
    lines.append(f"{'all':<{width}}  {100.0 * sum(done.values()) / max(sum(tried.values()), 1):5.1f}%")
    return "\n".join(lines)


def expert_sequences(num_chains: int) -> list:
    """The evaluation chains restricted to the expert's tasks (``get_sequences(n, tasks=EXPERT_TASKS)``)."""
    return get_sequences(num_chains, EXPERT_TASKS)


def add_command(sub: argparse._SubParsersAction) -> None:
    """``python -m mimictest.demos calvin ...``."""
    cmd = sub.add_parser("calvin", help="CALVIN play table, scripted expert (raw CALVIN npz folder)")
    cmd.add_argument("--episodes", type=int, required=True, help="episodes of --tasks-per-episode chained tasks")
    cmd.add_argument("--out", required=True, help="output folder (raw CALVIN split layout)")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--tasks", default=",".join(EXPERT_TASKS), help="comma-separated expert tasks")
    cmd.add_argument("--tasks-per-episode", type=int, default=5)
    cmd.add_argument("--text-encoder", default=None, help="a local text-encoder folder (default all-MiniLM-L6-v2)")
    cmd.set_defaults(run=lambda a: generate_calvin_demos(a.out, a.episodes, a.tasks.split(","), a.tasks_per_episode,
                                                         a.seed, a.text_encoder))
