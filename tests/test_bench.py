"""The benchmark command runs its real paths at toy sizes (numbers are for tables, never asserted here)."""

import json

from mimictest import bench


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
