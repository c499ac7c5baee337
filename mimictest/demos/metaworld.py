"""Meta-World's own scripted experts writing 3D Diffusion Policy's per-task zarr replay buffers.

Each task's expert is Meta-World's hand-written policy (``metaworld.policies.ENV_POLICY_MAP``, e.g.
``SawyerDrawerOpenV3Policy`` for ``drawer-open-v3``), which reads the full 39-d state (hand,
gripper, objects, goal) and returns the 4-d action; DP3's ``gen_demonstration_expert.py`` collects
its Meta-World data the same way. For each task, attempt ``k`` resets ``MetaWorldEnv`` with seed
``seed + k`` and runs the expert until Meta-World reports success (the env terminates there) or
``max_episode_steps``; only successful episodes are kept, until ``episodes_per_task`` of them or
``max_attempts`` attempts. Demo seeds must stay below ``EVAL_SEED_START`` (100000), where
evaluation seeds begin, so no evaluation start is a training start.

Two differences from DP3's collection: DP3 runs every episode for 200 steps and keeps those with at
least 5 successful steps, while here an episode ends at its first success, as evaluation episodes
do; and no point clouds or depth maps are written (see ``mimictest.data.metaworld``).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from mimictest.envs.metaworld import MetaWorldEnv

# Meta-World is imported when demos are generated, so that ``python -m mimictest.demos`` works without it.


def _run_episode(env: MetaWorldEnv, policy: Any, seed: int) -> tuple[bool, dict[str, Any]]:
    """One expert rollout from ``seed``; returns (success, episode arrays)."""
    obs, _ = env.reset(seed=seed)
    images: dict[str, list[np.ndarray]] = {cam: [] for cam in env.cams}
    states, full_states, actions = [], [], []
    success = False
    for _ in range(env.max_episode_steps):
        for cam in env.cams:
            images[cam].append(obs["rgb"][cam])
        states.append(env.robot_state())
        full_state = env.full_state
        full_states.append(full_state)
        with warnings.catch_warnings():  # "Constant(s) may be too high": the env clips, as Meta-World does
            warnings.simplefilter("ignore", UserWarning)
            action = np.clip(np.asarray(policy.get_action(full_state), dtype=np.float32), -1.0, 1.0)
        actions.append(action)  # stored as executed, so a replay reproduces the episode
        obs, _, success, truncated, _ = env.step(action)
        if success or truncated:
            break
    episode = {
        "images": {cam: np.stack(frames) for cam, frames in images.items()},  # {cam: (T, H, W, 3)}
        "state": np.stack(states),  # (T, 9)
        "full_state": np.stack(full_states),  # (T, 39)
        "action": np.stack(actions),  # (T, 4)
    }
    return success, episode


def generate_metaworld_demos(
    path: str,
    tasks: Sequence[str] | None = None,
    episodes_per_task: int = 10,
    cams: Sequence[str] = ("corner",),
    image_size: tuple[int, int] = (84, 84),
    seed: int = 0,
    max_episode_steps: int | None = None,
    max_attempts: int | None = None,
    render_quality: str = "fast",
) -> dict[str, Any]:
    """Write ``episodes_per_task`` successful expert episodes of each task into the folder ``path``.

    Args:
        path: the dataset folder; it gets one ``metaworld_<name>_expert.zarr`` per task (each written
            atomically). It may already hold other tasks' files, but never one of ``tasks``.
        tasks: Meta-World task names (``None``: MT10).
        episodes_per_task: successful episodes to keep per task.
        cams, image_size: the cameras recorded and their ``(H, W)``; ``cams=()`` records no images.
        seed: attempt ``k`` of every task resets with seed ``seed + k``.
        max_episode_steps: step limit of an attempt (``None``: Meta-World's 500).
        max_attempts: attempts per task before giving up (default ``2 * episodes_per_task + 10``).
        render_quality: ``MetaWorldEnv``'s ``"fast"`` or ``"full"``.

    Returns ``{"tasks": {task: {"attempts", "successes", "success_rate", "mean_length", "path"}},
    "episodes": saved in all, "seconds", "path"}``. A task with no success raises ``RuntimeError``.
    """
    # mimictest.envs.metaworld first: it picks the EGL backend, which MuJoCo reads when first imported.
    from mimictest.envs.metaworld import EVAL_SEED_START, MT10_TASKS, MetaWorldEnv, check_cams, check_task
    from metaworld.policies import ENV_POLICY_MAP  # noqa: I001

    from mimictest.data.metaworld import MetaWorldZarrWriter, zarr_name

    tasks, cams = list(MT10_TASKS if tasks is None else tasks), check_cams(cams)
    for task in tasks:
        check_task(task)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct Meta-World task names, got {tasks}")
    if episodes_per_task <= 0:
        raise ValueError(f"episodes_per_task must be positive, got {episodes_per_task}")
    max_attempts = 2 * episodes_per_task + 10 if max_attempts is None else max_attempts
    if max_attempts < episodes_per_task:
        raise ValueError(f"max_attempts ({max_attempts}) is below episodes_per_task ({episodes_per_task})")
    if seed < 0 or seed + max_attempts > EVAL_SEED_START:
        raise ValueError(f"demo seeds {seed}..{seed + max_attempts - 1} must lie in [0, {EVAL_SEED_START}); "
                         f"seeds from {EVAL_SEED_START} on are kept for evaluation")
    if os.path.isfile(path):
        raise FileExistsError(f"{path!r} is a file; a Meta-World dataset is a folder of per-task zarr files")
    existing = [t for t in tasks if os.path.exists(os.path.join(path, zarr_name(t)))]
    if existing:
        remaining = [t for t in tasks if t not in existing]
        raise FileExistsError(f"{path!r} already holds {[zarr_name(t) for t in existing]}; files are never "
                              f"overwritten: delete them, choose another folder, or pass only the remaining "
                              f"tasks ({','.join(remaining) or 'none'})")
    start = time.perf_counter()
    summary: dict[str, Any] = {"tasks": {}, "episodes": 0, "seconds": 0.0, "path": path}
    with tqdm(total=len(tasks) * episodes_per_task, desc="metaworld expert", unit="ep") as progress:
        for task in tasks:
            env = MetaWorldEnv(task, cams=cams, image_size=image_size, max_episode_steps=max_episode_steps,
                               render_quality=render_quality)
            policy = ENV_POLICY_MAP[task]()
            file = os.path.join(path, zarr_name(task))
            attrs = {"max_episode_steps": env.max_episode_steps, "render_quality": render_quality}
            attempts, lengths = 0, []
            try:
                with MetaWorldZarrWriter(file, task, cams, attrs) as writer:
                    while writer.num_episodes < episodes_per_task and attempts < max_attempts:
                        success, episode = _run_episode(env, policy, seed + attempts)
                        if success:
                            writer.add_episode(**episode, seed=seed + attempts)
                            lengths.append(len(episode["action"]))
                            progress.update(1)
                        attempts += 1
                        progress.set_postfix(task=task, success=f"{writer.num_episodes}/{attempts}")
                    if writer.num_episodes == 0:
                        raise RuntimeError(f"the {task} expert never succeeded in {attempts} attempts, "
                                           f"so {file!r} was not written")
            finally:
                env.close()
            stats = {"attempts": attempts, "successes": len(lengths), "success_rate": len(lengths) / attempts,
                     "mean_length": float(np.mean(lengths)), "path": file}
            summary["tasks"][task] = stats
            summary["episodes"] += len(lengths)
            tqdm.write(f"{task}: expert success {len(lengths)}/{attempts} = {100 * stats['success_rate']:.1f}%, "
                       f"mean length {stats['mean_length']:.0f} steps -> {file}")
    summary["seconds"] = time.perf_counter() - start
    print(f"{summary['episodes']} episodes of {len(tasks)} tasks in {summary['seconds']:.1f} s -> {path}")
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``python -m mimictest.demos metaworld``; it sets ``args.run`` to the generator call."""
    parser = commands.add_parser("metaworld", help="Meta-World tasks (MT10 by default), Meta-World's scripted "
                                 "experts (3D Diffusion Policy's per-task zarr files in one folder)")
    parser.add_argument("--episodes", type=int, required=True, help="successful episodes to keep per task")
    parser.add_argument("--out", required=True, help="dataset folder (one metaworld_<task>_expert.zarr per task)")
    parser.add_argument("--tasks", default=None, help="comma-separated task names, e.g. drawer-open-v3,reach-v3 "
                        "(default: MT10)")
    parser.add_argument("--cams", nargs="*", default=["corner"], help="cameras to record (none: low-dim only)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[84, 84], metavar=("H", "W"), help="image size")
    parser.add_argument("--seed", type=int, default=0, help="attempt k of each task uses seed SEED + k (< 100000)")
    parser.add_argument("--max-episode-steps", type=int, default=None, help="step limit (default 500)")
    parser.add_argument("--render-quality", choices=("fast", "full"), default="fast",
                        help="fast: no shadows, reflections or multisampling (about 15x faster on a CPU)")
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the demos that ``python -m mimictest.demos metaworld ...`` asks for."""
    return generate_metaworld_demos(
        args.out, tasks=args.tasks.split(",") if args.tasks else None, episodes_per_task=args.episodes,
        cams=tuple(args.cams), image_size=tuple(args.image_size), seed=args.seed,
        max_episode_steps=args.max_episode_steps, render_quality=args.render_quality)
