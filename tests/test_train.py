"""End to end: expert demos -> training -> evaluation in parallel robosuite envs; exact resume after
kills; refused configuration changes; the NaN guard; DDP on CPU; the LR schedule and the sampler."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mimictest import checkpoint
from mimictest.data.sampler import StepSampler
from mimictest.demos.lift import generate_lift_demos

TINY = os.path.join(os.path.dirname(__file__), "tiny_lift.py")
ENV = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ALGORITHM = dict(lr=1e-4, weight_decay=1e-6, betas=(0.95, 0.999), warmup_steps=2, lr_schedule="cosine", grad_clip=0.0,
                 ema=True)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demos") / "lift.hdf5")
    stats = generate_lift_demos(path, episodes=3, seed=0)
    assert stats["successes"] >= 2
    return path


def run_tiny(demos, save_root, max_steps, *launcher, episodes=2, extra=(), timeout=600, check=True):
    cmd = [*launcher, TINY, demos, str(save_root), str(max_steps), str(episodes), *extra]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr if check else out


def losses(run_dir) -> dict[int, float]:
    """Step -> training loss, the last logged value of each step (a relaunch logs again what a kill lost)."""
    curve = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        m = json.loads(line)
        if "loss" in m:
            curve[m["step"]] = m["loss"]
    return curve


@pytest.fixture(scope="module")
def uninterrupted(demos, tmp_path_factory):
    """One 40-step run, evaluated at steps 20 and 40."""
    root = tmp_path_factory.mktemp("uninterrupted")
    log = run_tiny(demos, root, 40, sys.executable)
    return root / "tiny", log


def test_train_and_evaluate(demos, uninterrupted):
    run, log = uninterrupted
    summary = json.loads(log.split("SUMMARY ")[1].splitlines()[0])
    assert summary["episodes"] == 2
    assert checkpoint.load(str(run / "last.pt"))["step"] == 40
    results = json.load(open(run / "eval_step40.json"))
    assert len(results["episodes"]) == 2 and all(e["length"] <= 15 for e in results["episodes"])
    # One explicit seed per episode, from Evaluator.seed on; one task, so one per-task entry.
    assert sorted(e["seed"] for e in results["episodes"]) == [100_000, 100_001]
    assert {e["task"] for e in results["episodes"]} == {"lift"} and list(results["summary"]["tasks"]) == ["lift"]
    assert list((run / "videos" / "step40").glob("*.mp4")), "a rollout video should be written"
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 41))
    assert all(m["samples_per_s"] > 0 and 0 <= m["data_wait_frac"] <= 1 for m in metrics if "loss" in m)
    lrs = [m["lr"] for m in metrics if "lr" in m]
    assert max(lrs) == pytest.approx(1e-4) and lrs[-1] == pytest.approx(0.0, abs=1e-12), "warmup, then a cosine to 0"

    # The success protocol: every evaluation, and the last two pooled, with Wilson intervals.
    table = json.load(open(run / "summary.json"))
    assert [e["step"] for e in table["evaluations"]] == [20, 40]
    pooled = table["success_last_2"]
    assert pooled["steps"] == [20, 40] and pooled["episodes"] == 4
    wins = sum(json.load(open(run / f"eval_step{s}.json"))["summary"]["success_rate"] * 2 / 100 for s in (20, 40))
    assert pooled["success_rate"] == pytest.approx(100 * wins / 4)
    assert table["cpu"] and "success_ci95" in pooled
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["step20.pt", "step40.pt"]
    assert (run / "report.html").exists()

    # The hub-format policy folder, rebuilt without the script: the EMA weights of step 40.
    from mimictest.hub import from_pretrained

    policy, _, evaluator, saved = from_pretrained(str(run / "policy"))
    ema = checkpoint.load(str(run / "last.pt"))["ema"]["module"]
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in ema.items())
    assert saved["run"]["constants"]["MAX_STEPS"] == 40 and evaluator.tasks[0].name == "lift"

    # Every UPPERCASE constant of the script is recorded.
    config = json.load(open(run / "config.json"))
    assert config["script"] == "tiny_lift.py" and config["constants"]["MAX_STEPS"] == 40
    assert config["constants"]["KEYS"][0] == "object" and config["train"]["lr_schedule"] == "cosine"


def test_eval_only_and_eval_checkpoints(demos, uninterrupted, tmp_path):
    run, _ = uninterrupted
    ckpt_mtime = os.path.getmtime(run / "last.pt")
    before = json.load(open(run / "eval_step20.json"))
    # The same checkpoint again, evaluation only, with temporal ensembling: both results are kept.
    run_tiny(demos, run.parent, 40, sys.executable, extra=["--eval-only-ensemble"])
    ensembled = json.load(open(run / "eval_step40_ensemble0.01.json"))
    assert ensembled["summary"]["execution"] == "ensemble0.01" and len(ensembled["episodes"]) == 2
    assert json.load(open(run / "eval_step40.json"))["summary"]["execution"] == "chunk[1:5]"
    # The kept weights of every evaluated step, evaluated again: the same episodes, as evaluation has its own RNG.
    log = run_tiny(demos, run.parent, 40, sys.executable, extra=["--eval-checkpoints"])
    assert "evaluating" in log and "step20.pt" in log and "step40.pt" in log
    again = json.load(open(run / "eval_step20.json"))
    assert [(e["success"], e["length"], e["max_score"]) for e in again["episodes"]] == \
           [(e["success"], e["length"], e["max_score"]) for e in before["episodes"]]
    assert os.path.getmtime(run / "last.pt") == ckpt_mtime, "evaluation-only launches must not train or save"

    out = run_tiny(demos, tmp_path, 10, sys.executable, extra=["--eval-only-ensemble"], check=False)
    assert out.returncode != 0 and "eval_only: no checkpoint" in out.stderr


def test_killed_runs_resume_exactly(demos, uninterrupted, tmp_path):
    """SIGKILLed twice mid-run, relaunched each time: the same loss at every step as the uninterrupted run."""
    ckpt = tmp_path / "tiny" / "last.pt"
    # The second kill waits for the step-20 checkpoint, which is saved before the step-20 evaluation and
    # stays the newest for all of it: a wide window, where the 5 steps between later checkpoints took
    # under 2 s and a poller sharing one core with the run once missed them all.
    for kill_after in (10, 20):
        proc = subprocess.Popen([sys.executable, TINY, demos, str(tmp_path), "40", "2"], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not (ckpt.exists() and checkpoint.load(str(ckpt))["step"] >= kill_after):
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = checkpoint.load(str(ckpt))["step"]
    assert 20 <= killed_at < 40, f"the second kill should land before the end, at step {killed_at}"
    log = run_tiny(demos, tmp_path, 40, sys.executable)
    assert f"resumed from {ckpt} at step {killed_at}/40" in log

    run, _ = uninterrupted
    assert losses(tmp_path / "tiny") == losses(run), "a resumed run must log the same loss at every step"
    a, b = checkpoint.load(str(run / "last.pt")), checkpoint.load(str(ckpt))
    assert all(torch.equal(a["policy"][k], b["policy"][k]) for k in a["policy"])
    assert all(torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]) for k in a["ema"]["module"])
    assert b["data"] == {"seed": 0, "epoch": a["data"]["epoch"], "batch_in_epoch": a["data"]["batch_in_epoch"]}
    episodes = lambda r: [(e["success"], e["length"]) for e in json.load(open(r / "eval_step40.json"))["episodes"]]
    assert episodes(tmp_path / "tiny") == episodes(run)


def test_changed_settings_are_refused_on_resume(demos, uninterrupted, tmp_path):
    run, _ = uninterrupted
    out = run_tiny(demos, run.parent, 45, sys.executable, check=False)
    assert out.returncode != 0
    message = out.stderr.strip().splitlines()[-1]
    assert "was trained with other settings" in message and "MAX_STEPS: 40 -> 45" in message
    assert "max_steps: 40 -> 45" in message and "allow_config_change=True" in message
    assert checkpoint.load(str(run / "last.pt"))["step"] == 40, "a refused launch must not touch the checkpoint"

    # Another script pointed at the same run folder: refused, naming both scripts.
    other = tmp_path / "other_experiment.py"
    other.write_text(open(TINY).read())
    out = subprocess.run([sys.executable, str(other), demos, str(run.parent), "40", "2"], env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode != 0 and "script: 'tiny_lift.py' -> 'other_experiment.py'" in out.stderr.strip().splitlines()[-1]


def test_two_process_ddp_on_cpu(demos, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env_backup = dict(ENV)
    ENV["ACCELERATE_USE_CPU"] = "1"
    try:
        log = run_tiny(demos, tmp_path, 10, *launcher, episodes=4)
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
    rng = checkpoint.load(str(tmp_path / "tiny" / "last.pt"))["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"]), "each process's RNG state is saved"


def tiny_setup(demos):
    from mimictest.config import seed_everything
    from mimictest.data.robomimic import RobomimicDataset
    from mimictest.nets.obs_encoder import ObsEncoder
    from mimictest.nets.unet1d import ConditionalUnet1D
    from mimictest.policies.diffusion import DiffusionPolicy
    from mimictest.preprocess import ActionSpace, Preprocessor

    seed_everything(0)
    dataset = RobomimicDataset(demos, [], ["object", "robot0_eef_pos"], obs_horizon=2, chunk_size=8)
    preprocess = Preprocessor(dataset.stats, ActionSpace())
    net = ConditionalUnet1D(10, dataset.low_dim_dim, 2, down_dims=(16, 32), diffusion_step_embed_dim=16)
    return DiffusionPolicy(ObsEncoder([], dataset.low_dim_dim), net, 10, 8), preprocess, dataset


def test_max_minutes_stops_and_saves(demos, tmp_path, capsys):
    """Time stops the run at the first logged step; a cosine run says how far its LR had decayed."""
    from mimictest.train import TrainConfig, train

    policy, preprocess, dataset = tiny_setup(demos)
    cfg = TrainConfig(run_name="timed", max_steps=10**6, max_minutes=1e-4, batch_size=8, num_workers=0, log_every=3,
                      save_every=0, save_root=str(tmp_path), **ALGORITHM)
    train(policy, preprocess, dataset, cfg)
    assert checkpoint.load(str(tmp_path / "timed" / "last.pt"))["step"] == 3
    out = capsys.readouterr().out
    assert "the cosine LR had decayed only to 1.00 x lr" in out and "set MAX_STEPS to about 3" in out


def test_nonfinite_loss_stops_before_saving_or_is_skipped(demos, tmp_path):
    """An absurd learning rate makes the loss blow up; "stop" ends the run naming the step, "skip" counts it."""
    from mimictest.train import TrainConfig, train

    settings = {**ALGORITHM, "lr": 1e30, "warmup_steps": 0, "lr_schedule": "constant"}
    policy, preprocess, dataset = tiny_setup(demos)
    cfg = TrainConfig(run_name="nan", max_steps=8, batch_size=8, num_workers=0, log_every=1, save_every=1,
                      save_root=str(tmp_path), **settings)
    with pytest.raises(FloatingPointError, match=r"non-finite training at step (\d+) \(total_loss=") as err:
        train(policy, preprocess, dataset, cfg)
    bad_step = int(err.value.args[0].split("step ")[1].split()[0])
    assert 1 < bad_step <= 8
    saved = checkpoint.load(str(tmp_path / "nan" / "last.pt"))
    assert saved["step"] == bad_step - 1, "nothing is saved at or after the bad step"
    assert all(torch.isfinite(v).all() for v in saved["policy"].values() if v.is_floating_point())

    policy, preprocess, dataset = tiny_setup(demos)
    cfg = TrainConfig(run_name="skip", max_steps=8, batch_size=8, num_workers=0, log_every=1, save_every=8,
                      nonfinite="skip", save_root=str(tmp_path), **settings)
    train(policy, preprocess, dataset, cfg)
    metrics = [json.loads(line) for line in open(tmp_path / "skip" / "metrics.jsonl")]
    assert metrics[-1]["skipped_steps"] >= 8 - bad_step + 1
    state = checkpoint.load(str(tmp_path / "skip" / "last.pt"))
    assert state["skipped_steps"] == metrics[-1]["skipped_steps"]
    assert all(torch.isfinite(v).all() for v in state["policy"].values() if v.is_floating_point())


def test_profiler_and_compile_paths(demos, tmp_path):
    """torch.compile of the loss and the profiler trace, in-process, without evaluation."""
    from mimictest.train import TrainConfig, train

    policy, preprocess, dataset = tiny_setup(demos)
    cfg = TrainConfig(run_name="compiled", max_steps=12, batch_size=8, num_workers=0, log_every=6, save_every=0,
                      compile=True, profile=True, save_root=str(tmp_path), **ALGORITHM)
    assert train(policy, preprocess, dataset, cfg) is None
    profile = tmp_path / "compiled" / "profile"
    assert list(profile.glob("trace_*.json")) and "Self CPU" in (profile / "top_ops.txt").read_text()
    assert checkpoint.load(str(tmp_path / "compiled" / "last.pt"))["step"] == 12


def test_lr_schedules():
    from mimictest.train import TrainConfig, lr_factor

    cfg = TrainConfig(run_name="x", max_steps=110, batch_size=1, **{**ALGORITHM, "warmup_steps": 10})
    assert [lr_factor(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [lr_factor(s, cfg) for s in (10, 60, 110)] == pytest.approx([1.0, 0.5, 0.0])
    const = TrainConfig(run_name="x", max_steps=110, batch_size=1, **{**ALGORITHM, "lr_schedule": "constant"})
    assert lr_factor(109, const) == 1.0
    with pytest.raises(ValueError, match="lr_schedule must be"):
        TrainConfig(run_name="x", max_steps=1, batch_size=1, **{**ALGORITHM, "lr_schedule": "linear"})


def test_step_sampler_resumes_mid_epoch_and_splits_ranks():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(StepSampler(103, 10, seed=3), 25)  # 10 batches per epoch, the last 3 samples dropped
    assert take(StepSampler(103, 10, seed=3, start_step=13), 12) == full[13:]
    epoch = np.concatenate(full[:10])
    assert len(set(epoch.tolist())) == 100, "no sample twice within an epoch"
    assert full[:10] != full[10:20], "each epoch is shuffled anew"
    ranks = [np.concatenate(take(StepSampler(103, 10, seed=3, rank=r, world=2), 5)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]), "processes see disjoint samples in an epoch"
    with pytest.raises(ValueError, match="lower BATCH_SIZE"):
        StepSampler(9, 10, seed=0)
