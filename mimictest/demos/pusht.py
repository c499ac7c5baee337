"""Scripted expert for PushT that writes diffusion_policy's replay-buffer zarr.

The expert reads the true block pose and plans one straight push at a time by trying candidates in
a pymunk replica of the scene (gym-pusht's bodies, walls and PD disc controller):

1. candidates: contact points every ``CONTACT_SPACING`` px along the T's outline, each with a start
   point just off the outline and push directions along the inward normal and +-30 degrees;
2. each candidate is simulated as a constant-speed push and scored by the RMS distance of the T's
   outline vertices to the goal's; the best few are re-simulated for several push lengths,
   followed by a short hold, exactly as they would be executed;
3. the disc travels AROUND the block to the chosen start point along the shortest path that keeps
   clear of the T (a visibility graph around the T inflated by the disc radius), settles, pushes,
   holds, and the next push is planned from the new pose.

It repeats until the coverage exceeds 95% (gym-pusht's success) or the step limit. The push speed
shrinks with the remaining error, so the final pushes are small corrections. Episode ``i`` resets
the env with seed ``seed + i`` and draws its style (travel speed, push speed) from
``np.random.default_rng(seed + i)``, so evaluation can use seeds outside ``[seed, seed + episodes)``.
Observations (image, state, keypoints) are recorded before each action, and the action is the
disc's target position, as in diffusion_policy's ``demo_pusht.py`` (Chi et al., RSS 2023).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np
import pymunk
import shapely.geometry as sg
from tqdm import tqdm

from mimictest.data.pusht_writer import PushTZarrWriter
from mimictest.data.pusht import CAMERA
from mimictest.envs.pusht import GOAL_POSE, PushTEnv, block_keypoints

MAX_EPISODE_STEPS = 300  # diffusion_policy's PushT evaluation limit
AGENT_RADIUS = 15.0
# The T's outline in its body frame (gym-pusht's ``add_tee``: a 120x30 bar over a 30x90 stem).
OUTLINE = np.array([(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], float)
CONTACT_SPACING = 10.0  # px between candidate contact points along the outline
START_GAP = 5.0  # px between the disc and the outline at a push's start point
PUSH_ANGLES = np.deg2rad([-30.0, 0.0, 30.0])  # push directions relative to the inward normal
WIDE_PUSH_ANGLES = np.deg2rad([-60.0, -45.0, -30.0, -15.0, 0.0, 15.0, 30.0, 45.0, 60.0])
PUSH_STEPS = 12  # control steps simulated per candidate push
HOLD_STEPS = 3  # control steps the disc rests after a push, so the next plan starts from rest
REFINE_TOP = 5  # candidates re-simulated for several push lengths
CLEARANCE = 4.0  # px the disc keeps from the T while travelling
ARENA = (20.0, 492.0)  # start points are kept inside the walls
SUBSTEPS, DT = 10, 0.01  # gym-pusht: 100 Hz physics, 10 Hz control
KP, KV = 100.0, 20.0  # gym-pusht's PD gains on the disc


def _rotation(angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[cos, -sin], [sin, cos]])


def _to_world(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Body-frame ``(..., 2)`` points of a block at ``pose`` (x, y, angle) -> world frame."""
    return points @ _rotation(pose[2]).T + pose[:2]


def pose_error(poses: np.ndarray, reference: np.ndarray = GOAL_POSE) -> np.ndarray:
    """``(..., 3)`` block poses -> RMS distance (px) of the outline vertices to those at ``reference``, ``(...)``."""
    poses = np.asarray(poses, dtype=np.float64)
    goal = _to_world(OUTLINE, np.asarray(reference, dtype=np.float64))  # (8, 2)
    cos, sin = np.cos(poses[..., 2:3]), np.sin(poses[..., 2:3])  # (..., 1)
    x = OUTLINE[:, 0] * cos - OUTLINE[:, 1] * sin + poses[..., 0:1]  # (..., 8)
    y = OUTLINE[:, 0] * sin + OUTLINE[:, 1] * cos + poses[..., 1:2]
    return np.sqrt(((x - goal[:, 0]) ** 2 + (y - goal[:, 1]) ** 2).mean(-1))


def _contact_candidates() -> tuple[np.ndarray, np.ndarray]:
    """Body-frame push start points ``(n, 2)`` and inward normals ``(n, 2)`` reachable by the disc."""
    tee = sg.Polygon(OUTLINE)
    starts, inward = [], []
    for a, b in zip(OUTLINE, np.roll(OUTLINE, -1, axis=0)):
        edge = b - a
        length = float(np.linalg.norm(edge))
        outward = np.array([edge[1], -edge[0]]) / length
        count = max(1, int(round(length / CONTACT_SPACING)))
        for t in (np.arange(count) + 0.5) / count:
            start = a + t * edge + outward * (AGENT_RADIUS + START_GAP)
            if tee.distance(sg.Point(start)) >= AGENT_RADIUS + START_GAP - 0.5:
                starts.append(start)
                inward.append(-outward)
    return np.array(starts), np.array(inward)


_STARTS, _INWARD = _contact_candidates()


class _Replica:
    """gym-pusht's scene rebuilt in a private pymunk space, to simulate pushes before making them."""

    def __init__(self, env: PushTEnv) -> None:
        raw = env.raw
        self.space = pymunk.Space()
        self.space.gravity = raw.space.gravity
        self.space.damping = raw.space.damping
        walls = [pymunk.Segment(self.space.static_body, s.a, s.b, s.radius)
                 for s in raw.space.shapes if isinstance(s, pymunk.Segment)]
        self.space.add(*walls)
        self.agent = type(raw).add_circle(self.space, (256, 400), AGENT_RADIUS)
        self.block, _ = type(raw).add_tee(self.space, (256, 300), 0)
        self.block.center_of_gravity = raw.block.center_of_gravity

    def rollout(self, agent_pos: np.ndarray, block_pose: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Disc at rest at ``agent_pos``, block at ``block_pose``; ``(K, 2)`` PD targets -> ``(K, 3)`` poses."""
        self.block.angle = float(block_pose[2])  # angle first: setting it rotates about the centre of gravity
        self.block.position = (float(block_pose[0]), float(block_pose[1]))
        self.block.velocity, self.block.angular_velocity = (0.0, 0.0), 0.0
        self.agent.position, self.agent.velocity = (float(agent_pos[0]), float(agent_pos[1])), (0.0, 0.0)
        poses = np.empty((len(targets), 3))
        agent, block = self.agent, self.block
        for k, (tx, ty) in enumerate(targets):
            for _ in range(SUBSTEPS):  # the same arithmetic as gym-pusht's PushTEnv.step
                vx, vy = agent.velocity
                px, py = agent.position
                agent.velocity = (vx + (KP * (tx - px) - KV * vx) * DT, vy + (KP * (ty - py) - KV * vy) * DT)
                self.space.step(DT)
            poses[k] = (block.position.x, block.position.y, block.angle)
        return poses


def _shortest_path(start: np.ndarray, goal: np.ndarray, block_pose: np.ndarray) -> list[np.ndarray]:
    """Waypoints from ``start`` to ``goal`` (included) keeping the disc clear of the T at ``block_pose``."""
    tee = sg.Polygon(_to_world(OUTLINE, block_pose))
    blocked = tee.buffer(AGENT_RADIUS + CLEARANCE - 1.0, join_style=2)
    corners = tee.buffer(AGENT_RADIUS + CLEARANCE + 3.0, join_style=2)
    prefix: list[np.ndarray] = []
    if blocked.contains(sg.Point(start)):  # just pushed: back off to the nearest clear point first
        ring = tee.buffer(AGENT_RADIUS + CLEARANCE + 1.0, join_style=2).exterior
        start = np.array(ring.interpolate(ring.project(sg.Point(start))).coords[0])
        prefix.append(start)
    nodes = [start, goal] + [np.array(c) for c in corners.exterior.coords[:-1]]

    def clear(a: np.ndarray, b: np.ndarray) -> bool:
        return not blocked.intersects(sg.LineString([a, b]))

    if clear(start, goal):
        return prefix + [goal]
    dist = {0: 0.0}
    previous: dict[int, int] = {}
    queue = [(0.0, 0)]
    while queue:
        d, i = heapq.heappop(queue)
        if i == 1:
            break
        if d > dist.get(i, np.inf):
            continue
        for j in range(1, len(nodes)):
            if j != i and clear(nodes[i], nodes[j]):
                nd = d + float(np.linalg.norm(nodes[j] - nodes[i]))
                if nd < dist.get(j, np.inf):
                    dist[j], previous[j] = nd, i
                    heapq.heappush(queue, (nd, j))
    if 1 not in previous:
        return prefix + [goal]
    path, i = [], 1
    while i != 0:
        path.append(nodes[i])
        i = previous[i]
    return prefix + path[::-1]


@dataclass
class _Style:
    """Per-episode variations of the scripted motion."""

    lead: float  # px the travel target leads the disc (sets the travel speed, ~5 * lead px/s)
    push_gain: float  # push speed (px/step) per px of pose error
    max_push_speed: float  # px/step

    @classmethod
    def sample(cls, rng: np.random.Generator) -> _Style:
        return cls(lead=rng.uniform(30.0, 50.0), push_gain=rng.uniform(0.15, 0.25),
                   max_push_speed=rng.uniform(8.0, 12.0))


@dataclass
class _Push:
    """One planned push: travel to ``start``, then follow ``targets`` (ramp and hold)."""

    start: np.ndarray
    targets: np.ndarray
    error: float
    waypoints: list[np.ndarray] = field(default_factory=list)


class PushTExpert:
    """Plans pushes in a replica of the scene and returns one disc target ``(2,)`` per step."""

    def __init__(self, env: PushTEnv, rng: np.random.Generator) -> None:
        self.env = env
        self.style = _Style.sample(rng)
        self.replica = _Replica(env)
        self._push: _Push | None = None
        self._phase = "plan"
        self._planned_pose = np.zeros(3)
        self._travel_steps = 0

    def _plan(self, agent: np.ndarray, pose: np.ndarray) -> _Push:
        """Best push from the current pose: a coarse search, then exact push lengths for the best few."""
        error = float(pose_error(pose))
        speed = float(np.clip(self.style.push_gain * error, 1.5, self.style.max_push_speed))
        push = self._search(agent, pose, PUSH_ANGLES, speed, PUSH_STEPS)
        if push.error > error - 0.05:  # stuck: slower pushes in more directions
            push = self._search(agent, pose, WIDE_PUSH_ANGLES, max(1.0, speed / 2), 2 * PUSH_STEPS)
        push.waypoints = _shortest_path(agent, push.start, pose)
        return push

    def _search(self, agent: np.ndarray, pose: np.ndarray, angles: np.ndarray, speed: float, steps: int) -> _Push:
        rotation = _rotation(pose[2])
        starts = _STARTS @ rotation.T + pose[:2]  # (n, 2)
        inward = _INWARD @ rotation.T
        ramp = speed * np.arange(1, steps + 1)[:, None]  # (steps, 1)
        coarse = []
        for start, normal in zip(starts, inward):
            if not (ARENA[0] <= start[0] <= ARENA[1] and ARENA[0] <= start[1] <= ARENA[1]):
                continue
            for angle in angles:
                direction = _rotation(angle) @ normal
                errors = pose_error(self.replica.rollout(start, pose, start + ramp * direction))
                k = int(np.argmin(errors))
                coarse.append((float(errors[k]), k + 1, start, direction))
        coarse.sort(key=lambda c: c[0])
        best = _Push(start=agent, targets=np.repeat(agent[None], HOLD_STEPS, axis=0), error=np.inf)
        for _, k_best, start, direction in coarse[:REFINE_TOP]:
            for k in range(max(1, k_best - 2), k_best + 1):
                ramp_k = start + ramp[:k] * direction
                targets = np.concatenate([ramp_k, np.repeat(ramp_k[-1:], HOLD_STEPS, axis=0)])
                final = float(pose_error(self.replica.rollout(start, pose, targets)[-1]))
                if final < best.error:
                    best = _Push(start=start, targets=targets, error=final)
        return best

    def _travel_target(self, agent: np.ndarray, velocity: np.ndarray) -> np.ndarray | None:
        """Disc target towards the next waypoint, or ``None`` once at rest on the push's start point."""
        assert self._push is not None
        waypoints = self._push.waypoints
        if len(waypoints) > 1 and np.linalg.norm(waypoints[0] - agent) < 6.0:
            waypoints.pop(0)
        offset = waypoints[0] - agent
        distance = float(np.linalg.norm(offset))
        if len(waypoints) == 1 and distance < 1.0 and np.linalg.norm(velocity) < 15.0:
            return None
        lead = self.style.lead
        return waypoints[0] if distance <= lead else agent + offset * (lead / distance)

    def act(self) -> np.ndarray:
        """The next disc target ``(2,)`` in pixels."""
        raw = self.env.raw
        agent, velocity = np.array(raw.agent.position), np.array(raw.agent.velocity)
        pose = np.array([raw.block.position.x, raw.block.position.y, raw.block.angle])
        if self._phase == "travel":  # replan when the block was bumped or the disc got stuck
            self._travel_steps += 1
            if pose_error(pose, self._planned_pose) > 0.5 or self._travel_steps > 60:
                self._phase = "plan"
        if self._phase == "plan":
            self._push = self._plan(agent, pose)
            self._planned_pose = pose
            self._phase, self._travel_steps = "travel", 0
        if self._phase == "travel":
            target = self._travel_target(agent, velocity)
            if target is not None:
                return target
            self._phase = "push"
        assert self._push is not None
        target, self._push.targets = self._push.targets[0], self._push.targets[1:]
        if len(self._push.targets) == 0:
            self._phase = "plan"
        return target


def _run_episode(env: PushTEnv, episode_seed: int) -> tuple[bool, float, dict[str, np.ndarray]]:
    """Roll out the expert once; returns (success, max coverage, episode arrays)."""
    obs, info = env.reset(seed=episode_seed)
    expert = PushTExpert(env, np.random.default_rng(episode_seed))
    images, states, actions = [], [], []
    max_coverage, success = info["coverage"], False
    for _ in range(MAX_EPISODE_STEPS):
        images.append(obs["rgb"][CAMERA])
        states.append(env.state())
        action = expert.act().astype(np.float32)  # executed exactly as stored, so replays reproduce the episode
        actions.append(action)
        obs, _, success, _, info = env.step(action)
        max_coverage = max(max_coverage, info["coverage"])
        if success:
            break
    states_arr = np.stack(states)  # (T, 5)
    episode = {
        "img": np.stack(images),  # (T, 96, 96, 3) uint8
        "state": states_arr,
        "keypoint": np.stack([block_keypoints(s[2:]) for s in states_arr]),  # (T, 9, 2)
        "action": np.stack(actions),  # (T, 2)
    }
    return success, max_coverage, episode


def generate_pusht_demos(
    out: str, episodes: int, seed: int = 0, keep_failures: bool = False, overwrite: bool = False
) -> dict:
    """Run the expert for ``episodes`` episodes (episode ``i`` uses seed ``seed + i``) and save them.

    Only successful episodes are written unless ``keep_failures``. Returns stats: ``episodes``,
    ``successes``, ``success_rate``, ``mean_max_coverage``, ``mean_length`` (steps of the saved
    episodes), ``saved``, ``seconds``, ``path``.
    """
    if episodes <= 0:
        raise ValueError(f"episodes must be positive, got {episodes}")
    start = time.perf_counter()
    env = PushTEnv(obs_mode="image", max_episode_steps=MAX_EPISODE_STEPS)
    coverages, lengths, successes = [], [], 0
    try:
        with PushTZarrWriter(out, overwrite=overwrite) as writer:
            with tqdm(range(episodes), desc="pusht expert", unit="ep") as progress:
                for i in progress:
                    success, max_coverage, episode = _run_episode(env, seed + i)
                    successes += int(success)
                    coverages.append(max_coverage)
                    if success or keep_failures:
                        writer.add_episode(**episode)
                        lengths.append(len(episode["action"]))
                    progress.set_postfix(success=f"{successes}/{i + 1}", coverage=f"{np.mean(coverages):.3f}")
    finally:
        env.close()
    stats = {
        "episodes": episodes,
        "successes": successes,
        "success_rate": successes / episodes,
        "mean_max_coverage": float(np.mean(coverages)),
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "saved": len(lengths),
        "seconds": time.perf_counter() - start,
        "path": out,
    }
    print(
        f"expert success {successes}/{episodes} = {100 * stats['success_rate']:.1f}% "
        f"(mean max coverage {stats['mean_max_coverage']:.3f}); saved {stats['saved']} episodes, "
        f"mean length {stats['mean_length']:.1f} steps, {stats['seconds']:.1f} s -> {out}"
    )
    return stats
