"""Checkpoints on real files: exact resumption, the previous checkpoint, corrupt files and SIGKILLs mid-save."""

import dataclasses
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from mimictest import checkpoint
from mimictest.policies.ema import EMA


@dataclasses.dataclass
class _Config:
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.99)
    name: str = "tiny"
    max_minutes: float | None = None


def _setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, EMA]:
    """train.py's optimisation objects on a tiny network."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    cfg = _Config()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    return model, optimizer, scheduler, EMA(model)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
           ema: EMA, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(16, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
           ema: EMA, step: int) -> dict:
    return {"policy": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "rng": checkpoint.rng_state(),
            "config": dataclasses.asdict(_Config())}


def _draws() -> tuple:
    return torch.rand(3), np.random.rand(3), random.random()


def _save_steps(path: str, *steps: int) -> None:
    for step in steps:
        checkpoint.save_atomic({"step": step, "weights": torch.full((1000,), float(step))}, path)


def test_resume_continues_exactly(tmp_path, single_thread) -> None:
    """Weights, fused AdamW, LambdaLR, EMA and RNG states round-trip weights-only: training continues bit for bit."""
    path = str(tmp_path / "last.pt")
    objects = _setup()
    _train(*objects, steps=3)
    checkpoint.save_atomic(_state(*objects, step=3), path)
    expected_draws = _draws()
    _train(*objects, steps=2)

    state = checkpoint.load_resumable(path)
    assert state["step"] == 3 and state["config"] == dataclasses.asdict(_Config())
    resumed = _setup()
    model, optimizer, scheduler, ema = resumed
    model.load_state_dict(state["policy"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ema.load_state_dict(state["ema"])
    checkpoint.set_rng_state(state["rng"])
    draws = _draws()
    assert torch.equal(draws[0], expected_draws[0])
    assert np.array_equal(draws[1], expected_draws[1]) and draws[2] == expected_draws[2]
    _train(*resumed, steps=2)
    assert scheduler.get_last_lr() == objects[2].get_last_lr()
    for name, value in objects[0].state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    for name, value in objects[3].module.state_dict().items():
        assert torch.equal(ema.module.state_dict()[name], value), name


def test_previous_checkpoint_is_kept(tmp_path) -> None:
    path = str(tmp_path / "last.pt")
    assert checkpoint.load_resumable(path) is None
    _save_steps(path, 1)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    _save_steps(path, 2, 3)
    assert sorted(os.listdir(tmp_path)) == ["last.prev.pt", "last.pt"]
    assert checkpoint.load(path)["step"] == 3
    assert checkpoint.load(str(tmp_path / "last.prev.pt"))["step"] == 2


def _truncate(path: str) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


def _empty(path: str) -> None:
    open(path, "wb").close()


def _flip_a_byte(path: str) -> None:
    """A bit error in the tensor data: torch.load alone would return the wrong numbers."""
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _foreign(path: str) -> None:
    """A torch.save file with an object weights-only loading refuses (numpy's own RNG state)."""
    torch.save({"step": 7, "rng": np.random.get_state()}, path)


@pytest.mark.parametrize("damage, error", [(_truncate, "BadZipFile"), (_empty, "BadZipFile"),
                                           (_flip_a_byte, "BadZipFile: CRC-32 mismatch"), (_foreign, "UnpicklingError")],
                         ids=["truncated", "empty", "flipped-byte", "foreign"])
def test_bad_last_falls_back_to_previous(tmp_path, capsys, damage, error) -> None:
    path = str(tmp_path / "last.pt")
    _save_steps(path, 1, 2)
    damage(path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    state = checkpoint.load_resumable(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.full((1000,), 1.0))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and path in lines[0] and error in lines[0] and "last.prev.pt" in lines[0], lines
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before  # nothing touched
    with pytest.raises(RuntimeError, match=f"cannot load checkpoint .*last.pt.*{error}"):
        checkpoint.load(path)


@pytest.mark.parametrize("damage", [_truncate, _empty], ids=["truncated", "empty"])
def test_save_over_a_cut_short_last_keeps_the_good_previous(tmp_path, damage) -> None:
    path = str(tmp_path / "last.pt")
    _save_steps(path, 1, 2)
    damage(path)
    _save_steps(path, 3)
    assert checkpoint.load(path)["step"] == 3
    assert checkpoint.load(str(tmp_path / "last.prev.pt"))["step"] == 1


def test_missing_last_falls_back_to_previous(tmp_path, capsys) -> None:
    path = str(tmp_path / "last.pt")
    _save_steps(path, 1, 2)
    os.remove(path)
    assert checkpoint.load_resumable(path)["step"] == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and "last.prev.pt" in lines[0], lines
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load(path)


def test_both_bad_raises(tmp_path) -> None:
    path = str(tmp_path / "last.pt")
    _save_steps(path, 1, 2)
    _truncate(path)
    _empty(str(tmp_path / "last.prev.pt"))
    with pytest.raises(RuntimeError, match=r"'.*last\.pt' is unreadable \(BadZipFile.*'.*last\.prev\.pt' is "
                                           r"unreadable \(BadZipFile.*delete") as info:
        checkpoint.load_resumable(path)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["last.prev.pt", "last.pt"]


def test_stale_temporaries_are_removed(tmp_path) -> None:
    """Files a killed save left behind go at the next save; other checkpoints' temporaries stay."""
    path = str(tmp_path / "last.pt")
    for name in (".last.pt.tmp123", ".last.pt.tmp456.link", ".other.pt.tmp789"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    _save_steps(path, 1)
    assert sorted(os.listdir(tmp_path)) == [".other.pt.tmp789", "last.pt"]


# Imports torch once, then forks savers: one python start per kill would take 2.5 s each.
# Each saver resumes from the checkpoint and saves steps 1, 2, ... with step-dependent tensors
# (20 MB) until it is sent SIGKILL after the delay read from stdin; prints the killing signal.
_SAVER = r"""
import os, signal, sys, time
import torch
from mimictest import checkpoint

path, numel = sys.argv[1], int(sys.argv[2])
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            state = checkpoint.load_resumable(path)
            step = 0 if state is None else state["step"]
            while True:
                step += 1
                weights = torch.arange(numel, dtype=torch.int32) + step
                checkpoint.save_atomic({"step": step, "weights": weights, "ema": weights[:1000] * 2}, path)
        finally:
            os._exit(1)
    time.sleep(float(line))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status), flush=True)
"""


def test_sigkill_mid_save_leaves_a_complete_checkpoint(tmp_path, capsys) -> None:
    path, numel, kills = str(tmp_path / "last.pt"), 5_000_000, 20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with open(tmp_path / "saver.err", "w") as err:
        saver = subprocess.Popen([sys.executable, "-c", _SAVER, path, str(numel)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        delays, steps = random.Random(0), []
        try:
            for _ in range(kills):
                saver.stdin.write(f"{delays.uniform(0.0, 0.5)}\n")
                saver.stdin.flush()
                assert saver.stdout.readline().strip() == str(int(signal.SIGKILL))
                state = checkpoint.load_resumable(path)
                if state is None:
                    assert not steps, "the checkpoint vanished after a completed save"
                    continue
                assert torch.equal(state["weights"], torch.arange(numel, dtype=torch.int32) + state["step"])
                assert torch.equal(state["ema"], state["weights"][:1000] * 2)
                assert not steps or state["step"] >= steps[-1]
                steps.append(state["step"])
        finally:
            saver.stdin.close()
            saver.wait(timeout=30)
    assert (tmp_path / "saver.err").read_text() == ""
    assert capsys.readouterr().err == ""  # last.pt itself was always complete: never a fallback
    assert steps and steps[-1] >= 2, f"too few saves completed between the kills to test anything: {steps}"
