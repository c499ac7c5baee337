"""Florence-2 policies: FLORENCE_PATH loading, the linear / DiT / flow heads, prefix caching, frozen tower, Evaluator."""

from functools import partial

import numpy as np
import pytest
import torch
from torch import Tensor

pytest.importorskip("transformers", reason='Florence-2 needs transformers>=5: pip install -e ".[florence]"')

from mimictest.evaluate import EvalTask, Evaluator, Predictor  # noqa: E402
from mimictest.nets.dit import DiT  # noqa: E402
from mimictest.nets.florence import (  # noqa: E402
    FlorenceActionExpert, FlorenceBackbone, FlorenceLinear, FlorenceQueryEncoder, FlorenceTokenizer, florence_config,
    load_florence,
)
from mimictest.policies.diffusion import DiffusionPolicy  # noqa: E402
from mimictest.policies.flow import FlowMatchingPolicy  # noqa: E402
from mimictest.policies.regression import RegressionPolicy  # noqa: E402
from mimictest.preprocess import ActionSpace, Preprocessor  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

CAMS, T_OBS, LOW_DIM, CHUNK, ACT, SIZE = ("image",), 2, 2, 8, 2, 32
INSTRUCTIONS = ["push the block", "push the block onto the target"]


def word_tokenizer(words: list[str]):
    """A real (word-level) fast tokenizer with BART's special tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<", ">", "Action"] + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory) -> str:
    """A tiny random Florence-2 and its tokenizer, saved with save_pretrained (the FLORENCE_PATH layout)."""
    from transformers import Florence2ForConditionalGeneration

    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("florence"))
    Florence2ForConditionalGeneration(florence_config("tiny", dropout=0.0)).save_pretrained(folder)
    word_tokenizer(" ".join(INSTRUCTIONS).split()).save_pretrained(folder)
    return folder


def backbone(path: str | None = None, **kwargs) -> FlorenceBackbone:
    model, tokenizer, _ = load_florence(path, "tiny", dropout=0.0)
    return FlorenceBackbone(model, CAMS, low_dim_dim=LOW_DIM, tokenizer=tokenizer, **kwargs)


def toy_batch(batch_size: int = 8) -> dict[str, Tensor]:
    """Two observation modes (bright / dark images, states +-0.5), each with its own target chunk."""
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.arange(batch_size) % 2 == 0, 1.0, -1.0)  # (B,)
    rgb = (sign[:, None, None, None, None] * 0.5 + 0.2 * torch.rand(batch_size, T_OBS, 3, SIZE, SIZE, generator=g)).clamp(-1, 1)
    ramp = torch.linspace(-0.8, 0.8, CHUNK)[None, :, None]  # (1, chunk, 1)
    return {"rgb": {"image": rgb}, "low_dim": sign[:, None, None].expand(batch_size, T_OBS, LOW_DIM) * 0.5,
            "action": (ramp * sign[:, None, None]).expand(batch_size, CHUNK, ACT).clone(),
            "is_pad": torch.zeros(batch_size, CHUNK, dtype=torch.bool)}


def make_policy(head: str, net: FlorenceBackbone):
    if head == "linear":
        return RegressionPolicy(FlorenceLinear(net, ACT, CHUNK), loss="l1")
    if head == "dit":
        queries = FlorenceQueryEncoder(net, num_queries=4)
        dit = DiT(ACT, CHUNK, queries.num_tokens, queries.out_dim, n_layer=2, n_head=2, n_emb=32, p_drop_attn=0.0,
                  p_drop_resid=0.0, p_drop_mlp=0.0)
        return DiffusionPolicy(queries, dit, ACT, CHUNK, sampler="ddim", num_inference_steps=10, num_train_timesteps=10)
    return FlowMatchingPolicy(FlorenceActionExpert(net, ACT, CHUNK), ACT, CHUNK, num_flow_steps=10)


def seeded_loss(policy, batch: dict, seed: int = 123) -> float:
    """The loss with fixed noise and times, so two weights are compared on the same draw."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return policy.compute_loss(batch)["total_loss"].item()


def test_florence_path_round_trip(florence_dir: str) -> None:
    """save_pretrained -> load_florence(FLORENCE_PATH): the same weights, its tokenizer, the task prompt."""
    from transformers import Florence2ForConditionalGeneration

    saved = Florence2ForConditionalGeneration.from_pretrained(florence_dir)
    model, tokenizer, message = load_florence(florence_dir)
    assert "loaded" in message and tokenizer is not None
    for (name, a), b in zip(saved.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    net = FlorenceBackbone(model, CAMS, low_dim_dim=LOW_DIM, tokenizer=tokenizer)
    assert net.prompt_ids.tolist() == tokenizer("<Action>")["input_ids"] and len(net.prompt_ids) == 5
    hidden, mask = net(toy_batch(2))
    # 32x32 images: 1 x 1 DaViT cells + 1 temporal token per image, 2 steps; 5 prompt tokens; 2 state tokens.
    assert hidden.shape == (2, 2 * 2 + 5 + 2, 32) and mask is None


def test_from_scratch_says_so() -> None:
    model, tokenizer, message = load_florence(None, "tiny")
    assert tokenizer is None and "from scratch" in message and "'tiny'" in message
    with pytest.raises(ValueError, match="unknown Florence-2 config 'huge'"):
        load_florence(None, "huge")


def test_bad_florence_path_says_which_layout(tmp_path, florence_dir: str) -> None:
    import json
    import shutil

    remote = tmp_path / "remote"  # microsoft/Florence-2-base's remote-code config
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"AutoConfig": "x.y"},
                                                    "text_config": {"model_type": "florence2_language"}}))
    no_tokenizer = tmp_path / "weights_only"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{florence_dir}/{name}", no_tokenizer / name)
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty", remote, no_tokenizer):
        with pytest.raises((FileNotFoundError, ValueError)) as err:
            load_florence(str(path))
        text = str(err.value)
        assert "\n" not in text and "native Florence-2 layout" in text and "florence-community/Florence-2-base" in text
    with pytest.raises(ValueError, match="remote-code layout"):
        load_florence(str(remote))


@pytest.mark.parametrize("head", ["linear", "dit", "flow"])
def test_head_learns_a_fixed_batch(head: str) -> None:
    """On a fixed small batch the loss (same noise and times before and after) falls by 10x."""
    torch.manual_seed(0)
    policy = make_policy(head, backbone(freeze_vision_tower=False))
    batch = toy_batch()
    before = seeded_loss(policy, batch)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    for _ in range({"linear": 80, "dit": 150, "flow": 200}[head]):  # 30x, 20x and 20x lower here
        loss = policy.compute_loss(batch)["total_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = seeded_loss(policy, batch)
    assert after < before / 10, (before, after)


def test_frozen_tower_gets_no_gradient_and_stays_bit_identical() -> None:
    torch.manual_seed(0)
    policy = make_policy("flow", backbone(freeze_vision_tower=True))
    net = policy.net.backbone
    tower = {k: v.clone() for k, v in net.vision_tower.state_dict().items()}
    projector = {k: v.clone() for k, v in net.projector.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.1, fused=True)  # as train.py: every parameter
    policy.train()
    assert not net.vision_tower.training  # eval mode while frozen: no drop-path
    for _ in range(3):
        policy.compute_loss(toy_batch(4))["total_loss"].backward()
        assert all(p.grad is None for p in net.vision_tower.parameters())
        # every trainable weight is used: DDP without find_unused_parameters needs it (word embeddings are frozen)
        assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.equal(v, tower[k]) for k, v in net.vision_tower.state_dict().items())
    assert not all(torch.equal(v, projector[k]) for k, v in net.projector.state_dict().items())  # the projector trains


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_flow_prefix_cache_matches_recomputing() -> None:
    """One encoder pass per chunk, and the same chunk as re-encoding at each of the 10 Euler steps."""
    torch.manual_seed(0)
    policy = make_policy("flow", backbone()).eval()
    obs = {k: v for k, v in toy_batch(3).items() if k != "action"}
    calls = count_calls(policy.net.backbone.encoder)
    torch.manual_seed(7)
    cached = policy.predict(obs)
    assert calls[0] == 1
    policy.cache_prefix = False
    torch.manual_seed(7)
    recomputed = policy.predict(obs)
    assert calls[0] == 1 + 10
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=1e-5)
    assert cached.shape == (3, CHUNK, ACT) and not torch.equal(cached, policy.predict(obs))  # fresh noise per call


def test_dit_prefix_cache_matches_recomputing() -> None:
    """DiffusionPolicy encodes once per chunk; the DDIM chunk equals re-encoding at every denoising step."""
    torch.manual_seed(0)
    policy = make_policy("dit", backbone()).eval()
    obs = {k: v for k, v in toy_batch(3).items() if k != "action"}
    calls = count_calls(policy.obs_encoder.backbone.encoder)
    torch.manual_seed(7)
    cached = policy.predict(obs)
    assert calls[0] == 1
    torch.manual_seed(7)
    with torch.no_grad():
        sample = torch.randn(3, CHUNK, ACT)
        for t in policy.sample_scheduler.timesteps.tolist():
            cond = policy.obs_encoder(obs).flatten(1)  # recomputed at every step
            out = policy.noise_net(sample, torch.full((3,), t), cond)
            sample = policy.sample_scheduler.step(out, t, sample).prev_sample
    assert calls[0] == 1 + 10
    torch.testing.assert_close(cached, sample.clamp(-1, 1), rtol=0, atol=1e-5)


def test_instructions_as_florence_tokens(florence_dir: str) -> None:
    """With a FLORENCE_PATH tokenizer, instructions are tokenised once by the Preprocessor and padded tokens masked."""
    model, tokenizer, _ = load_florence(florence_dir)
    stats = {"action": {"min": [0.0] * ACT, "max": [1.0] * ACT}, "low_dim": {"min": [0.0] * LOW_DIM, "max": [1.0] * LOW_DIM}}
    text = FlorenceTokenizer(tokenizer, max_length=8)
    preprocess = Preprocessor(stats, ActionSpace(None, env_dim=ACT), text_encoder=text, instructions=INSTRUCTIONS)
    net = FlorenceBackbone(model, (), low_dim_dim=LOW_DIM, tokenizer=tokenizer, lang_tokens=True).eval()
    raw = {"low_dim": torch.full((2, T_OBS, LOW_DIM), 0.5), "lang": INSTRUCTIONS}
    batch = preprocess(raw, train=False)
    ids = batch["lang_emb"]  # (2, 8) token ids
    assert ids[0].tolist() == tokenizer(INSTRUCTIONS[0], padding="max_length", max_length=8)["input_ids"]
    hidden, mask = net(batch)
    assert hidden.shape == (2, 5 + 8 + T_OBS, 32) and mask.sum(1).tolist() == [5 + 5 + 2, 5 + 8 + 2]
    assert not torch.allclose(hidden[0, -1], hidden[1, -1])  # the state token sees the instruction
    with pytest.raises(ValueError, match="more than 8 tokens"):
        text.encode(["push the block onto the target push the block"])
    with pytest.raises(ValueError, match="needs the Florence tokenizer"):
        FlorenceBackbone(load_florence(None, "tiny")[0], (), low_dim_dim=LOW_DIM, lang_tokens=True)


def test_instruction_embedding_from_scratch() -> None:
    """From scratch, a sentence embedding lang_emb (B, D_lang) becomes one encoder token."""
    net = backbone(lang_dim=6).eval()
    batch = toy_batch(2)
    batch["lang_emb"] = torch.randn(2, 6)
    hidden, mask = net(batch)
    assert hidden.shape == (2, 2 * 2 + 1 + 2, 32) and mask is None
    with pytest.raises(ValueError, match="conditioned on instructions"):
        net(toy_batch(2))


@pytest.mark.parametrize("head", ["linear", "dit", "flow"])
def test_head_predicts_env_actions_through_the_evaluator(head: str) -> None:
    """A real PushT env: chunks in env units (pixels in [0, 512]) from its observations, and whole rollouts."""
    from mimictest.envs.pusht import PushTEnv

    torch.manual_seed(0)
    model, _, _ = load_florence(None, "tiny")
    net = FlorenceBackbone(model, CAMS, low_dim_dim=LOW_DIM)
    policy = make_policy(head, net).eval()
    stats = {"action": {"min": [0.0, 0.0], "max": [512.0, 512.0]}, "low_dim": {"min": [0.0, 0.0], "max": [512.0, 512.0]}}
    preprocess = Preprocessor(stats, ActionSpace(None, env_dim=2), CAMS, image_size=(96, 96), crop_size=(84, 84))
    predictor = Predictor(policy, preprocess, torch.device("cpu"))
    env = PushTEnv(obs_mode="image", max_episode_steps=4)
    obs, _ = env.reset(seed=0)
    window = {"rgb": {"image": np.stack([obs["rgb"]["image"]] * T_OBS)[None]}, "low_dim": np.stack([obs["low_dim"]] * T_OBS)[None]}
    chunk = predictor.chunk(window)  # (1, chunk, 2) normalised
    actions = predictor.to_env(chunk)
    assert actions.shape == (1, CHUNK, 2) and np.allclose(actions, chunk * 256.0 + 256.0, atol=1e-3)
    if head != "linear":  # sampled chunks are clipped to [-1, 1]: inside the pixel box
        assert actions.min() >= 0.0 and actions.max() <= 512.0
    env.close()
    evaluator = Evaluator(tasks=[EvalTask("pusht", partial(PushTEnv, obs_mode="image", max_episode_steps=4), 1)],
                          num_envs=1, obs_horizon=T_OBS, exec_start=1, exec_end=3, num_videos=0)
    records = evaluator.rollouts(predictor, progress=False)
    evaluator.close()
    assert len(records) == 1 and records[0]["length"] == 4


def test_bf16_autocast_loss_and_prediction() -> None:
    torch.manual_seed(0)
    for head in ("linear", "dit", "flow"):
        policy = make_policy(head, backbone())
        batch = toy_batch(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = policy.compute_loss(batch)["total_loss"]
            loss.backward()
            out = policy.eval().predict({k: v for k, v in batch.items() if k != "action"})
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert out.dtype == torch.float32 and out.shape == (2, CHUNK, ACT) and torch.isfinite(out).all()


def test_flow_time_sampling() -> None:
    policy = FlowMatchingPolicy(torch.nn.Identity(), ACT, CHUNK)
    t = policy.sample_time(20000, torch.device("cpu"))
    assert 0.001 <= t.min() and t.max() <= 1.0
    assert t.mean().item() == pytest.approx(0.001 + 0.999 * 0.6, abs=0.01)  # Beta(1.5, 1) has mean 0.6
    policy.time_sampling = "uniform"
    assert policy.sample_time(20000, torch.device("cpu")).mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="time_sampling"):
        FlowMatchingPolicy(torch.nn.Identity(), ACT, CHUNK, time_sampling="logit")


def test_bench_infer_times_the_cached_and_recomputed_prefix(tmp_path) -> None:
    import json

    from mimictest import bench

    out = tmp_path / "infer.json"
    bench.main(["--device", "cpu", "--json", str(out), "infer", "--config", "florence-flow-lift-small", "--envs", "2",
                "--repeats", "1", "--warmup", "0"])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sampler"], r["batch"]) for r in rows] == [("euler, cached prefix", 1), ("euler, cached prefix", 2),
                                                          ("euler, prefix per step", 1), ("euler, prefix per step", 2)]
    assert all(r["ms_per_chunk"] > 0 for r in rows)
