"""Hub-format policies: save_pretrained -> from_pretrained gives the same predictions, for every family."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

from mimictest.envs.pusht import PushTEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.hub import from_pretrained, save_pretrained
from mimictest.nets.act import ACT
from mimictest.nets.dit import DiT
from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.rt1 import RT1
from mimictest.nets.transformer import DiffusionTransformer
from mimictest.nets.unet1d import ConditionalUnet1D
from mimictest.policies.act import ACTPolicy
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.policies.regression import RegressionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor

A, CHUNK, T, LOW, IMAGE, CROP = 2, 4, 2, 5, 20, 16


def stats(env_dim: int = A, low_dim: int = LOW) -> dict:
    g = np.random.default_rng(0)
    lo_a, lo_l = g.uniform(-2, 0, env_dim), g.uniform(-2, 0, low_dim)
    return {"action": {"min": lo_a.tolist(), "max": (lo_a + 3).tolist(), "mean": (lo_a + 1).tolist(), "std": [0.5] * env_dim},
            "low_dim": {"min": lo_l.tolist(), "max": (lo_l + 1).tolist(), "mean": lo_l.tolist(), "std": [2.0] * low_dim}}


def unet(cams: list[str]):
    enc = ObsEncoder(cams, LOW, feature_dim=8, num_kp=4)
    net = ConditionalUnet1D(A, enc.out_dim, T, down_dims=(8, 16), diffusion_step_embed_dim=8)
    return DiffusionPolicy(enc, net, A, CHUNK, sampler="ddim", num_inference_steps=3, num_train_timesteps=10)


def transformer():
    enc = ObsEncoder([], LOW)
    net = DiffusionTransformer(A, CHUNK, T, enc.out_dim, n_layer=1, n_head=2, n_emb=16)
    return DiffusionPolicy(enc, net, A, CHUNK, sampler="ddpm", num_inference_steps=5, num_train_timesteps=5)


def dit():
    enc = ObsEncoder([], LOW)
    net = DiT(A, CHUNK, T, enc.out_dim, n_layer=1, n_head=2, n_emb=16)
    return DiffusionPolicy(enc, net, A, CHUNK, sampler="ddim", num_inference_steps=2, num_train_timesteps=10,
                           prediction_type="sample")


def act():
    net = ACT(A, CHUNK, LOW, cams=[], d_model=16, nhead=2, num_encoder_layers=1, dim_feedforward=32)
    return ACTPolicy(net, kl_weight=5.0)


def rt1(loss: str):
    net = RT1(A, CHUNK, T, ["cam"], low_dim_dim=LOW, efficientnet="efficientnet_b0", token_dim=8, num_tokens=2,
              d_model=16, nhead=2, num_layers=1, dim_feedforward=32, bins=16 if loss == "ce" else None)
    return RegressionPolicy(net, loss=loss, bins=16, decode="expectation")


FAMILIES = {
    "diffusion_unet_lowdim": (lambda: unet([]), []),
    "diffusion_unet_image": (lambda: unet(["cam"]), ["cam"]),
    "diffusion_transformer": (transformer, []),
    "diffusion_dit": (dit, []),
    "act": (act, []),  # ACT sees one observation step
    "rt1_continuous": (lambda: rt1("l1"), ["cam"]),
    "rt1_discrete": (lambda: rt1("ce"), ["cam"]),
}


def raw_batch(cams: list[str], horizon: int, batch_size: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"rgb": {cam: torch.randint(0, 256, (batch_size, horizon, IMAGE, IMAGE, 3), generator=g, dtype=torch.uint8)
                    for cam in cams},
            "low_dim": torch.randn(batch_size, horizon, LOW, generator=g)}


def predict(policy, preprocess, batch: dict) -> torch.Tensor:
    torch.manual_seed(123)
    return preprocess.unnormalize_action(policy.predict(preprocess(batch, train=False)))


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_predicts_the_same(family, tmp_path):
    torch.manual_seed(0)
    build, cams = FAMILIES[family]
    policy = build().eval()
    with torch.no_grad():  # weights away from their initialisation, so a re-initialised net could not match
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    preprocess = Preprocessor(stats(), ActionSpace(None, "absolute", env_dim=A), cams,
                              normalization="meanstd" if family == "act" else "minmax",
                              image_size=(IMAGE, IMAGE), crop_size=(CROP, CROP))
    batch = raw_batch(cams, 1 if family == "act" else T)
    before = predict(policy, preprocess, batch)

    folder = save_pretrained(policy, preprocess, str(tmp_path / "policy"), run={"script": "Script/X.py",
                                                                                "constants": {"CHUNK_SIZE": CHUNK}})
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(folder)
    assert type(loaded.policy) is type(policy) and not loaded.policy.training
    assert loaded.config["run"]["constants"] == {"CHUNK_SIZE": CHUNK}
    for (name, saved), (_, rebuilt) in zip(policy.state_dict().items(), loaded.policy.state_dict().items()):
        assert torch.equal(saved, rebuilt), name
    torch.testing.assert_close(predict(loaded.policy, loaded.preprocess, batch), before, rtol=0, atol=0)


def test_config_holds_arguments_action_space_and_statistics(tmp_path):
    policy = unet([])
    space = ActionSpace("axis_angle", "relative", env_dim=7)
    preprocess = Preprocessor(stats(env_dim=7), space, normalization="minmax")
    save_pretrained(policy, preprocess, str(tmp_path))
    with open(tmp_path / "config.json") as fh:
        config = json.load(fh)
    noise_net = config["policy"]["kwargs"]["noise_net"]
    assert noise_net["__class__"] == "mimictest.nets.unet1d:ConditionalUnet1D"
    assert noise_net["kwargs"]["down_dims"] == {"__tuple__": [8, 16]}
    kwargs = config["preprocess"]["kwargs"]
    assert kwargs["action_space"]["kwargs"] == {"rotation": "axis_angle", "mode": "relative", "env_dim": 7}
    assert kwargs["stats"]["action"]["min"] == stats(env_dim=7)["action"]["min"]
    assert from_pretrained(str(tmp_path)).preprocess.action_space == space


def test_refuses_a_folder_with_other_files_and_a_script_class(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"a user's checkpoint")
    preprocess = Preprocessor(stats(), ActionSpace(None, env_dim=A))
    with pytest.raises(FileExistsError, match="last.pt"):
        save_pretrained(act(), preprocess, str(tmp_path))
    with pytest.raises(TypeError, match="no recipe"):
        save_pretrained(DiffusionPolicy(ObsEncoder([], LOW), torch.nn.Linear(2, 2), A, CHUNK), preprocess,
                        str(tmp_path / "new"))
    with pytest.raises(FileNotFoundError, match="not a saved policy"):
        from_pretrained(str(tmp_path))


def test_instruction_embeddings_travel_without_the_encoder(tmp_path):
    class Words:  # a deterministic stand-in encoder is enough: only its embeddings are saved
        dim = 3

        def encode(self, texts):
            return torch.tensor([[len(t), t.count("a"), 1.0] for t in texts])

    preprocess = Preprocessor(stats(), ActionSpace(None, env_dim=A), text_encoder=Words(), instructions=["open a drawer", "push"])
    save_pretrained(act(), preprocess, str(tmp_path))
    loaded = from_pretrained(str(tmp_path)).preprocess
    assert torch.equal(loaded.embed(["push", "open a drawer"]), preprocess.embed(["push", "open a drawer"]))
    with pytest.raises(ValueError, match="not seen in training"):
        loaded.embed(["close the door"])


def test_evaluate_cli_runs_a_saved_pusht_policy(tmp_path):
    """``python -m mimictest.evaluate POLICY_DIR --episodes 2``: rebuilt env, 2 real PushT episodes."""
    torch.manual_seed(0)
    enc = ObsEncoder([], 20)
    policy = DiffusionPolicy(enc, ConditionalUnet1D(A, enc.out_dim, T, down_dims=(8, 16), diffusion_step_embed_dim=8),
                             A, CHUNK, sampler="ddim", num_inference_steps=2, num_train_timesteps=10)
    g = np.random.default_rng(0)
    low = g.uniform(0, 512, (100, 20))
    preprocess = Preprocessor({"action": {"min": [0.0, 0.0], "max": [512.0, 512.0]},
                               "low_dim": {"min": low.min(0).tolist(), "max": low.max(0).tolist()}},
                              ActionSpace(None, env_dim=A))
    make_env = partial(PushTEnv, obs_mode="keypoint", max_episode_steps=8)
    evaluator = Evaluator(tasks=[EvalTask("pusht", make_env, 50)], num_envs=1, obs_horizon=T, exec_start=T - 1,
                          exec_end=T + 1)
    folder = save_pretrained(policy, preprocess, str(tmp_path / "policy"), evaluator=evaluator)
    result = subprocess.run([sys.executable, "-m", "mimictest.evaluate", folder, "--episodes", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "all episodes" in result.stdout
    with open(os.path.join(folder, "eval", "episodes2.json")) as fh:
        episodes = json.load(fh)["episodes"]
    assert len(episodes) == 2 and all(e["length"] == 8 for e in episodes)
    assert [e["task"] for e in episodes] == ["pusht", "pusht"]
    ddpm = subprocess.run([sys.executable, "-m", "mimictest.evaluate", folder, "--episodes", "2", "--sampler", "ddpm"],
                          capture_output=True, text=True, timeout=300)  # the saved DDIM policy, sampled with DDPM
    assert ddpm.returncode == 0, ddpm.stderr[-2000:]
    with open(os.path.join(folder, "eval", "episodes2_ddpm10.json")) as fh:  # all 10 training steps
        assert len(json.load(fh)["episodes"]) == 2
    save_pretrained(policy, preprocess, folder, evaluator=evaluator)  # a relaunched run saves over its own policy
    missing = subprocess.run([sys.executable, "-m", "mimictest.evaluate", str(tmp_path / "none")], capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none'} is not a saved policy: no {tmp_path / 'none' / 'config.json'}; "
        "write one with mimictest.hub.save_pretrained"]


def word_tokenizer():
    """A real word-level fast tokenizer with BART's special tokens, built offline (as a FLORENCE_PATH folder's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<", ">", "Action"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("head", ["linear", "linear_tokenizer", "dit", "flow"])
def test_florence_round_trip_predicts_the_same(head, tmp_path):
    """A tiny Florence-2 from its config (the recipe), with and without a tokenizer (saved in tokenizer/)."""
    pytest.importorskip("transformers", reason='Florence-2 needs transformers>=5: pip install -e ".[florence]"')
    from mimictest.nets.florence import (FlorenceActionExpert, FlorenceBackbone, FlorenceLinear, FlorenceQueryEncoder,
                                         load_florence)
    from mimictest.policies.flow import FlowMatchingPolicy

    torch.manual_seed(0)
    florence, _, _ = load_florence(None, "tiny", dropout=0.0)
    tokenizer = word_tokenizer() if head == "linear_tokenizer" else None
    backbone = FlorenceBackbone(florence, ["cam"], low_dim_dim=LOW, tokenizer=tokenizer, freeze_vision_tower=False)
    if head.startswith("linear"):
        policy = RegressionPolicy(FlorenceLinear(backbone, A, CHUNK), loss="l1")
    elif head == "dit":
        queries = FlorenceQueryEncoder(backbone, num_queries=2)
        policy = DiffusionPolicy(queries, DiT(A, CHUNK, queries.num_tokens, queries.out_dim, n_layer=1, n_head=2, n_emb=16),
                                 A, CHUNK, sampler="ddim", num_inference_steps=2, num_train_timesteps=10)
    else:
        policy = FlowMatchingPolicy(FlorenceActionExpert(backbone, A, CHUNK), A, CHUNK, num_flow_steps=2)
    policy.eval()
    preprocess = Preprocessor(stats(), ActionSpace(None, env_dim=A), ["cam"], image_size=(IMAGE, IMAGE))
    batch = raw_batch(["cam"], T)
    before = predict(policy, preprocess, batch)
    loaded = from_pretrained(save_pretrained(policy, preprocess, str(tmp_path)))
    torch.testing.assert_close(predict(loaded.policy, loaded.preprocess, batch), before, rtol=0, atol=0)
    rebuilt = next(m for m in loaded.policy.modules() if isinstance(m, FlorenceBackbone))
    assert torch.equal(rebuilt.prompt_ids, backbone.prompt_ids) and rebuilt.pad_id == backbone.pad_id
    assert os.path.isdir(tmp_path / "tokenizer") == (tokenizer is not None)


def test_ema_copy_saves_its_own_weights(tmp_path):
    """``save_pretrained(ema.module, ...)``: the deep copy keeps its recipe, and its averaged weights are saved."""
    from mimictest.policies.ema import EMA

    torch.manual_seed(0)
    policy = act()
    ema = EMA(policy, power=1.0)
    for _ in range(3):  # the average lags behind the trained weights
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(1.0)
        ema.update(policy)
    preprocess = Preprocessor(stats(), ActionSpace(None, env_dim=A), normalization="meanstd")
    loaded = from_pretrained(save_pretrained(ema.module, preprocess, str(tmp_path)))
    saved, trained = loaded.policy.state_dict(), policy.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in ema.module.state_dict().items())
    assert not all(torch.equal(saved[k], v) for k, v in trained.items())
