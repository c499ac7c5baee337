"""CALVIN's long-horizon evaluation: chains of 5 language instructions, stopped at the first failure.

The protocol is CALVIN's (Mees et al., RA-L 2022; github.com/mees/calvin,
``calvin_models/calvin_agent/evaluation/``), rewritten here:

- ``get_sequences(n)`` gives the same ``n`` chains, in the same order, as CALVIN's
  ``multistep_sequences.get_sequences(n)``: every symbolic start state (LED, lightbulb, slider,
  drawer and where each block lies), a share of the chains for each, drawn with NumPy's legacy
  generator seeded by the state's index until a chain of 5 tasks of distinct categories is valid
  from that state, then all shuffled with seed 0. ``tasks=`` restricts the draws to a subset (the
  scripted expert's tasks); without it the chains are CALVIN's.
- ``condition_state(condition)`` is CALVIN's ``get_env_state_for_initial_condition``: the robot's
  fixed start and a scene with the drawer, slider and lights as the condition says and the blocks
  on their slots, the two table slots shuffled and the blocks' yaw drawn with a seed that is the
  32-bit FNV-1 hash (the ``pyhash.fnv1_32`` CALVIN uses, seed 0, which hashes a ``str`` as its
  UTF-16-LE bytes) of ``str(condition.values())``.
- Every subtask gets ``EP_LEN`` = 360 steps and its instruction from CALVIN's
  ``new_playtable_validation.yaml`` (``INSTRUCTIONS``); the policy's history and action queue are
  cleared at each new subtask (CALVIN's ``model.reset()``); the chain stops at the first failure.
- Results: the success rate after 1..5 subtasks in a row, the average length (subtasks done per
  chain, 0..5) and per-task success (done / attempted), as CALVIN's ``print_and_save``.

``ChainedEvaluator`` runs the chains in ``SubprocVecEnv`` workers with ``evaluate.Predictor``'s
batched chunks, the observation windows of ``mimictest.evaluate`` and, optionally, ACT's temporal
ensembling; under accelerate each process runs every ``world``-th chain and ``train`` gathers the
records. A record has ``success`` (all 5 done) and ``max_score`` (subtasks done / 5), so the
generic summary in ``train`` reports the 5/5 rate and the average length / 5; ``summarize_chains``
gives CALVIN's table.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Sequence

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from mimictest.envs.vector import ScheduledEnv, make_vec_env, unflatten
from mimictest.evaluate import (ChunkQueues, Predictor, _write_video, new_history, push_history, reset_history,
                                wilson_interval, window_of)

EP_LEN = 360
CHAIN_LEN = 5
BLOCKS = ("red", "blue", "pink")

# CALVIN's evaluation instructions (calvin_models/conf/annotations/new_playtable_validation.yaml).
INSTRUCTIONS: dict[str, str] = {
    **{f"rotate_{b}_block_{side}": f"take the {b} block and rotate it to the {side}" for b in BLOCKS for side in ("right", "left")},
    **{f"push_{b}_block_{side}": f"go push the {b} block {side}" for b in BLOCKS for side in ("right", "left")},
    "move_slider_left": "push the sliding door to the left side",
    "move_slider_right": "push the sliding door to the right side",
    "open_drawer": "pull the handle to open the drawer",
    "close_drawer": "push the handle to close the drawer",
    **{f"lift_{b}_block_table": f"grasp and lift the {b} block" for b in BLOCKS},
    **{f"lift_{b}_block_slider": f"lift the {b} block from the sliding cabinet" for b in BLOCKS},
    **{f"lift_{b}_block_drawer": f"Take the {b} block from the drawer" for b in BLOCKS},
    "place_in_slider": "store the grasped block in the sliding cabinet",
    "place_in_drawer": "store the grasped block in the drawer",
    "push_into_drawer": "slide the block that it falls into the drawer",
    "stack_block": "stack the grasped block",
    "unstack_block": "remove the stacked block",
    "turn_on_lightbulb": "use the switch to turn on the light bulb",
    "turn_off_lightbulb": "use the switch to turn off the light bulb",
    "turn_on_led": "press the button to turn on the led light",
    "turn_off_led": "press the button to turn off the led light",
}

Rule = tuple[dict, dict]  # (condition, effect) on the symbolic state


def _task_rules() -> dict[str, tuple[int, list[Rule]]]:
    """Every task's category and ``(condition, effect)`` rules, in the order of CALVIN's ``tasks`` dict.

    A chain never holds two tasks of one category (e.g. both LED tasks); the order matters, since
    the chains are drawn from this list by position.
    """
    free = {"grasped": 0}
    rules: dict[str, tuple[int, list[Rule]]] = {}
    for verb in ("rotate", "push"):
        for b in BLOCKS:
            for side in ("right", "left"):
                rules[f"{verb}_{b}_block_{side}"] = (1, [({f"{b}_block": "table", **free}, {f"{b}_block": "table"})])
    rules["move_slider_left"] = (2, [({"slider": "right", **free}, {"slider": "left"})])
    rules["move_slider_right"] = (2, [({"slider": "left", **free}, {"slider": "right"})])
    rules["open_drawer"] = (3, [({"drawer": "closed", **free}, {"drawer": "open"})])
    rules["close_drawer"] = (3, [({"drawer": "open", **free}, {"drawer": "closed"})])
    for b in BLOCKS:
        held = {f"{b}_block": "grasped", "grasped": 1}
        rules[f"lift_{b}_block_table"] = (4, [({f"{b}_block": "table", **free}, held)])
        rules[f"lift_{b}_block_slider"] = (5, [({f"{b}_block": "slider_left", "slider": "right", **free}, held),
                                               ({f"{b}_block": "slider_right", "slider": "left", **free}, held)])
        rules[f"lift_{b}_block_drawer"] = (6, [({f"{b}_block": "drawer", "drawer": "open", **free}, held)])
    rules["place_in_slider"] = (7, [({f"{b}_block": "grasped", "slider": side, "grasped": 1},
                                     {f"{b}_block": f"slider_{side}", "grasped": 0})
                                    for b in BLOCKS for side in ("right", "left")])
    rules["place_in_drawer"] = (7, [({f"{b}_block": "grasped", "drawer": "open", "grasped": 1},
                                     {f"{b}_block": "drawer", "grasped": 0}) for b in BLOCKS])
    pairs = [(top, bottom) for top in BLOCKS for bottom in BLOCKS if top != bottom]
    rules["stack_block"] = (10, [({f"{t}_block": "grasped", f"{u}_block": "table", "grasped": 1},
                                  {f"{t}_block": "stacked_top", f"{u}_block": "stacked_bottom", "grasped": 0})
                                 for t, u in pairs])
    rules["unstack_block"] = (11, [({f"{t}_block": "stacked_top", f"{u}_block": "stacked_bottom", **free},
                                    {f"{t}_block": "table", f"{u}_block": "table"}) for t, u in pairs])
    for light, key in (("lightbulb", "lightbulb"), ("led", "led")):
        rules[f"turn_on_{light}"] = (8, [({key: 0, **free}, {key: 1})])
        rules[f"turn_off_{light}"] = (8, [({key: 1, **free}, {key: 0})])
    shelf = ["slider_right", "slider_left"]
    rules["push_into_drawer"] = (9, [({f"{b}_block": "table", **{f"{o}_block": shelf for o in BLOCKS if o != b},
                                       "drawer": "open", **free}, {f"{b}_block": "drawer", "grasped": 0})
                                     for b in BLOCKS])
    return rules


TASK_RULES = _task_rules()
TASKS: tuple[str, ...] = tuple(TASK_RULES)  # the 34 tasks, in CALVIN's order
CATEGORIES: dict[str, int] = {name: category for name, (category, _) in TASK_RULES.items()}
START_VALUES: dict[str, list] = {
    "led": [0, 1], "lightbulb": [0, 1], "slider": ["right", "left"], "drawer": ["closed", "open"],
    "red_block": ["table", "slider_right", "slider_left"], "blue_block": ["table", "slider_right", "slider_left"],
    "pink_block": ["table", "slider_right", "slider_left"], "grasped": [0],
}


def start_conditions() -> list[dict]:
    """Every symbolic start state: one or two blocks on the table, at most one block per slider side."""
    out = []
    for values in itertools.product(*START_VALUES.values()):
        if values.count("table") in (1, 2) and values.count("slider_right") < 2 and values.count("slider_left") < 2:
            out.append(dict(zip(START_VALUES, values)))
    return out


def _holds(state: dict, condition: dict) -> bool:
    return all(state[k] in v if isinstance(v, list) else state[k] == v for k, v in condition.items())


def next_states(state: dict, task: str) -> list[dict]:
    """The states ``task`` can lead to from ``state`` (one per rule whose condition holds)."""
    return [{**state, **effect} for condition, effect in TASK_RULES[task][1] if _holds(state, condition)]


def valid_chain(state: dict, chain: Sequence[str]) -> bool:
    """Each task has exactly one way to apply in turn, and no two share a category."""
    for task in chain:
        states = next_states(state, task)
        if len(states) != 1:
            return False
        state = states[0]
    return len({CATEGORIES[t] for t in chain}) == len(chain)


def has_chain(state: dict, tasks: Sequence[str], used: frozenset = frozenset(), depth: int = CHAIN_LEN) -> bool:
    """Whether some valid chain of ``depth`` tasks from ``tasks`` starts at ``state`` (depth-first)."""
    if depth == 0:
        return True
    for task in tasks:
        if CATEGORIES[task] not in used:
            states = next_states(state, task)
            if len(states) == 1 and has_chain(states[0], tasks, used | {CATEGORIES[task]}, depth - 1):
                return True
    return False


class _Transitions:
    """``valid_chain`` from one start state, with each (state, task) step computed once."""

    def __init__(self, start: dict, names: list[str]) -> None:
        self.names, self.states = names, [start]
        self.ids = {tuple(start.values()): 0}
        self.table: dict[tuple[int, int], int | None] = {}  # (state id, task index) -> next state id, None if not one

    def _next(self, s: int, t: int) -> int | None:
        key = (s, t)
        if key not in self.table:
            states = next_states(self.states[s], self.names[t])
            if len(states) != 1:
                self.table[key] = None
            else:
                values = tuple(states[0].values())
                if values not in self.ids:
                    self.ids[values] = len(self.states)
                    self.states.append(states[0])
                self.table[key] = self.ids[values]
        return self.table[key]

    def valid(self, chain: list[int]) -> bool:
        s: int | None = 0
        for t in chain:
            s = self._next(s, t)
            if s is None:
                return False
        return True


def get_sequences(num_sequences: int = 1000, tasks: Iterable[str] | None = None) -> list[tuple[dict, tuple[str, ...]]]:
    """``num_sequences`` ``(start condition, 5 task names)`` chains: CALVIN's, in CALVIN's order.

    ``tasks``: draw the chains from these tasks only (kept in CALVIN's order), over the start
    states that admit a chain of them; ``None`` for all 34 (CALVIN's own chains).
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    names = list(TASKS)
    states = start_conditions()
    if tasks is not None:
        subset = set(tasks)
        unknown = sorted(subset - set(TASKS))
        if unknown:
            raise ValueError(f"unknown CALVIN task(s) {unknown}; the tasks are {list(TASKS)}")
        names = [t for t in TASKS if t in subset]
        states = [s for s in states if has_chain(s, names)]
        if not states:
            raise ValueError(f"no chain of {CHAIN_LEN} tasks of distinct categories can be made from {names}")
    counts = [len(part) for part in np.array_split(np.arange(num_sequences), len(states))]
    categories = [CATEGORIES[t] for t in names]
    chains = []
    for i, (state, count) in enumerate(zip(states, counts)):
        rng = np.random.RandomState(i)  # CALVIN seeds NumPy's global generator with the state's index
        step = _Transitions(state, names)
        found = 0
        while found < count:
            # NumPy's choice(names, 5, replace=False) is permutation(len(names))[:5]: the same draws.
            chain = rng.permutation(len(names))[:CHAIN_LEN].tolist()
            if len({categories[t] for t in chain}) == CHAIN_LEN and step.valid(chain):
                chains.append((state, tuple(names[t] for t in chain)))
                found += 1
    np.random.RandomState(0).shuffle(chains)
    return chains


def fnv1_32(data: bytes) -> int:
    """32-bit FNV-1 (multiply, then xor) from 0, as ``pyhash.fnv1_32()`` computes it."""
    h = 0
    for byte in data:
        h = ((h * 16777619) & 0xFFFFFFFF) ^ byte
    return h


ROBOT_START = np.array([0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
                        -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928, 1.0])
BLOCK_SLOTS = {"slider_left": (-2.40851662e-01, 9.24044687e-02, 4.60990009e-01),
               "slider_right": (7.03416330e-02, 9.24044687e-02, 4.60990009e-01)}
TABLE_SLOTS = ((5.00000896e-02, -1.20000177e-01, 4.59990009e-01), (2.29995412e-01, -1.19995140e-01, 4.59990010e-01))
BLOCK_YAW = (np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)


def condition_state(condition: dict) -> tuple[np.ndarray, np.ndarray]:
    """A symbolic start state -> ``(robot_obs (15,), scene_obs (24,))`` as CALVIN's evaluation builds them."""
    missing = [k for k in START_VALUES if k not in condition]
    if missing:
        raise KeyError(f"the start condition has no {missing}; it needs {list(START_VALUES)}")
    rng = np.random.RandomState(fnv1_32(str(condition.values()).encode("utf-16-le")))
    table = [np.array(slot) for slot in TABLE_SLOTS]
    rng.shuffle(table)
    scene = np.zeros(24)
    scene[0] = 0.28 if condition["slider"] == "left" else 0.0
    scene[1] = 0.22 if condition["drawer"] == "open" else 0.0
    scene[3] = 0.088 if condition["lightbulb"] == 1 else 0.0  # the switch
    scene[4], scene[5] = condition["lightbulb"], condition["led"]
    for k, block in enumerate(BLOCKS):
        where = condition[f"{block}_block"]
        if where in BLOCK_SLOTS:
            pos = BLOCK_SLOTS[where]
        elif block == "red" or (block == "blue" and condition["red_block"] != "table"):
            pos = table[0]
        else:
            pos = table[1]
        scene[6 + 6 * k: 9 + 6 * k] = pos
        scene[11 + 6 * k] = rng.uniform(*BLOCK_YAW)
    return ROBOT_START.copy(), scene


@dataclass(kw_only=True)
class ChainedEvaluator:
    """CALVIN's chained evaluation over parallel workers (see the module docstring).

    Attributes:
        make_env: ``make_env(render_video=...) -> mimictest.envs.calvin.CalvinEnv``, picklable.
        num_chains: chains over all processes (CALVIN: 1000).
        num_envs: parallel workers per process.
        obs_horizon: observation steps the policy sees.
        exec_start, exec_end: the slice of each predicted chunk that is executed.
        tasks: draw chains from these tasks only; ``None`` for CALVIN's chains over all 34.
        instructions: the instruction given for each task (CALVIN's validation ones by default).
        num_videos: chains saved as mp4 (worker 0 of the main process).
        video_fps: frames per second of those videos.
        temporal_ensemble: ACT's ensembling coefficient, or ``None`` to execute chunks open-loop.
    """

    make_env: Callable[..., gym.Env]
    num_chains: int = 1000
    num_envs: int = 1
    obs_horizon: int = 1
    exec_start: int = 0
    exec_end: int = 1
    tasks: tuple[str, ...] | None = None
    instructions: dict[str, str] = field(default_factory=lambda: dict(INSTRUCTIONS))
    num_videos: int = 0
    video_fps: int = 15
    temporal_ensemble: float | None = None
    _venv: object = field(default=None, init=False, repr=False)
    _venv_key: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.exec_start < self.exec_end:
            raise ValueError(f"need 0 <= exec_start < exec_end, got [{self.exec_start}, {self.exec_end})")
        self.chains = get_sequences(self.num_chains, self.tasks)
        missing = sorted({t for _, chain in self.chains for t in chain} - set(self.instructions))
        if missing:
            raise ValueError(f"instructions has no instruction for task(s) {missing}")

    @property
    def execution(self) -> str:
        """How chunks are executed: ``"ensemble0.01"`` or ``"chunk[1:9]"``."""
        if self.temporal_ensemble is not None:
            return f"ensemble{self.temporal_ensemble:g}"
        return f"chunk[{self.exec_start}:{self.exec_end}]"

    def check(self, task_names: list[str] | None, instructions: bool) -> None:
        """Refuse a policy without instructions: CALVIN's chains are only told apart by them."""
        if not instructions:
            raise ValueError("the chained CALVIN evaluation gives the policy an instruction per subtask, but the policy "
                             "was trained without instructions; build the Preprocessor with a text_encoder")

    def close(self) -> None:
        if self._venv is not None:
            self._venv.close()
            self._venv = None

    def _workers(self, mine: list[int], videos: bool) -> tuple[object, list[list[int]]]:
        num_envs = min(self.num_envs, len(mine))
        schedules = [mine[w::num_envs] for w in range(num_envs)]
        key = (tuple(mine), videos)
        if self._venv is None or self._venv_key != key:
            self.close()
            fns = [partial(ScheduledEnv, [partial(self.make_env, render_video=videos and w == 0)],
                           [(0, {"condition": self.chains[c][0], "tasks": list(self.chains[c][1])}) for c in schedule],
                           video_episodes=self.num_videos)
                   for w, schedule in enumerate(schedules)]
            self._venv = make_vec_env(fns, subprocess=num_envs > 1)
            self._venv_key = key
        return self._venv, schedules  # reset() starts every worker's schedule again

    def rollouts(self, predictor: Predictor, rank: int = 0, world: int = 1, video_dir: str | None = None,
                 progress: bool = True) -> list[dict]:
        """Run process ``rank``'s share (of ``world``) of the chains; one record per chain."""
        mine = list(range(len(self.chains)))[rank::world]
        if not mine:
            return []
        venv, schedules = self._workers(mine, video_dir is not None and self.num_videos > 0)
        num_envs = len(schedules)
        done_count = [0] * num_envs
        subtask = [0] * num_envs  # each worker's current subtask index
        obs = unflatten(venv.reset())
        history = new_history(obs, self.obs_horizon)  # (num_envs, T_obs, ...)
        actions = ChunkQueues(num_envs, self.exec_start, self.exec_end, self.temporal_ensemble)
        steps = np.zeros(num_envs, int)
        frames: list[np.ndarray] = []
        records: list[dict] = []
        bar = tqdm(total=len(mine), desc="chains", unit="chain", disable=not progress, leave=False)

        def running(i: int) -> bool:
            return done_count[i] < len(schedules[i])

        def chain_of(i: int) -> tuple[str, ...]:
            return self.chains[schedules[i][done_count[i]]][1]

        def clear(i: int) -> None:  # CALVIN's model.reset() at every new subtask
            actions.clear(i)
            reset_history(history, obs, i)

        with predictor.autocast():
            while any(running(i) for i in range(num_envs)):
                active = [i for i in range(num_envs) if running(i)]
                need = actions.needing(active)
                if need:
                    window = window_of(history, need, [])
                    window["lang"] = [self.instructions[chain_of(i)[subtask[i]]] for i in need]
                    actions.fill(predictor, window, need)
                flat_obs, _, dones, infos = venv.step(actions.step(predictor, active))  # (num_envs, 7) actions
                obs = unflatten(flat_obs)
                steps += 1
                if "frame" in infos[0] and running(0) and sum(r["env"] == 0 for r in records) < self.num_videos:
                    frames.append(infos[0]["frame"])
                push_history(history, obs)
                for i in range(num_envs):
                    if not running(i):
                        continue
                    if "worker_restart" in infos[i]:  # a fresh worker runs the interrupted chain again from its start
                        steps[i], subtask[i] = 0, 0
                        clear(i)
                        if i == 0:
                            frames = []
                    elif dones[i]:
                        c = schedules[i][done_count[i]]
                        condition, chain = self.chains[c]
                        completed = int(infos[i]["completed"])
                        records.append({"task": "chain", "chain": c, "sequence": list(chain), "condition": condition,
                                        "completed": completed, "success": completed == len(chain),
                                        "max_score": completed / len(chain), "length": int(steps[i]),
                                        "seed": None, "rank": rank, "env": i})
                        done_count[i] += 1
                        bar.update(1)
                        if i == 0 and frames and video_dir is not None:
                            _write_video(frames, video_dir, f"chain{c}", self.video_fps)
                            frames = []
                        steps[i], subtask[i] = 0, 0
                        clear(i)
                    elif infos[i]["subtask_success"]:
                        subtask[i] = int(infos[i]["subtask"])
                        clear(i)
        bar.close()
        return records


def summarize_chains(records: list[dict]) -> dict:
    """CALVIN's results: success after 1..5 subtasks in a row (%, with 95% Wilson intervals), the
    average length, and each task's success over its attempts."""
    n = len(records)
    if n == 0:
        raise ValueError("no chains to summarise")
    completed = [r["completed"] for r in records]
    after = {}
    for k in range(1, CHAIN_LEN + 1):
        wins = sum(c >= k for c in completed)
        after[k] = {"success_rate": 100.0 * wins / n, "success_ci95": list(wilson_interval(wins, n))}
    done, tried = Counter(), Counter()
    for r in records:
        seq = r["sequence"]
        done.update(seq[:r["completed"]])
        tried.update(seq[:r["completed"] + 1])
    per_task = {t: {"success": done[t], "total": tried[t], "success_rate": 100.0 * done[t] / tried[t]}
                for t in sorted(tried, key=lambda t: TASKS.index(t))}
    return {"chains": n, "avg_len": float(np.mean(completed)), "after": after, "tasks": per_task}


def format_chains(summary: dict) -> str:
    """A plain-text table of ``summarize_chains``: success after 1..5, the average length, per task."""
    lines = [f"CALVIN chains: {summary['chains']}, average length {summary['avg_len']:.3f} / {CHAIN_LEN}",
             "subtasks in a row  success  95% CI"]
    for k, v in summary["after"].items():
        lo, hi = v["success_ci95"]
        lines.append(f"{k:>17d}  {v['success_rate']:6.1f}%  [{lo:5.1f}, {hi:5.1f}]%")
    width = max(len(t) for t in summary["tasks"])
    lines.append(f"{'task':<{width}}  success / tried")
    for t, v in summary["tasks"].items():
        lines.append(f"{t:<{width}}  {v['success_rate']:6.1f}%  {v['success']:4d} / {v['total']:4d}")
    return "\n".join(lines)


def report(run_dir: str) -> dict:
    """Print and return ``summarize_chains`` of a run's newest ``eval_step<N>.json`` (written by ``train``)."""
    names = [n for n in os.listdir(run_dir) if n.startswith("eval_step") and n.endswith(".json")] if os.path.isdir(run_dir) else []
    if not names:
        raise FileNotFoundError(f"no eval_step<N>.json in {run_dir!r}; train with a ChainedEvaluator first")
    newest = max(names, key=lambda n: os.path.getmtime(os.path.join(run_dir, n)))
    with open(os.path.join(run_dir, newest)) as fh:
        records = json.load(fh)["episodes"]
    summary = summarize_chains(records)
    print(f"{newest}:\n{format_chains(summary)}")
    return summary
