"""End to end: expert demos -> training -> evaluation in parallel robosuite envs; kill and resume; DDP on CPU."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mimictest import checkpoint
from mimictest.demos.lift import generate_lift_demos

TINY = os.path.join(os.path.dirname(__file__), "tiny_lift.py")
ENV = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demos") / "lift.hdf5")
    stats = generate_lift_demos(path, episodes=3, seed=0)
    assert stats["successes"] >= 2
    return path


def run_tiny(demos, save_root, max_steps, *launcher, episodes=2, extra=(), timeout=600):
    cmd = [*launcher, TINY, demos, save_root, str(max_steps), str(episodes), *extra]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_train_and_evaluate(demos, tmp_path):
    log = run_tiny(demos, str(tmp_path), 10, sys.executable)
    summary = json.loads(log.split("SUMMARY ")[1].splitlines()[0])
    assert summary["episodes"] == 2 and 0.0 <= summary["success_rate"] <= 100.0
    run = tmp_path / "tiny"
    assert checkpoint.load(str(run / "last.pt"))["step"] == 10
    results = json.load(open(run / "eval_step10.json"))
    assert len(results["episodes"]) == 2 and all(e["length"] <= 15 for e in results["episodes"])
    # One explicit seed per episode, from Evaluator.seed on; one task, so one per-task entry.
    assert sorted(e["seed"] for e in results["episodes"]) == [100_000, 100_001]
    assert {e["task"] for e in results["episodes"]} == {"lift"} and list(results["summary"]["tasks"]) == ["lift"]
    lo, hi = results["summary"]["success_ci95"]
    assert 0.0 <= lo <= results["summary"]["success_rate"] <= hi <= 100.0
    assert list((run / "videos" / "step10").glob("*.mp4")), "a rollout video should be written"
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m] == [5, 10]
    assert all(m["samples_per_s"] > 0 and 0 <= m["data_wait_frac"] <= 1 for m in metrics if "loss" in m)

    # The same checkpoint again, evaluation only, with temporal ensembling: both results are kept.
    ckpt_mtime = os.path.getmtime(run / "last.pt")
    run_tiny(demos, str(tmp_path), 10, sys.executable, extra=["--eval-only-ensemble"])
    assert os.path.getmtime(run / "last.pt") == ckpt_mtime, "eval_only must not train or save"
    ensembled = json.load(open(run / "eval_step10_ensemble0.01.json"))
    assert ensembled["summary"]["execution"] == "ensemble0.01" and len(ensembled["episodes"]) == 2
    assert json.load(open(run / "eval_step10.json"))["summary"]["execution"] == "chunk[1:5]"


def test_eval_only_needs_a_checkpoint(demos, tmp_path):
    cmd = [sys.executable, TINY, demos, str(tmp_path), "10", "2", "--eval-only-ensemble"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "eval_only: no checkpoint" in out.stderr


def test_kill_and_resume(demos, tmp_path):
    ckpt = tmp_path / "tiny" / "last.pt"
    proc = subprocess.Popen([sys.executable, TINY, demos, str(tmp_path), "100000"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.exists() and checkpoint.load(str(ckpt))["step"] >= 15):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.load(str(ckpt))["step"]
    assert killed_at >= 15 and killed_at % 5 == 0
    before = checkpoint.load(str(ckpt))

    log = run_tiny(demos, str(tmp_path), killed_at + 5, sys.executable)
    assert f"resumed from {ckpt} at step {killed_at}/{killed_at + 5}" in log
    after = checkpoint.load(str(ckpt))
    assert after["step"] == killed_at + 5
    assert after["scheduler"]["last_epoch"] == killed_at + 5
    assert all(s["step"] == killed_at + 5 for s in after["optimizer"]["state"].values())
    moved = [not torch.equal(before["policy"][k], after["policy"][k]) for k in before["policy"] if k.endswith("weight")]
    assert any(moved), "training should continue from the checkpoint's weights"


def test_two_process_ddp_on_cpu(demos, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env_backup = dict(ENV)
    ENV["ACCELERATE_USE_CPU"] = "1"
    try:
        log = run_tiny(demos, str(tmp_path), 10, *launcher, episodes=4)
    finally:
        ENV.clear()
        ENV.update(env_backup)
    assert "2 process(es) on cpu | global batch 32" in log
    summary = json.loads(log.split("SUMMARY ")[1].splitlines()[0])
    assert summary["episodes"] == 4
    episodes = json.load(open(tmp_path / "tiny" / "eval_step10.json"))["episodes"]
    assert {e["rank"] for e in episodes} == {0, 1}, "both processes should evaluate their share of the episodes"
    # The processes split one list of starts: every seed runs exactly once, as it would in one process.
    assert sorted(e["seed"] for e in episodes) == [100_000, 100_001, 100_002, 100_003]


def tiny_setup(demos):
    from mimictest.data.robomimic import RobomimicDataset
    from mimictest.nets.obs_encoder import ObsEncoder
    from mimictest.nets.unet1d import ConditionalUnet1D
    from mimictest.policies.diffusion import DiffusionPolicy
    from mimictest.preprocess import ActionSpace, Preprocessor

    dataset = RobomimicDataset(demos, [], ["object", "robot0_eef_pos"], obs_horizon=2, chunk_size=8)
    preprocess = Preprocessor(dataset.stats, ActionSpace())
    net = ConditionalUnet1D(10, dataset.low_dim_dim, 2, down_dims=(16, 32), diffusion_step_embed_dim=16)
    return DiffusionPolicy(ObsEncoder([], dataset.low_dim_dim), net, 10, 8), preprocess, dataset


def test_max_minutes_stops_and_saves(demos, tmp_path):
    from mimictest.train import TrainConfig, train

    policy, preprocess, dataset = tiny_setup(demos)
    cfg = TrainConfig(run_name="timed", max_steps=10**6, max_minutes=1e-4, batch_size=8, num_workers=0, log_every=3,
                      save_every=0, save_root=str(tmp_path))
    train(policy, preprocess, dataset, cfg)
    assert checkpoint.load(str(tmp_path / "timed" / "last.pt"))["step"] == 3


def test_profiler_and_compile_paths(demos, tmp_path):
    """torch.compile of the loss and the profiler trace, in-process, without evaluation."""
    from mimictest.train import TrainConfig, train

    policy, preprocess, dataset = tiny_setup(demos)
    cfg = TrainConfig(run_name="compiled", max_steps=12, batch_size=8, warmup_steps=2, num_workers=0, log_every=6,
                      save_every=0, compile=True, profile=True, save_root=str(tmp_path))
    assert train(policy, preprocess, dataset, cfg) is None
    profile = tmp_path / "compiled" / "profile"
    assert list(profile.glob("trace_*.json")) and "Self CPU" in (profile / "top_ops.txt").read_text()
    assert checkpoint.load(str(tmp_path / "compiled" / "last.pt"))["step"] == 12
