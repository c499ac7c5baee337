"""The kill test: SIGKILL a small CPU training run at random moments, relaunch it, and compare.

    taskset -c 1 python tests/kill_resume.py [--kills 20] [--steps 400] [--out docs/results/kill_resume.json]

Runs ``tests/tiny_lift.py`` (a real Diffusion Policy training on scripted Lift demos, a
checkpoint every 5 steps, no evaluation) once uninterrupted, then again under ``--kills``
SIGKILLs. Half the kills land at a random moment; the other half wait until a checkpoint is being
written (its temporary file exists) and kill then. After every kill it checks that ``last.pt``
loads (weights-only, CRC-checked) and has not gone back in steps, then relaunches the run, which
must say it resumed. At the end the killed run's loss at every step must equal the uninterrupted
run's. Prints a table and writes the figures as JSON. On a shared machine, pin it to one core
(``taskset``): two training threads contending with other jobs for two cores run 15x slower.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

from mimictest import checkpoint
from mimictest.demos.lift import generate_lift_demos
from mimictest.precision import cpu_model

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_lift.py")
ENV = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def losses(run_dir: str) -> dict[int, float]:
    """Step -> loss, the last value logged for each step."""
    curve = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            m = json.loads(line)
            if "loss" in m:
                curve[m["step"]] = m["loss"]
    return curve


def _training_seconds(run_dir: str) -> float:
    """Seconds from the first to the last logged step of a run (its training, without start-up)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    per_step = [1.0 / r["samples_per_s"] * 16 for r in rows if "samples_per_s" in r]  # batch 16, one step per row
    return sum(per_step)


def launch(demos: str, root: str, steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TINY, demos, root, str(steps), "0"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_once(proc: subprocess.Popen, run_dir: str, during_save: bool, delay: float) -> tuple[str, str]:
    """SIGKILL ``proc`` ``delay`` seconds after its training started, or at its next checkpoint write;
    returns the moment and what the process printed."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    start = time.time()
    while not any("M parameters" in line for line in lines) and proc.poll() is None and time.time() - start < 300:
        time.sleep(0.01)  # imports, the dataset and the resume come first
    start, moment = time.time(), "random"
    while proc.poll() is None and time.time() - start < 120:
        if during_save and glob.glob(os.path.join(run_dir, ".last.pt.tmp*")):
            moment = "during a checkpoint write"
            break
        if not during_save and time.time() - start >= delay:
            break
        time.sleep(0.0005 if during_save else 0.01)
    proc.kill()
    proc.wait()
    reader.join(timeout=10)
    return moment, "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        demos = os.path.join(tmp, "lift.hdf5")
        generate_lift_demos(demos, episodes=3, seed=0)
        reference_root, killed_root = os.path.join(tmp, "reference"), os.path.join(tmp, "killed")
        start = time.time()
        out = subprocess.run([sys.executable, TINY, demos, reference_root, str(args.steps), "0"], env=ENV,
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"the uninterrupted run failed:\n{out.stderr[-2000:]}")
        run_seconds = time.time() - start
        train_seconds = _training_seconds(os.path.join(reference_root, "tiny"))
        run_dir = os.path.join(killed_root, "tiny")
        rows, corrupt, went_back, not_resumed, last_step = [], 0, 0, 0, 0
        for k in range(args.kills):
            proc = launch(demos, killed_root, args.steps)
            moment, log = kill_once(proc, run_dir, during_save=k % 2 == 1, delay=rng.uniform(0.02, 0.08) * train_seconds)
            if k > 0 and "resumed from" not in log:
                not_resumed += 1
            try:
                step = checkpoint.load(os.path.join(run_dir, "last.pt"))["step"]
            except (FileNotFoundError, RuntimeError):
                corrupt, step = corrupt + 1, None
            if step is not None and step < last_step:
                went_back += 1
            last_step = step if step is not None else last_step
            rows.append({"kill": k + 1, "moment": moment, "checkpoint_step": step})
            print(f"kill {k + 1:2d}/{args.kills} ({moment}): last.pt at step {step}", flush=True)
            if step is not None and step >= args.steps:
                break
        final = subprocess.run([sys.executable, TINY, demos, killed_root, str(args.steps), "0"], env=ENV,
                               capture_output=True, text=True)
        if final.returncode != 0:
            sys.exit(f"the last relaunch failed:\n{final.stderr[-2000:]}")
        reference, killed = losses(os.path.join(reference_root, "tiny")), losses(run_dir)
        differing = [s for s in reference if killed.get(s) != reference[s]]
        name, flags = cpu_model()
        result = {"kills": len(rows), "during_checkpoint_writes": sum(r["moment"] != "random" for r in rows),
                  "corrupt_or_unreadable_checkpoints": corrupt, "checkpoints_that_went_back": went_back,
                  "relaunches_that_did_not_resume": not_resumed, "steps": args.steps,
                  "steps_with_a_different_loss": len(differing), "identical_curve": not differing and len(killed) == len(reference),
                  "uninterrupted_seconds": run_seconds, "cpu": name, "cpu_flags": flags, "rows": rows,
                  "command": "python tests/kill_resume.py " + " ".join(sys.argv[1:])}
    print(f"{result['kills']} kills ({result['during_checkpoint_writes']} during checkpoint writes): "
          f"{corrupt} corrupt checkpoints, {went_back} went back, {not_resumed} relaunches without resuming; "
          f"{len(differing)} of {args.steps} steps with a different loss than the uninterrupted run")
    if args.out:
        from mimictest.atomic import write_json

        write_json(args.out, result)
    if corrupt or went_back or not_resumed or differing:
        sys.exit(1)


if __name__ == "__main__":
    main()
