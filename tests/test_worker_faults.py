"""Evaluations that survive their env workers (``RestartingVecEnv`` under the ``Evaluator``).

``Faulty`` wraps a real env (the scripted env of ``tests/test_evaluate.py``, or PushT's simulator)
and, on chosen episodes, SIGKILLs its worker (as ``kill -9`` would), hangs, or raises; a marker file
makes a fault fire once per episode, so the rerun of the episode succeeds, as after a sporadic
crash. Every faulty evaluation must give the outcomes of a fault-free one, with its restarts
counted; an episode that fails every time stops the evaluation with one line naming the task and
the seed; and no worker outlives its parent.

Run as a script (``python tests/test_worker_faults.py PID_DIR``), this file starts an evaluation
whose workers hang, for the orphan test to kill.
"""

import os
import signal
import subprocess
import sys
import time
from functools import partial
from typing import Callable

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest

from mimictest.evaluate import EvalTask, EvaluationError, Evaluator, summarize
from test_evaluate import ScriptedEnv, outcomes, step_predictor


class Faulty(gym.Wrapper):
    """``env`` failing on the episodes of ``seeds`` at step ``step`` (``None``: in ``reset``).

    ``fault``: ``"kill"`` SIGKILLs this worker, ``"hang"`` sleeps for an hour, ``"raise"`` raises.
    With ``marker_dir`` each episode fails once (a marker file remembers it); without, every time,
    as a start that breaks the simulator would. With ``pid_dir``, the worker leaves
    ``<pid_dir>/<pid>``.
    """

    def __init__(self, env: gym.Env, fault: str, seeds: tuple[int, ...], step: int | None = 1,
                 marker_dir: str | None = None, pid_dir: str | None = None) -> None:
        super().__init__(env)
        self.fault, self.seeds, self.fault_step, self.marker_dir = fault, seeds, step, marker_dir
        if pid_dir is not None:
            open(os.path.join(pid_dir, str(os.getpid())), "w").close()

    def _maybe_fail(self, step: int | None) -> None:
        if self.seed not in self.seeds or step != self.fault_step:
            return
        if self.marker_dir is not None:
            marker = os.path.join(self.marker_dir, f"{self.fault}{self.seed}")
            if os.path.exists(marker):
                return
            open(marker, "w").close()
        if self.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.fault == "hang":
            time.sleep(3600)
        else:
            raise RuntimeError(f"simulator failure on seed {self.seed}")

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        self.seed, self.t = seed, 0
        self._maybe_fail(None)
        return self.env.reset(seed=seed, options=options)

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        self._maybe_fail(self.t)
        self.t += 1
        return self.env.step(action)


def faulty(make: Callable[..., gym.Env], render_video: bool = False, **fault) -> Faulty:
    """An ``EvalTask.make_env``: ``make(render_video=...)`` wrapped in ``Faulty(**fault)``."""
    return Faulty(make(render_video=render_video), **fault)


def evaluate(make_env, episodes: int, num_envs: int = 2, low_dim: int = 2, **settings) -> list[dict]:
    evaluator = Evaluator(tasks=[EvalTask("scripted", make_env, episodes)], num_envs=num_envs, obs_horizon=2,
                          exec_start=1, exec_end=3, num_videos=0, **settings)
    try:
        return evaluator.rollouts(step_predictor(low_dim=low_dim), progress=False)
    finally:
        evaluator.close()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pids(folder) -> list[int]:
    return [int(name) for name in os.listdir(folder)]


@pytest.fixture(scope="module")
def fault_free() -> dict:
    return outcomes(evaluate(ScriptedEnv, 60))


def test_a_worker_killed_every_20_episodes(tmp_path, fault_free):
    seeds = (100_000, 100_020, 100_040)  # episodes 0, 20 and 40 of 60
    make = partial(faulty, ScriptedEnv, fault="kill", seeds=seeds, step=2, marker_dir=str(tmp_path))
    records = evaluate(make, 60)
    assert len(records) == 60 and outcomes(records) == fault_free
    assert {r["seed"]: r["restarts"] for r in records if r["restarts"]} == {s: 1 for s in seeds}
    assert summarize(records)["worker_restarts"] == 3
    assert sorted(os.listdir(tmp_path)) == [f"kill{s}" for s in seeds]


def test_a_real_simulator_killed_every_20_episodes_and_hung(tmp_path):
    """PushT's simulator (gym-pusht): 40 episodes, SIGKILLed in episodes 0 and 20, hung in episode 30.

    Coverage is compared to 1e-12: PushT's can differ in its last bit between fault-free runs too,
    with what the parent process did before forking its workers (a torch op before the first fork
    changes episode 20's coverage by one ulp).
    """
    pytest.importorskip("gym_pusht", reason="PushT needs gym-pusht: pip install -e '.[sim]'")
    from mimictest.envs.pusht import PushTEnv

    pusht = partial(PushTEnv, obs_mode="keypoint", max_episode_steps=8)
    clean = evaluate(pusht, 40, low_dim=20)
    kills = partial(faulty, pusht, fault="kill", seeds=(100_000, 100_020), step=3, marker_dir=str(tmp_path))
    hang = partial(faulty, kills, fault="hang", seeds=(100_030,), step=5, marker_dir=str(tmp_path))
    records = evaluate(hang, 40, low_dim=20, step_timeout_s=0.5)
    got, expected = outcomes(records), outcomes(clean)
    assert len(records) == 40 and got.keys() == expected.keys()
    for key, (seed, success, length, coverage) in expected.items():
        assert got[key] == (seed, success, length, pytest.approx(coverage, rel=1e-12, abs=1e-12)), key
    assert {r["seed"]: r["restarts"] for r in records if r["restarts"]} == {100_000: 1, 100_020: 1, 100_030: 1}
    assert summarize(records)["worker_restarts"] == 3
    # The score is the clipped one (gym-pusht's reward); the raw coverage is recorded beside it.
    assert all(r["max_score"] == pytest.approx(min(r["max_coverage"] / 0.95, 1.0)) for r in records)
    assert summarize(records)["mean_max_coverage"] == pytest.approx(np.mean([r["max_coverage"] for r in records]))


def test_a_restarted_episode_films_only_its_rerun(tmp_path):
    make = partial(faulty, ScriptedEnv, fault="kill", seeds=(100_000,), step=2, marker_dir=str(tmp_path))
    evaluator = Evaluator(tasks=[EvalTask("scripted", make, 2)], num_envs=2, obs_horizon=1, exec_start=0, exec_end=2,
                          num_videos=1)
    records = evaluator.rollouts(step_predictor(), video_dir=str(tmp_path / "videos"), progress=False)
    evaluator.close()
    first = next(r for r in records if r["episode"] == 0)
    assert first["restarts"] == 1 and first["length"] == 3
    assert len(iio.imread(tmp_path / "videos" / "rank0_episode0.mp4")) == 3  # not the 2 frames of the killed run too


def test_kills_while_resetting_rerun_the_episode(tmp_path, fault_free):
    """A kill in the first reset, and one in a worker's reset after its episode 100001 ended: that
    episode's result died with the process, so it runs again."""
    make = partial(faulty, ScriptedEnv, fault="kill", seeds=(100_000, 100_003), step=None, marker_dir=str(tmp_path))
    records = evaluate(make, 6)
    assert outcomes(records) == {key: v for key, v in fault_free.items() if key[1] < 6}
    assert {r["seed"]: r["restarts"] for r in records if r["restarts"]} == {100_000: 1, 100_001: 1}
    assert summarize(records)["worker_restarts"] == 2


def test_a_hung_worker_is_restarted_after_the_timeout(tmp_path, fault_free):
    markers, workers = tmp_path / "markers", tmp_path / "pids"
    markers.mkdir(), workers.mkdir()
    make = partial(faulty, ScriptedEnv, fault="hang", seeds=(100_002,), step=1, marker_dir=str(markers),
                   pid_dir=str(workers))
    records = evaluate(make, 5, step_timeout_s=0.5)
    assert outcomes(records) == {key: v for key, v in fault_free.items() if key[1] < 5}
    assert [r["seed"] for r in records if r["restarts"]] == [100_002] and summarize(records)["worker_restarts"] == 1
    assert len(pids(workers)) == 3 and not any(alive(pid) for pid in pids(workers))  # the hung one was killed


@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_an_episode_that_always_fails_stops_with_one_line(tmp_path, fault):
    make = partial(faulty, ScriptedEnv, fault=fault, seeds=(100_003,), step=1, pid_dir=str(tmp_path))
    with pytest.raises(EvaluationError) as error:
        evaluate(make, 6, max_worker_failures=2)
    message = str(error.value)
    assert "\n" not in message
    assert "'scripted' episode 3 (seed 100003) failed 2 time(s) in a row" in message
    assert ("exited with code 1" if fault == "raise" else "killed by signal 9") in message
    assert not any(alive(pid) for pid in pids(tmp_path))  # the evaluator closed its other workers too


def test_workers_die_with_their_parent(tmp_path):
    trainer = subprocess.Popen([sys.executable, __file__, str(tmp_path)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(pids(tmp_path)) < 2 and time.monotonic() < deadline and trainer.poll() is None:
        time.sleep(0.05)
    workers = pids(tmp_path)
    assert len(workers) == 2 and all(alive(pid) for pid in workers)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = [pid for pid in workers if alive(pid)]
    for pid in orphans:  # leave no orphan behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not orphans, f"workers {orphans} outlived their parent"


if __name__ == "__main__":  # the "trainer" of test_workers_die_with_their_parent: its two workers hang in step 0
    hang = partial(faulty, ScriptedEnv, fault="hang", seeds=(100_000, 100_001), step=0, pid_dir=sys.argv[1])
    evaluate(hang, 2, step_timeout_s=3600)
