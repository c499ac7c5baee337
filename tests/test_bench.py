"""The benchmark command runs its real paths at toy sizes (numbers are for tables, never asserted here)."""

import json

import torch

from mimictest import bench
from mimictest.precision import cpu_description


def test_bench_train_infer_envs_write_tables(tmp_path, capsys):
    out = tmp_path / "train.json"
    bench.main(["--device", "cpu", "--json", str(out), "train", "--config", "dp-lift-lowdim", "--batch", "8",
                "--precision", "both", "--steps", "2", "--warmup", "1", "--workers", "0"])
    rows = json.load(open(out))["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1 and r["peak_mem_mb"] > 0 for r in rows)
    assert "samples/s" in capsys.readouterr().out

    out = tmp_path / "infer.json"
    bench.main(["--device", "cpu", "--json", str(out), "infer", "--config", "dp-lift-lowdim", "--envs", "2", "--repeats", "1"])
    rows = json.load(open(out))["rows"]
    assert {(r["sampler"], r["batch"]) for r in rows} == {("ddpm", 1), ("ddpm", 2), ("ddim", 1), ("ddim", 2)}

    out = tmp_path / "envs.json"
    bench.main(["--device", "cpu", "--json", str(out), "envs", "--env", "lift-lowdim", "--workers", "1", "--steps", "10",
                "--min-seconds", "0"])
    rows = json.load(open(out))["rows"]
    assert [r["mode"] for r in rows] == ["simulator alone", "policy in the loop"]
    assert all(r["env_steps_per_s"] > 0 for r in rows)
    assert rows[1]["exec"] == 8, "Diffusion Policy executes 8 actions of each chunk"


def test_bench_train_profile_splits_the_step(tmp_path, capsys):
    """--profile: the phases add up to the step, the forward is split by module, and the GEMM rate is counted."""
    out = tmp_path / "profile.json"
    bench.main(["--device", "cpu", "--json", str(out), "train", "--config", "dp-lift-lowdim", "--batch", "8",
                "--precision", "fp32", "--steps", "2", "--warmup", "1", "--workers", "0", "--profile"])
    saved = json.load(open(out))
    assert saved["commit"] and saved["machine"].startswith(cpu_description())
    profile = saved["rows"][0]["profile"]
    assert set(profile["phases_ms"]) == set(bench.PHASES)
    assert abs(sum(profile["phases_ms"].values()) - profile["step_ms"]) < 0.01 * profile["step_ms"]
    assert {"obs_encoder", "noise_net"} <= set(profile["forward_modules_ms"])
    assert profile["gemm_ms"] > 0 and profile["gemm_gflops"] > 0
    printed = capsys.readouterr().out
    assert "module (forward only)" in printed and "GFLOP/s for a 1024^3 fp32 matmul" in printed


def test_profile_times_module_list_members_under_the_list_name():
    """A ModuleList has no forward: its members' time is counted under its name, once per member call."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    net = Net()
    handles = bench._module_ranges(net)
    with torch.profiler.profile() as prof:
        net(torch.zeros(1, 4))
    for handle in handles:
        handle.remove()
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("module: ")}
    assert counts == {"module: blocks": 3, "module: head": 1}


def test_speedups_compare_equal_precision_and_best_of_each():
    rows = [{"who": "mimictest", "config": "c", "precision": "fp32", "samples_per_s": 6.0},
            {"who": "mimictest", "config": "c", "precision": "bf16", "samples_per_s": 0.1},
            {"who": "lerobot-0.6.1", "config": "c", "precision": "fp32", "samples_per_s": 3.0},
            {"who": "lerobot-0.6.1+fused", "config": "c", "precision": "fp32", "samples_per_s": 4.0}]
    assert bench.speedups(rows) == [
        "c fp32: mimictest / lerobot-0.6.1 = 2.00x",
        "c fp32: mimictest / lerobot-0.6.1+fused = 1.50x",
        "c best of each: mimictest fp32 6.00 samples/s / lerobot-0.6.1 fp32 3.00 = 2.00x",
        "c best of each: mimictest fp32 6.00 samples/s / lerobot-0.6.1+fused fp32 4.00 = 1.50x"]


def test_bench_camera_configs_name_the_data_cameras(tmp_path):
    """Image configurations: synthetic items, the policy and the env all use the same camera names."""
    from mimictest.data.pusht import CAMERA

    assert bench.CONFIGS["dp-pusht-image-small"].cams == (CAMERA,)
    item = bench.SyntheticWindows(bench.CONFIGS["dp-lift-image"], length=1)[0]
    assert list(item["rgb"]) == ["agentview_image", "robot0_eye_in_hand_image"]
    assert all(images.shape == (2, 84, 84, 3) and images.dtype == "uint8" for images in item["rgb"].values())

    out = tmp_path / "train.json"
    bench.main(["--device", "cpu", "--json", str(out), "train", "--config", "dp-pusht-image-small", "--batch", "2",
                "--precision", "fp32", "--steps", "1", "--warmup", "0", "--workers", "0"])
    assert all(r["samples_per_s"] > 0 for r in json.load(open(out))["rows"])

    out = tmp_path / "infer.json"
    bench.main(["--device", "cpu", "--json", str(out), "infer", "--config", "act-aloha-small", "--envs", "2",
                "--precision", "fp32", "--repeats", "1"])
    assert {(r["sampler"], r["batch"]) for r in json.load(open(out))["rows"]} == {("single pass", 1), ("single pass", 2)}

    out = tmp_path / "envs.json"
    bench.main(["--device", "cpu", "--json", str(out), "envs", "--env", "pusht", "--workers", "1", "--steps", "10",
                "--min-seconds", "0"])
    rows = json.load(open(out))["rows"]
    assert [r["mode"] for r in rows] == ["simulator alone", "policy in the loop"] and all(r["env_steps_per_s"] > 0 for r in rows)


def test_bench_envs_metaworld(tmp_path):
    """The MT10 configuration's camera and policy in the loop of a real Meta-World env."""
    import pytest

    pytest.importorskip("metaworld", reason="Meta-World is in the [sim] extra: pip install -e '.[sim]'")
    assert bench.CONFIGS["dp-metaworld-image"].cams == ("corner",)
    out = tmp_path / "envs.json"
    bench.main(["--device", "cpu", "--json", str(out), "envs", "--env", "metaworld", "--workers", "1", "--steps", "9",
                "--min-seconds", "0"])
    rows = json.load(open(out))["rows"]
    assert [r["mode"] for r in rows] == ["simulator alone", "policy in the loop"] and all(r["env_steps_per_s"] > 0 for r in rows)
    assert rows[1]["exec"] == 8
