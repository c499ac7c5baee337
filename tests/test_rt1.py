"""Tests for RT-1: FiLM identity at initialisation, time-causal attention, both heads, the bins, weights, and staged freezing through `train`."""

import json
import os

import numpy as np
import pytest
import torch
import torchvision

from mimictest import bench, checkpoint
from mimictest.data.windows import WindowDataset
from mimictest.nets.film import FiLMEfficientNet
from mimictest.nets.rt1 import RT1, time_causal_mask
from mimictest.nets.token_learner import TokenLearner
from mimictest.policies.regression import RegressionPolicy, bin_centres, decode_bins, encode_bins
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

A, CHUNK, T, LOW_DIM, LANG, IMAGE = 4, 3, 2, 3, 8, 32  # a 32x32 image gives a 1x1 EfficientNet map

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", autouse=True)
def one_core():
    """`train` uses a thread per core of the process's affinity; on the shared 2-core test machine the two
    threads of these tiny runs mostly wait for each other (the freeze tests took 40 s instead of 3 s), so pin one."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    yield
    os.sched_setaffinity(0, cpus)


def tiny_rt1(cams=("cam",), **kw) -> RT1:
    args = dict(low_dim_dim=LOW_DIM, efficientnet="efficientnet_b0", token_dim=16, num_tokens=4, d_model=32, nhead=2,
                num_layers=2, dim_feedforward=64)
    return RT1(A, CHUNK, T, list(cams), **{**args, **kw})


def random_batch(batch_size: int, cams=("cam",), image: int = IMAGE) -> dict:
    return {"rgb": {cam: torch.rand(batch_size, T, 3, image, image) * 2 - 1 for cam in cams},
            "low_dim": torch.randn(batch_size, T, LOW_DIM), "lang_emb": torch.randn(batch_size, LANG),
            "task": torch.arange(batch_size) % 3,
            "action": torch.rand(batch_size, CHUNK, A) * 2 - 1, "is_pad": torch.zeros(batch_size, CHUNK, dtype=torch.bool)}


def test_film_is_the_identity_at_initialisation_and_then_learns() -> None:
    torch.manual_seed(0)
    tokenizer = FiLMEfficientNet("efficientnet_b0", cond_dim=LANG, out_dim=16).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    plain = tokenizer(images)  # FiLM skipped: no instruction
    torch.testing.assert_close(tokenizer(images, torch.randn(2, LANG)), plain, rtol=0, atol=0)
    assert len(tokenizer.films) == 16, "EfficientNet-B0 has 16 MBConv blocks, each followed by FiLM"

    net = tiny_rt1(lang_dim=LANG)
    policy = RegressionPolicy(net)
    batch = random_batch(4)
    other = {**batch, "lang_emb": torch.randn(4, LANG)}
    policy.eval()
    torch.testing.assert_close(policy.predict(batch), policy.predict(other), rtol=0, atol=0)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    policy(batch)["total_loss"].backward()
    assert net.backbones[0].films[0].mult.weight.grad.abs().sum() > 0, "FiLM must receive gradients from the start"
    opt.step()
    policy.eval()
    assert not torch.allclose(policy.predict(batch), policy.predict(other)), "after a step the instruction matters"


def test_transformer_is_causal_over_time() -> None:
    mask = time_causal_mask(obs_horizon=2, tokens_per_step=3, num_queries=2)
    assert mask.shape == (8, 8)
    assert mask[:3, :3].all() and not mask[:3, 3:].any(), "step 0 sees only step 0"
    assert mask[3:6, :6].all() and not mask[3:6, 6:].any(), "step 1 sees steps 0 and 1, not the queries"
    assert mask[6:].all(), "the action queries see everything"

    torch.manual_seed(0)
    net = tiny_rt1().eval()
    n = net.tokens_per_step
    x = torch.randn(2, T * n + CHUNK, 32)
    later = x.clone()
    later[:, n:T * n] += torch.randn_like(later[:, n:T * n])  # change only step 1's tokens
    with torch.no_grad():
        out, out_later = x, later
        for block in net.blocks:
            out, out_later = block(out, net.mask), block(out_later, net.mask)
    torch.testing.assert_close(out[:, :n], out_later[:, :n])  # step 0's outputs ignore step 1
    assert not torch.allclose(out[:, -CHUNK:], out_later[:, -CHUNK:])


@pytest.mark.parametrize("condition", ["lang", "task", "off"])
@pytest.mark.parametrize("cams, shared", [(("cam",), True), (("a", "b"), True), (("a", "b"), False)])
def test_both_heads_train_and_predict(condition: str, cams: tuple, shared: bool) -> None:
    torch.manual_seed(0)
    kw = {"lang": {"lang_dim": LANG}, "task": {"num_tasks": 3}, "off": {}}[condition]
    batch = random_batch(3, cams)
    batch["is_pad"][:, -1] = True
    for loss, bins in (("l1", None), ("mse", None), ("ce", 256)):
        net = tiny_rt1(cams, shared_backbone=shared, bins=bins, **kw)
        assert len(net.backbones) == (1 if shared else len(cams))
        policy = RegressionPolicy(net, loss=loss, decode="expectation" if condition == "task" else "argmax")
        losses = policy(batch)
        assert set(losses) == {"total_loss", loss} and torch.isfinite(losses["total_loss"])
        losses["total_loss"].backward()
        assert all(p.grad is not None for p in net.backbones[0].trunk.parameters())
        policy.eval()
        out = policy.predict({k: v for k, v in batch.items() if k not in ("action", "is_pad")})
        assert out.shape == (3, CHUNK, A) and out.dtype == torch.float32 and torch.isfinite(out).all()
        if loss == "ce":
            assert out.abs().max() < 1.0, "bin centres lie inside [-1, 1]"


def test_cameras_of_different_sizes() -> None:
    """CALVIN's static and gripper cameras differ in size (Script/RT1ImageCalvin.py): each gives its tokens."""
    torch.manual_seed(0)
    batch = random_batch(2, ("static",), image=64)
    batch["rgb"]["gripper"] = torch.rand(2, T, 3, IMAGE, IMAGE) * 2 - 1
    for shared in (True, False):
        policy = RegressionPolicy(tiny_rt1(("static", "gripper"), shared_backbone=shared, lang_dim=LANG), loss="l1")
        policy(batch)["total_loss"].backward()
        policy.eval()
        assert policy.predict({k: v for k, v in batch.items() if k not in ("action", "is_pad")}).shape == (2, CHUNK, A)


def test_bins_round_trip_within_half_a_bin_and_decode() -> None:
    bins = 256
    values = torch.cat((torch.linspace(-1, 1, 10001), torch.tensor([-1.0, 1.0, 2 / bins - 1, 1 - 2 / bins])))
    index = encode_bins(values, bins)
    assert index.min() == 0 and index.max() == bins - 1 and index.dtype == torch.int64
    assert (decode_bins(index, bins) - values).abs().max() <= 1 / bins + 1e-6, "half a bin is 1 / bins of [-1, 1]"
    assert encode_bins(torch.tensor([-3.0, 3.0]), bins).tolist() == [0, bins - 1], "outside [-1, 1]: the end bins"
    torch.testing.assert_close(bin_centres(bins), decode_bins(torch.arange(bins), bins))

    class Fixed(torch.nn.Module):  # a network whose logits are a parameter
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = torch.nn.Parameter(logits)

        def forward(self, batch: dict) -> torch.Tensor:
            return self.logits

    action = torch.rand(2, CHUNK, A) * 2 - 1
    target = encode_bins(action, bins)
    logits = torch.nn.functional.one_hot(target, bins).float() * 50  # (2, chunk, A, bins), sure of the right bin
    is_pad = torch.zeros(2, CHUNK, dtype=torch.bool)
    policy = RegressionPolicy(Fixed(logits), loss="ce", bins=bins)
    assert policy.compute_loss({"action": action, "is_pad": is_pad})["ce"] < 1e-6
    torch.testing.assert_close(policy.predict({}), decode_bins(target, bins))
    policy.decode = "expectation"
    torch.testing.assert_close(policy.predict({}), decode_bins(target, bins), atol=1e-5, rtol=0)
    wrong = torch.roll(logits, 1, dims=-1)  # every dimension one bin off ...
    wrong[:, -1] = logits[:, -1]  # ... except the last step
    is_pad[:, :-1] = True  # ... which is the only one not padded
    assert RegressionPolicy(Fixed(wrong), loss="ce", bins=bins).compute_loss({"action": action, "is_pad": is_pad})["ce"] < 1e-6


def test_regression_loss_ignores_padded_steps() -> None:
    class Const(torch.nn.Module):
        def __init__(self, value: torch.Tensor) -> None:
            super().__init__()
            self.value = torch.nn.Parameter(value)

        def forward(self, batch: dict) -> torch.Tensor:
            return self.value

    pred = torch.zeros(2, CHUNK, A)
    action = torch.ones(2, CHUNK, A) * 0.5
    action[:, -1] = 9.0  # padded: must not count
    is_pad = torch.zeros(2, CHUNK, dtype=torch.bool)
    is_pad[:, -1] = True
    batch = {"action": action, "is_pad": is_pad}
    assert RegressionPolicy(Const(pred), "l1").compute_loss(batch)["l1"].item() == pytest.approx(0.5)
    assert RegressionPolicy(Const(pred), "mse").compute_loss(batch)["mse"].item() == pytest.approx(0.25)


def test_bad_inputs_get_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="lang_emb"):
        tiny_rt1(lang_dim=LANG)({k: v for k, v in random_batch(2).items() if k != "lang_emb"})
    with pytest.raises(ValueError, match="task"):
        tiny_rt1(num_tasks=3)({k: v for k, v in random_batch(2).items() if k != "task"})
    with pytest.raises(ValueError, match="obs_horizon"):
        batch = random_batch(2)
        tiny_rt1()({**batch, "rgb": {"cam": batch["rgb"]["cam"][:, :1]}})
    with pytest.raises(ValueError, match="low_dim"):
        tiny_rt1()({k: v for k, v in random_batch(2).items() if k != "low_dim"})
    with pytest.raises(ValueError, match="not both"):
        tiny_rt1(lang_dim=LANG, num_tasks=3)
    with pytest.raises(ValueError, match="efficientnet must be one of"):
        tiny_rt1(efficientnet="efficientnet_b7")
    with pytest.raises(ValueError, match="at least one camera"):
        tiny_rt1(cams=())
    with pytest.raises(ValueError, match="loss must be"):
        RegressionPolicy(tiny_rt1(), loss="huber")
    with pytest.raises(ValueError, match="logits"):
        RegressionPolicy(tiny_rt1(), loss="ce")(random_batch(2))  # a continuous net behind the binned loss
    with pytest.raises(ValueError, match="is_pad"):
        RegressionPolicy(tiny_rt1()).compute_loss({k: v for k, v in random_batch(2).items() if k != "is_pad"})
    with pytest.raises(FileNotFoundError, match="efficientnet_b0_rwightman"):
        FiLMEfficientNet("efficientnet_b0", norm="frozen_batch", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="frozen_batch"):
        FiLMEfficientNet("efficientnet_b0", norm="group", weights=str(tmp_path / "missing.pth"))


def test_local_torchvision_weights_load(tmp_path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.efficientnet_b0(weights=None)
    path = tmp_path / "efficientnet_b0.pth"
    torch.save(reference.state_dict(), path)
    reference.eval()
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    for norm in ("frozen_batch", "batch"):
        tokenizer = FiLMEfficientNet("efficientnet_b0", out_dim=16, norm=norm, weights=str(path)).eval()
        imagenet = ((image + 1) / 2 - tokenizer.imagenet_mean) / tokenizer.imagenet_std  # what the weights expect
        with torch.no_grad():
            torch.testing.assert_close(tokenizer(image), tokenizer.proj(reference.features(imagenet)), rtol=1e-4, atol=1e-5)
    torch.save(torchvision.models.efficientnet_b1(weights=None).state_dict(), tmp_path / "b1.pth")
    with pytest.raises(ValueError, match="not a torchvision efficientnet_b0 state dict"):
        FiLMEfficientNet("efficientnet_b0", norm="frozen_batch", weights=str(tmp_path / "b1.pth"))


def test_token_learner_pools_positions() -> None:
    torch.manual_seed(0)
    learner = TokenLearner(16, num_tokens=8)
    fmap = torch.randn(2, 16, 3, 3)
    tokens = learner(fmap)
    assert tokens.shape == (2, 8, 16)
    lo, hi = fmap.flatten(2).min(-1).values, fmap.flatten(2).max(-1).values  # (2, 16)
    assert (tokens >= lo[:, None] - 1e-6).all() and (tokens <= hi[:, None] + 1e-6).all(), "convex combinations of positions"


# Staged freezing through the real training loop.

def tiny_dataset_and_preprocess() -> tuple[WindowDataset, Preprocessor]:
    rng = np.random.default_rng(0)
    n = 40
    action = rng.uniform(-1, 1, (n, A)).astype(np.float32)
    low_dim = rng.uniform(-1, 1, (n, LOW_DIM)).astype(np.float32)
    rgb = {"cam": rng.integers(0, 256, (n, IMAGE, IMAGE, 3), dtype=np.uint8)}
    dataset = WindowDataset(np.array([20, 40]), T, CHUNK, action, low_dim, rgb, episode_task=np.array([0, 1]),
                            task_names=["a", "b"])
    stats = {"action": {"min": [-1.0] * A, "max": [1.0] * A}, "low_dim": {"min": [-1.0] * LOW_DIM, "max": [1.0] * LOW_DIM}}
    return dataset, Preprocessor(stats, ActionSpace(None, "absolute", env_dim=A), ["cam"], image_size=(IMAGE, IMAGE))


def run_stage(save_root, max_steps: int, freeze: bool, unfreeze_step: int | None, resume: bool = False) -> RT1:
    """Train the tiny RT-1 (BatchNorm trunk) to `max_steps` and return the network; a run resumes from its checkpoint."""
    torch.manual_seed(0)
    dataset, preprocess = tiny_dataset_and_preprocess()
    net = tiny_rt1(backbone_norm="batch", num_tasks=2)  # FiLM on a task embedding
    train(RegressionPolicy(net), preprocess, dataset, TrainConfig(
        run_name="rt1", max_steps=max_steps, batch_size=8, lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.999),
        lr_schedule="constant", warmup_steps=0, grad_clip=10.0, ema=False, num_workers=0, log_every=1, save_every=0,
        bf16=False, unfreeze_step=unfreeze_step, save_root=str(save_root), allow_config_change=resume,
    ), param_groups=net.param_groups(lr_vision=1e-4), frozen=net.vision_tower() if freeze else [])
    return net


def adam_steps(save_root) -> tuple[list[int], list[int]]:
    """AdamW's step count of each parameter with state in the checkpoint: (rest, vision tower)."""
    opt = checkpoint.load(os.path.join(save_root, "rt1", "last.pt"))["optimizer"]
    rest, tower = (g["params"] for g in opt["param_groups"])
    steps = [[int(opt["state"][i]["step"]) for i in ids if i in opt["state"]] for ids in (rest, tower)]
    assert opt["param_groups"][1]["lr"] == 1e-4, "the vision tower keeps its own learning rate"
    return steps[0], steps[1]


def initial_tower() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # as run_stage builds its network
    return tower_state(tiny_rt1(backbone_norm="batch", num_tasks=2))


def tower_state(net: RT1) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.backbones[0].trunk.state_dict().items()}  # weights and BatchNorm statistics


def test_freeze_then_unfreeze_by_resuming_with_the_flag_off(tmp_path) -> None:
    initial = initial_tower()
    net = run_stage(tmp_path, max_steps=2, freeze=True, unfreeze_step=None)
    for key, value in tower_state(net).items():
        torch.testing.assert_close(value, initial[key], rtol=0, atol=0, msg=f"frozen {key} changed")
    assert not any(p.requires_grad for p in net.backbones[0].trunk.parameters())
    assert net.backbones[0].films[0].mult.weight.abs().sum() > 0, "FiLM layers train while the trunk is frozen"
    rest, tower = adam_steps(tmp_path)
    assert tower == [] and rest and set(rest) == {2}, "frozen parameters never got a gradient, the rest got 2"

    net = run_stage(tmp_path, max_steps=3, freeze=False, unfreeze_step=None, resume=True)  # stage 2: the flag off
    moved = [k for k, v in tower_state(net).items() if not torch.equal(v, initial[k])]
    assert any("running_mean" in k for k in moved) and any(k.endswith("weight") for k in moved)
    rest, tower = adam_steps(tmp_path)
    assert set(rest) == {3}, "the optimizer state of the other parameters survived the switch"
    assert tower and set(tower) == {1}


def test_unfreeze_step_and_resuming_past_it(tmp_path) -> None:
    initial = initial_tower()
    net = run_stage(tmp_path, max_steps=3, freeze=True, unfreeze_step=1)
    assert all(p.requires_grad for p in net.backbones[0].trunk.parameters())
    assert any(not torch.equal(v, initial[k]) for k, v in tower_state(net).items())
    rest, tower = adam_steps(tmp_path)
    assert set(rest) == {3} and tower and set(tower) == {2}, "unfrozen at step 1: two updates of the tower, three of the rest"
    log = [json.loads(line) for line in open(tmp_path / "rt1" / "metrics.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]

    run_stage(tmp_path, max_steps=4, freeze=True, unfreeze_step=1, resume=True)  # resumed past unfreeze_step
    rest, tower = adam_steps(tmp_path)
    assert set(rest) == {4} and set(tower) == {3}, "resuming past unfreeze_step keeps the tower training"


def test_bench_knows_rt1(tmp_path) -> None:
    out = tmp_path / "rows.json"
    bench.main(["--device", "cpu", "--json", str(out), "train", "--config", "rt1-lift-image-discrete", "--batch", "2",
                "--precision", "fp32", "--steps", "1", "--warmup", "0", "--workers", "0"])
    assert json.load(open(out))["rows"][0]["samples_per_s"] > 0
    bench.main(["--device", "cpu", "--json", str(out), "infer", "--config", "rt1-lift-image", "--envs", "2", "--repeats", "1",
                "--warmup", "0"])
    assert {r["batch"] for r in json.load(open(out))["rows"]} == {1, 2}
