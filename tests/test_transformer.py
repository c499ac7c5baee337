"""Tests for Diffusion Policy's time-series diffusion transformer and its use inside DiffusionPolicy."""


import pytest
import torch
from torch import Tensor, nn

from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.transformer import DiffusionTransformer
from mimictest.policies.diffusion import DiffusionPolicy

LOW_DIM, T_OBS, CHUNK, ACT = 4, 2, 8, 3


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(chunk: int = CHUNK, n_obs_steps: int = T_OBS, cond_dim: int = LOW_DIM, **kwargs) -> DiffusionTransformer:
    sizes = dict(n_layer=2, n_head=2, n_emb=32) | kwargs
    return DiffusionTransformer(ACT, chunk, n_obs_steps, cond_dim, **sizes)


def toy_batch(batch_size: int = 16) -> tuple[dict[str, Tensor], Tensor]:
    """Two observation modes (all +1 / all -1), each with its own constant target chunk."""
    sign = torch.where(torch.arange(batch_size) % 2 == 0, 1.0, -1.0)  # (B,)
    low_dim = sign[:, None, None].expand(batch_size, T_OBS, LOW_DIM).clone()  # (B, T_obs, D)
    ramp = torch.linspace(-0.8, 0.8, CHUNK)[None, :, None]  # (1, chunk, 1)
    target = (ramp * sign[:, None, None]).expand(batch_size, CHUNK, ACT).clone()  # (B, chunk, A)
    return {"low_dim": low_dim, "action": target}, target


@pytest.mark.parametrize("chunk, n_obs_steps", [(10, 2), (16, 2), (5, 1), (4, 3), (1, 2)])
@pytest.mark.parametrize("n_cond_layers", [0, 1])
def test_shapes(chunk: int, n_obs_steps: int, n_cond_layers: int) -> None:
    net = tiny(chunk, n_obs_steps, cond_dim=7, n_cond_layers=n_cond_layers)
    cond = torch.randn(3, n_obs_steps * 7)
    out = net(torch.randn(3, chunk, ACT), torch.tensor([0, 50, 99]), cond)
    assert out.shape == (3, chunk, ACT) and torch.isfinite(out).all()
    assert net(torch.randn(3, chunk, ACT), 7, cond).shape == (3, chunk, ACT)


def test_rejects_bad_inputs() -> None:
    net = tiny()
    with pytest.raises(ValueError, match="global_cond"):
        net(torch.randn(2, CHUNK, ACT), 0, torch.randn(2, T_OBS * LOW_DIM + 1))
    with pytest.raises(ValueError, match="global_cond"):
        net(torch.randn(2, CHUNK, ACT), 0, torch.randn(2, T_OBS, LOW_DIM))
    with pytest.raises(ValueError, match="chunk_size"):
        net(torch.randn(2, CHUNK + 1, ACT), 0, torch.randn(2, T_OBS * LOW_DIM))
    with pytest.raises(ValueError, match="n_head"):
        tiny(n_emb=30, n_head=4)


def test_init_matches_reference() -> None:
    net = DiffusionTransformer(ACT, 10, T_OBS, 64)  # paper size, so the 0.02 spread is measurable
    assert net.input_emb.bias.abs().max() == 0 and net.decoder.layers[0].self_attn.in_proj_bias.abs().max() == 0
    for weight in (net.input_emb.weight, net.decoder.layers[0].self_attn.in_proj_weight, net.pos_emb, net.cond_pos_emb):
        assert abs(weight.std().item() - 0.02) < 0.004
    assert torch.equal(net.ln_f.weight, torch.ones(256)) and torch.equal(net.ln_f.bias, torch.zeros(256))


def test_causal_self_attention() -> None:
    """Changing action step j changes the outputs of steps >= j only."""
    torch.manual_seed(0)
    net = tiny().eval()
    sample, cond, t = torch.randn(2, CHUNK, ACT), torch.randn(2, T_OBS * LOW_DIM), torch.tensor([3, 60])
    base = net(sample, t, cond)
    for j in range(CHUNK):
        moved = sample.clone()
        moved[:, j] += 1.0
        diff = (net(moved, t, cond) - base).abs().amax(dim=(0, 2))  # (chunk,)
        assert (diff[:j] == 0).all() and (diff[j:] > 1e-4).all()


@pytest.mark.parametrize("n_obs_steps", [2, 3])
def test_memory_mask_hides_later_observations(n_obs_steps: int) -> None:
    """Reference semantics (`t >= s - 1`, s = 0 the step token): action step t sees observation steps <= t."""
    torch.manual_seed(0)
    net = tiny(n_obs_steps=n_obs_steps).eval()
    sample, t = torch.randn(2, CHUNK, ACT), torch.tensor([3, 60])
    cond = torch.randn(2, n_obs_steps, LOW_DIM)
    base = net(sample, t, cond.flatten(1))
    for k in range(n_obs_steps):
        moved = cond.clone()
        moved[:, k] += 5.0
        diff = (net(sample, t, moved.flatten(1)) - base).abs().amax(dim=(0, 2))  # (chunk,)
        assert (diff[:k] == 0).all() and (diff[k:] > 1e-5).all()
    action_step, cond_token = torch.meshgrid(torch.arange(CHUNK), torch.arange(1 + n_obs_steps), indexing="ij")
    assert torch.equal(net.memory_mask, ~(action_step >= cond_token - 1))
    changed = net(sample, torch.tensor([4, 60]), cond.flatten(1)) - base
    assert changed[0].abs().amin(dim=-1).min() > 0  # every action step sees the diffusion-step token


def test_non_causal_sees_everything() -> None:
    torch.manual_seed(0)
    net = tiny(causal_attn=False).eval()
    sample, cond = torch.randn(2, CHUNK, ACT), torch.randn(2, T_OBS, LOW_DIM)
    moved = cond.clone()
    moved[:, -1] += 5.0
    diff = (net(sample, 5, moved.flatten(1)) - net(sample, 5, cond.flatten(1))).abs().amax(dim=(0, 2))
    assert (diff > 1e-5).all()


@pytest.mark.parametrize("n_cond_layers", [0, 1])
def test_optim_groups(n_cond_layers: int) -> None:
    net = tiny(n_cond_layers=n_cond_layers)
    decay, no_decay = net.optim_groups(1e-3)
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    owners = dict(net.named_modules())
    for name in names.values():
        owner, _, leaf = name.rpartition(".")
        expect = leaf.endswith("weight") and isinstance(owners[owner], (nn.Linear, nn.MultiheadAttention))
        assert (name in decayed) == expect, name
    assert {"pos_emb", "cond_pos_emb", "ln_f.weight", "head.bias"}.isdisjoint(decayed)
    assert {"head.weight", "input_emb.weight", "decoder.layers.0.self_attn.in_proj_weight"} <= decayed


def test_policy_trains_and_samples() -> None:
    torch.manual_seed(0)
    batch, _ = toy_batch(4)
    encoder, net = ObsEncoder([], LOW_DIM), tiny()
    policy = DiffusionPolicy(encoder, net, ACT, CHUNK)
    groups = net.optim_groups(1e-3) + [{"params": encoder.parameters(), "weight_decay": 1e-6}]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    before = net.head.weight.detach().clone()
    loss = policy(batch)["total_loss"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, net.head.weight)
    for sampler in ("ddpm", "ddim"):
        out = DiffusionPolicy(encoder, net, ACT, CHUNK, sampler=sampler).eval().predict({"low_dim": batch["low_dim"]})
        assert out.shape == (4, CHUNK, ACT) and out.min() >= -1.0 and out.max() <= 1.0


def test_bf16_autocast() -> None:
    torch.manual_seed(0)
    batch, _ = toy_batch(4)
    policy = DiffusionPolicy(ObsEncoder([], LOW_DIM), tiny(), ACT, CHUNK, sampler="ddim")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = policy(batch)["total_loss"]
        loss.backward()
        out = policy.eval().predict({"low_dim": batch["low_dim"]})
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert out.dtype == torch.float32 and out.shape == (4, CHUNK, ACT) and out.abs().max() <= 1.0


def fit(policy: DiffusionPolicy, batch: dict[str, Tensor], steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(policy.noise_net.optim_groups(1e-3), lr=lr, betas=(0.9, 0.95))
    losses = []
    for _ in range(steps):
        loss = policy(batch)["total_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_policy_overfits_toy_batch() -> None:
    """Epsilon prediction, as in the paper: the loss falls to ~0.15-0.3 of its start within 150 steps."""
    torch.manual_seed(0)
    batch, _ = toy_batch()
    losses = fit(DiffusionPolicy(ObsEncoder([], LOW_DIM), tiny(p_drop_attn=0.0), ACT, CHUNK), batch, 150, lr=2e-3)
    assert sum(losses[-20:]) / 20 < 0.4 * sum(losses[:5]) / 5


def test_sample_prediction_follows_observations() -> None:
    """The two observation modes map to opposite chunks, so reaching the targets needs the condition tokens."""
    torch.manual_seed(0)
    batch, target = toy_batch()
    net = tiny(n_emb=64, n_head=4, p_drop_attn=0.0)
    policy = DiffusionPolicy(ObsEncoder([], LOW_DIM), net, ACT, CHUNK, sampler="ddim", prediction_type="sample")
    fit(policy, batch, 300, lr=1e-3)
    out = policy.eval().predict({"low_dim": batch["low_dim"]})
    assert (out - target).abs().mean() < 0.05  # ~0.006; ignoring the observations gives ~0.45
