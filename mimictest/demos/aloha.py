"""Scripted experts for ALOHA transfer-cube and insertion, written in ACT's hdf5 format.

The recipe is ACT's (Zhao et al., RSS 2023, https://github.com/tonyzhaozh/act, ``scripted_policy.py``
and ``record_sim_episodes.py``):
1. From the true object poses, plan waypoints for both grippers in end-effector space (position,
   orientation, gripper opening) and interpolate them linearly, one target per 50 Hz step.
2. Drive gym-aloha's mocap (end-effector) scene with these targets and record the joint positions
   it goes through, with the gripper entries replaced by the normalised gripper command.
3. Reset the joint-space task to the same object pose and replay the recorded joint positions as
   actions, recording observations. Action ``t`` is the joint position the end-effector rollout
   had at step ``t``, as in ACT. Only episodes whose replay reaches the maximum reward are kept.

The waypoint times and offsets are ACT's. ACT pins MuJoCo 2.3.7 and its scripted data fails on
MuJoCo 3 (tonyzhaozh/act#45); two changes make it work again: the mocap welds are stiffened in
rotation (``mimictest.envs.aloha.EndEffectorSim``), and insertion pushes each arm 1 cm further
(meeting offsets +-0.04 m instead of +-0.05 m), since with ACT's offsets the peg stops about 1 mm
short of the pin in the joint-space replay.

Episode ``i`` places the objects with gym-aloha's sampler seeded ``seed + i``, exactly as
``AlohaEnv.reset(seed=seed + i)`` does. MuJoCo is deterministic, so each replay is first run
without cameras to test success, then rendered only when it succeeds. Files are written as ACT
writes them: ``episode_<k>.hdf5`` with ``/observations/{qpos, qvel, images/<cam>}``, ``/action``
and the root attribute ``sim=True``, numbered ``0..K-1`` over the kept episodes (images are
lzf-compressed).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
from gym_aloha.constants import normalize_puppet_gripper_position
from tqdm import tqdm

from mimictest.envs.aloha import MAX_REWARD, AlohaEnv, EndEffectorSim, check_task, sample_object_pose

EPISODE_LEN = 400  # ACT's episode length for both tasks (8 s at 50 Hz)
INSERT_OFFSET = 0.04  # each gripper's final distance from the meeting point in insertion (ACT: 0.05)


@dataclass(frozen=True)
class Waypoint:
    """A gripper target at step ``t``: position (3,), orientation quaternion wxyz (4,), opening 0..1."""

    t: int
    xyz: np.ndarray
    quat: np.ndarray
    gripper: float


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of two wxyz quaternions. (4,)."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ])


def axis_angle_quat(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """wxyz quaternion of a rotation by ``degrees`` about a unit ``axis``. (4,)."""
    half = np.deg2rad(degrees) / 2
    return np.concatenate([[np.cos(half)], np.sin(half) * np.asarray(axis, dtype=np.float64)])


def interpolate(waypoints: list[Waypoint], t: float) -> np.ndarray:
    """Target at step ``t``: ``[xyz (3), quat (4), gripper (1)]`` (8,), linear between waypoints, then held."""
    if t >= waypoints[-1].t:
        last = waypoints[-1]
        return np.concatenate([last.xyz, last.quat, [last.gripper]])
    k = max(i for i, w in enumerate(waypoints) if w.t <= t)
    a, b = waypoints[k], waypoints[k + 1]
    frac = (t - a.t) / (b.t - a.t)
    quat = a.quat + (b.quat - a.quat) * frac
    return np.concatenate([
        a.xyz + (b.xyz - a.xyz) * frac,
        quat / np.linalg.norm(quat),
        [a.gripper + (b.gripper - a.gripper) * frac],
    ])


def transfer_cube_waypoints(
    left_start: np.ndarray, right_start: np.ndarray, cube: np.ndarray
) -> tuple[list[Waypoint], list[Waypoint]]:
    """ACT's transfer: the right gripper picks the cube and lifts it to a mid-air meeting point, the left
    gripper closes on it there, the right opens and both move apart.

    ``*_start``: initial mocap pose ``[xyz, quat]`` (7,); ``cube``: cube pose (7,).
    """
    meet = np.array([0.0, 0.5, 0.25])
    pick = quat_multiply(right_start[3:], axis_angle_quat((0, 1, 0), -60))  # tilted down towards the table
    receive = axis_angle_quat((1, 0, 0), 90)  # left jaws vertical, across the right ones
    upright = np.array([1.0, 0.0, 0.0, 0.0])
    left = [
        Waypoint(0, left_start[:3], left_start[3:], 0),
        Waypoint(100, meet + [-0.1, 0, -0.02], receive, 1),  # approach the meeting point, open
        Waypoint(260, meet + [0.02, 0, -0.02], receive, 1),  # move onto the cube
        Waypoint(310, meet + [0.02, 0, -0.02], receive, 0),  # close on it
        Waypoint(360, meet + [-0.1, 0, -0.02], upright, 0),  # pull it away
        Waypoint(400, meet + [-0.1, 0, -0.02], upright, 0),
    ]
    cube_xyz = cube[:3]
    right = [
        Waypoint(0, right_start[:3], right_start[3:], 0),
        Waypoint(90, cube_xyz + [0, 0, 0.08], pick, 1),  # above the cube, open
        Waypoint(130, cube_xyz + [0, 0, -0.015], pick, 1),  # down around it
        Waypoint(170, cube_xyz + [0, 0, -0.015], pick, 0),  # close
        Waypoint(200, meet + [0.05, 0, 0], pick, 0),  # lift towards the meeting point
        Waypoint(220, meet, pick, 0),
        Waypoint(310, meet, pick, 1),  # let go once the left gripper holds it
        Waypoint(360, meet + [0.1, 0, 0], pick, 1),  # move away
        Waypoint(400, meet + [0.1, 0, 0], pick, 1),
    ]
    return left, right


def insertion_waypoints(
    left_start: np.ndarray, right_start: np.ndarray, objects: np.ndarray
) -> tuple[list[Waypoint], list[Waypoint]]:
    """ACT's insertion: the left gripper picks the socket, the right the peg; both lift and move
    towards each other so that the peg slides into the socket and touches the pin.

    ``*_start``: initial mocap pose ``[xyz, quat]`` (7,); ``objects``: peg pose then socket pose (14,).
    """
    peg, socket = objects[:3], objects[7:10]
    meet = np.array([0.0, 0.5, 0.15])
    lift_right = 0.00715  # the peg is held slightly higher so that it lines up with the socket's opening
    pick_right = quat_multiply(right_start[3:], axis_angle_quat((0, 1, 0), -60))
    pick_left = quat_multiply(left_start[3:], axis_angle_quat((0, 1, 0), 60))
    left = [
        Waypoint(0, left_start[:3], left_start[3:], 0),
        Waypoint(120, socket + [0, 0, 0.08], pick_left, 1),  # above the socket, open
        Waypoint(170, socket + [0, 0, -0.03], pick_left, 1),  # down around it
        Waypoint(220, socket + [0, 0, -0.03], pick_left, 0),  # close
        Waypoint(285, meet + [-0.1, 0, 0], pick_left, 0),  # lift towards the meeting point
        Waypoint(340, meet + [-INSERT_OFFSET, 0, 0], pick_left, 0),  # insert
        Waypoint(400, meet + [-INSERT_OFFSET, 0, 0], pick_left, 0),
    ]
    right = [
        Waypoint(0, right_start[:3], right_start[3:], 0),
        Waypoint(120, peg + [0, 0, 0.08], pick_right, 1),
        Waypoint(170, peg + [0, 0, -0.03], pick_right, 1),
        Waypoint(220, peg + [0, 0, -0.03], pick_right, 0),
        Waypoint(285, meet + [0.1, 0, lift_right], pick_right, 0),
        Waypoint(340, meet + [INSERT_OFFSET, 0, lift_right], pick_right, 0),
        Waypoint(400, meet + [INSERT_OFFSET, 0, lift_right], pick_right, 0),
    ]
    return left, right


def _joint_command(observation: dict[str, np.ndarray]) -> np.ndarray:
    """Joint positions with the gripper entries replaced by the normalised gripper command, as ACT does. (14,)."""
    command = observation["qpos"].copy()
    command[6] = normalize_puppet_gripper_position(observation["gripper_ctrl"][0])
    command[13] = normalize_puppet_gripper_position(observation["gripper_ctrl"][2])
    return command


class EndEffectorExpert:
    """Rolls the waypoint plan out in the mocap scene of ``task`` and returns the joint trajectory."""

    def __init__(self, task: str) -> None:
        check_task(task)
        self.task = task
        self._sim = EndEffectorSim(task)

    def rollout(self, object_pose: np.ndarray) -> tuple[np.ndarray, bool]:
        """-> joint commands ``(EPISODE_LEN, 14)`` and whether the mocap rollout itself succeeded."""
        observation = self._sim.reset(object_pose)
        plan = transfer_cube_waypoints if self.task == "transfer_cube" else insertion_waypoints
        # The true object poses after the reset, as ACT's policy reads them.
        left, right = plan(observation["mocap_left"], observation["mocap_right"], observation["objects"])
        commands, best = [], 0.0
        for t in range(EPISODE_LEN):
            commands.append(_joint_command(observation))
            observation, reward = self._sim.step(np.concatenate([interpolate(left, t), interpolate(right, t)]))
            best = max(best, reward)
        return np.stack(commands), best >= MAX_REWARD  # (T, 14)

    def close(self) -> None:
        """Release the simulator."""
        self._sim.close()


def _replay_succeeds(env: AlohaEnv, object_pose: np.ndarray, commands: np.ndarray) -> bool:
    """Whether replaying ``commands`` from ``object_pose`` reaches the maximum reward."""
    env.reset(options={"object_pose": object_pose})
    success = False
    for command in commands:
        success |= env.step(command)[2]
    return success


def _record_episode(env: AlohaEnv, object_pose: np.ndarray, commands: np.ndarray, path: str) -> bool:
    """Replay ``commands`` with cameras and write ACT's episode file; returns whether the replay succeeded."""
    steps, cams = len(commands), env.cams
    env.reset(options={"object_pose": object_pose})
    success = False
    with h5py.File(path, "w") as f:
        f.attrs["sim"] = True
        qpos = f.create_dataset("observations/qpos", (steps, 14), dtype=np.float32)
        qvel = f.create_dataset("observations/qvel", (steps, 14), dtype=np.float32)
        f.create_group("observations/images")
        images = {
            cam: f.create_dataset(
                f"observations/images/{cam}", (steps, *env.image_size, 3), dtype=np.uint8,
                chunks=(1, *env.image_size, 3), compression="lzf",
            )
            for cam in cams
        }
        f.create_dataset("action", data=commands.astype(np.float32))  # (T, 14)
        for t, command in enumerate(commands):
            raw = env.raw_observation  # the observation before action t
            qpos[t], qvel[t] = raw["qpos"], raw["qvel"]
            for cam in cams:
                images[cam][t] = raw["images"][cam]
            success |= env.step(command)[2]
    return success


def _publish(tmp_dir: str, out_dir: str) -> None:
    """Move the finished episodes into ``out_dir``, replacing the episode files already there."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp creates 0700; publish with normal permissions
    if not os.path.isdir(out_dir):
        os.replace(tmp_dir, out_dir)
        return
    for old in glob.glob(os.path.join(out_dir, "episode_*.hdf5")):
        os.remove(old)
    for name in os.listdir(tmp_dir):
        os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))


def generate_aloha_demos(
    task: str,
    out_dir: str,
    episodes: int,
    seed: int = 0,
    cams: tuple[str, ...] | list[str] = ("top",),
    image_size: tuple[int, int] = (480, 640),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the scripted expert for ``episodes`` episodes (seeds ``seed + i``) and save the successes.

    ``cams`` may be empty for a low-dim dataset. Episodes are written to a temporary folder beside
    ``out_dir`` and moved in at the end, so an interrupted run leaves no partial dataset. Returns
    ``episodes``, ``successes``, ``success_rate``, ``ee_successes`` (of the mocap rollouts),
    ``seconds`` and ``path``.
    """
    check_task(task)
    if episodes <= 0:
        raise ValueError(f"episodes must be positive, got {episodes}")
    if os.path.isfile(out_dir):
        raise FileExistsError(f"{out_dir!r} is a file; ALOHA demos are a folder of episode_<i>.hdf5 files")
    if glob.glob(os.path.join(out_dir, "episode_*.hdf5")) and not overwrite:
        raise FileExistsError(
            f"{out_dir!r} already holds episodes; pass overwrite=True (--overwrite) or choose another folder"
        )
    start = time.perf_counter()
    kept, ee_successes = 0, 0
    with ExitStack() as stack:
        expert = EndEffectorExpert(task)
        stack.callback(expert.close)
        checker = AlohaEnv(task, cams=(), max_episode_steps=EPISODE_LEN)
        stack.callback(checker.close)
        recorder = checker
        if cams:
            recorder = AlohaEnv(task, cams=cams, image_size=image_size, max_episode_steps=EPISODE_LEN)
            stack.callback(recorder.close)
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp_dir = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", suffix=".tmp")
        stack.callback(shutil.rmtree, tmp_dir, ignore_errors=True)
        with tqdm(range(episodes), desc=f"aloha {task} expert", unit="ep") as progress:
            for i in progress:
                pose = sample_object_pose(task, seed + i)
                commands, ee_success = expert.rollout(pose)
                ee_successes += int(ee_success)
                if _replay_succeeds(checker, pose, commands):
                    path = os.path.join(tmp_dir, f"episode_{kept}.hdf5")
                    if _record_episode(recorder, pose, commands, path):
                        kept += 1
                    else:
                        os.remove(path)
                progress.set_postfix(success=f"{kept}/{i + 1}")
        if kept == 0:
            raise RuntimeError(f"no {task} episode succeeded in {episodes} attempts, so nothing was written")
        _publish(tmp_dir, out_dir)
    stats = {
        "episodes": episodes,
        "successes": kept,
        "success_rate": kept / episodes,
        "ee_successes": ee_successes,
        "seconds": time.perf_counter() - start,
        "path": out_dir,
    }
    print(
        f"expert success {kept}/{episodes} = {100 * stats['success_rate']:.1f}% "
        f"(end-effector rollouts {ee_successes}/{episodes}, {stats['seconds']:.1f} s) -> {out_dir}"
    )
    return stats
