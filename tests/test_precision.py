"""BF16 = "auto": the measured decision, cached per CPU kind."""

import json

import pytest
import torch

from mimictest.precision import cpu_model, resolve_bf16


def test_forced_settings_are_kept():
    assert resolve_bf16(True, torch.device("cpu"))[0] is True
    assert resolve_bf16(False, torch.device("cpu"))[0] is False
    with pytest.raises(ValueError, match="BF16 must be"):
        resolve_bf16("fast", torch.device("cpu"))


def test_auto_measures_once_and_follows_the_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMICTEST_CACHE", str(tmp_path))
    use, why = resolve_bf16("auto", torch.device("cpu"))
    cache = json.load(open(tmp_path / "precision.json"))
    (entry,) = cache.values()
    assert entry["cpu"] == cpu_model()[0] and entry["fp32_gflops"] > 0 and entry["bf16_gflops"] > 0
    assert use == (entry["bf16_gflops"] > entry["fp32_gflops"]) and "GFLOP/s" in why
    # The cached measurement decides from now on: flip it and the decision flips.
    entry["fp32_gflops"], entry["bf16_gflops"] = entry["bf16_gflops"], entry["fp32_gflops"]
    json.dump(cache, open(tmp_path / "precision.json", "w"))
    if entry["fp32_gflops"] != entry["bf16_gflops"]:
        assert resolve_bf16("auto", torch.device("cpu"))[0] is (not use)
