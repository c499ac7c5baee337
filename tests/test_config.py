"""Script settings: command-line overrides, the constants saved with a run, and what counts as a change."""

import os
import subprocess
import sys

import pytest

from mimictest import checkpoint
from mimictest.config import apply_overrides, changed_values, script_constants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}


def settings():
    return {"MAX_STEPS": 4000, "LR": 1e-4, "DOWN_DIMS": (64, 128), "BF16": "auto", "TASK": "lift", "EVAL_EVERY": 0,
            "DATASET_PATH": "Datasets/lift.hdf5", "TEMPORAL_ENSEMBLE": 0.01, "RUN_NAME": "Lift", "lowercase": 1}


def test_overrides_are_parsed_typed_and_name_the_run():
    ns = settings()
    done = apply_overrides(ns, ["--MAX_STEPS=20", "--LR=1", "--DOWN_DIMS=(8,16)", "--BF16=False", "--TASK=square",
                                "--EVAL_EVERY=5", "--DATASET_PATH=/data/x/square.hdf5", "--TEMPORAL_ENSEMBLE=None"])
    assert done == {"MAX_STEPS": 20, "LR": 1.0, "DOWN_DIMS": (8, 16), "BF16": False, "TASK": "square", "EVAL_EVERY": 5,
                    "DATASET_PATH": "/data/x/square.hdf5", "TEMPORAL_ENSEMBLE": None}
    assert ns["MAX_STEPS"] == 20 and isinstance(ns["LR"], float) and ns["DOWN_DIMS"] == (8, 16)
    # Training changes name the run; evaluation settings (EVAL_EVERY, TEMPORAL_ENSEMBLE) do not.
    assert ns["RUN_NAME"] == "Lift_MAX_STEPS=20_LR=1.0_DOWN_DIMS=8-16_BF16=False_TASK=square_DATASET_PATH=square.hdf5"
    ns = settings()
    apply_overrides(ns, ["--EVAL_EVERY=100", "--RUN_NAME=mine"])
    assert ns["RUN_NAME"] == "mine"
    assert apply_overrides(settings(), []) == {}


@pytest.mark.parametrize("arg, message", [
    ("--MAX_STEP=3", "unknown setting 'MAX_STEP' (did you mean MAX_STEPS?); the script's settings are: BF16, "),
    ("--lowercase=2", "unknown setting 'lowercase'"),
    ("MAX_STEPS=3", "overrides look like --NAME=value"),
    ("--MAX_STEPS=2.5", "MAX_STEPS is an int (4000), not a float"),
    ("--MAX_STEPS=True", "MAX_STEPS is an int (4000), not a bool"),
    ("--LR=fast", "LR is a float (0.0001), not a string"),
    ("--DOWN_DIMS=64", "DOWN_DIMS is a tuple ((64, 128)), not an int"),
])
def test_bad_overrides_say_what_is_expected(arg, message):
    ns = settings()
    with pytest.raises(SystemExit, match=None) as err:
        apply_overrides(ns, [arg])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert ns == settings(), "a refused override changes nothing"


def test_constants_and_changes():
    class Script:
        MAX_STEPS, DOWN_DIMS, RUN_NAME, NET, _PRIVATE, lower = 10, (1, 2), "x", object(), 1, 2

    assert script_constants(Script) == {"DOWN_DIMS": [1, 2], "MAX_STEPS": 10, "RUN_NAME": "x"}
    old = {"MAX_STEPS": 10, "LR": 1e-4, "EVAL_EVERY": 5, "NUM_ENVS": 4}
    new = {"MAX_STEPS": 20, "LR": 1e-4, "EVAL_EVERY": 0, "NUM_ENVS": 8, "GRAD_CLIP": 1.0}
    assert changed_values(old, new) == ["GRAD_CLIP: '<unset>' -> 1.0", "MAX_STEPS: 10 -> 20"]


def test_a_real_script_runs_with_overrides(tmp_path):
    """The quickstart script itself, shrunk from the command line to 2 steps and one short episode."""
    script = os.path.join(ROOT, "Script", "DiffusionUNetLowdimLift.py")
    args = ["--DATASET_PATH=" + str(tmp_path / "lift.hdf5"), "--NUM_DEMOS=2", "--MAX_STEPS=2", "--BATCH_SIZE=16",
            "--WARMUP_STEPS=1", "--DOWN_DIMS=(16,32)", "--NUM_INFERENCE_STEPS=2", "--NUM_EVAL_EPISODES=1", "--NUM_ENVS=1",
            "--MAX_EPISODE_STEPS=5"]
    out = subprocess.run([sys.executable, script, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = ("DiffusionUNetLowdimLift_DATASET_PATH=lift.hdf5_NUM_DEMOS=2_MAX_STEPS=2_BATCH_SIZE=16_WARMUP_STEPS=1_"
           "DOWN_DIMS=16-32_NUM_INFERENCE_STEPS=2")
    state = checkpoint.load(str(tmp_path / "Save" / run / "last.pt"))
    assert state["step"] == 2 and state["run"]["constants"]["DOWN_DIMS"] == [16, 32]
    assert state["run"]["constants"]["NUM_EVAL_EPISODES"] == 1

    bad = subprocess.run([sys.executable, script, "--MAX_STEP=2"], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("unknown setting 'MAX_STEP' (did you mean MAX_STEPS")
