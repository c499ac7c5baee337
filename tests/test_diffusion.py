"""Tests for the Diffusion Policy stack: UNet, vision/obs encoders, policy training and sampling, EMA."""


import pytest
import torch
from torch import Tensor, nn

from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.unet1d import ConditionalUnet1D, MatmulConv1d, TimeGroupNorm, Upsample1d
from mimictest.nets.vision import ResNet18SpatialSoftmax
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.policies.ema import EMA

LOW_DIM, T_OBS, CHUNK, ACT = 4, 2, 8, 3


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_unet(action_dim: int = ACT, cond_dim: int = T_OBS * LOW_DIM) -> ConditionalUnet1D:
    return ConditionalUnet1D(action_dim, cond_dim, down_dims=(32, 64, 128), diffusion_step_embed_dim=32)


def toy_batch(batch_size: int = 16) -> tuple[dict[str, Tensor], Tensor]:
    """Two observation modes (all +1 / all -1), each with its own constant target chunk."""
    sign = torch.where(torch.arange(batch_size) % 2 == 0, 1.0, -1.0)  # (B,)
    low_dim = sign[:, None, None].expand(batch_size, T_OBS, LOW_DIM).clone()  # (B, T_obs, D)
    ramp = torch.linspace(-0.8, 0.8, CHUNK)[None, :, None]  # (1, chunk, 1)
    target = (ramp * sign[:, None, None]).expand(batch_size, CHUNK, ACT).clone()  # (B, chunk, A)
    return {"low_dim": low_dim, "action": target}, target


def train(policy: DiffusionPolicy, batch: dict[str, Tensor], steps: int, lr: float = 2e-3) -> list[float]:
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = policy.compute_loss(batch)["total_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("horizon", [16, 8])
def test_unet_shapes(horizon: int) -> None:
    net = tiny_unet(action_dim=10, cond_dim=38)
    out = net(torch.randn(3, horizon, 10), torch.tensor([0, 50, 99]), torch.randn(3, 38))
    assert out.shape == (3, horizon, 10)
    assert net(torch.randn(3, horizon, 10), 7, torch.randn(3, 38)).shape == (3, horizon, 10)


def assert_matches_on_time_major(ours: nn.Module, ref: nn.Module, in_ch: int, horizon: int) -> None:
    """``ours`` on ``(B, T, C)`` gives ``ref``'s output and gradients on ``(B, C, T)``, with the same parameters."""
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, horizon, in_ch, requires_grad=True)
    x_ref = x.detach().transpose(1, 2).clone().requires_grad_()
    out, out_ref = ours(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref.transpose(1, 2))
    assert out.is_contiguous()  # the next layer's input, with no transposed copy
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad.transpose(1, 2))
    torch.testing.assert_close(x.grad, x_ref.grad.transpose(1, 2))
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("kernel_size, stride", [(1, 1), (5, 1), (3, 2)])
def test_matmul_conv1d_matches_conv1d(kernel_size: int, stride: int) -> None:
    """The UNet's convolutions (stride 1, and its stride-2 downsampling) as matmuls on time-major activations."""
    torch.manual_seed(0)
    ref = torch.nn.Conv1d(6, 4, kernel_size, stride=stride, padding=kernel_size // 2)
    assert_matches_on_time_major(MatmulConv1d(6, 4, kernel_size, stride), ref, in_ch=6, horizon=8)
    with pytest.raises(ValueError, match="odd kernel_size"):
        MatmulConv1d(6, 4, 4)


def test_upsample_and_group_norm_match_torch() -> None:
    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1)
    assert_matches_on_time_major(Upsample1d(6, 4), ref, in_ch=6, horizon=4)
    norm = TimeGroupNorm(2, 6)
    torch.nn.init.normal_(norm.weight)  # not the identity-like initialisation
    torch.nn.init.normal_(norm.bias)
    assert_matches_on_time_major(norm, torch.nn.GroupNorm(2, 6), in_ch=6, horizon=8)


def test_unet_rejects_bad_inputs() -> None:
    net = tiny_unet(action_dim=10, cond_dim=38)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(2, 6, 10), 0, torch.randn(2, 38))
    with pytest.raises(ValueError, match="global_cond"):
        net(torch.randn(2, 8, 10), 0, torch.randn(2, 37))
    # Per-step features times the observation horizon: (B, 2 * 19) flattened by DiffusionPolicy.
    per_step = ConditionalUnet1D(10, 19, 2, down_dims=(32, 64), diffusion_step_embed_dim=32)
    assert per_step.global_cond_dim == 38 and per_step(torch.randn(2, 8, 10), 0, torch.randn(2, 38)).shape == (2, 8, 10)
    with pytest.raises(ValueError, match="cond_dim = obs_encoder.out_dim and n_obs_steps"):
        per_step(torch.randn(2, 8, 10), 0, torch.randn(2, 19))


@pytest.mark.parametrize("size", [84, 76])
def test_vision_encoder_shapes(size: int) -> None:
    enc = ResNet18SpatialSoftmax()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())
    out = enc(torch.rand(2, 3, size, size) * 2 - 1)
    assert out.shape == (2, 64)
    assert torch.isfinite(out).all()


def test_obs_encoder_modes() -> None:
    rgb = {cam: torch.rand(2, T_OBS, 3, 76, 76) * 2 - 1 for cam in ("left", "right")}  # {cam: (B, T, 3, H, W)}
    low_dim = torch.randn(2, T_OBS, LOW_DIM)

    rgb_only = ObsEncoder(["left", "right"], low_dim_dim=0)
    assert rgb_only.out_dim == 128
    assert rgb_only({"rgb": rgb}).shape == (2, T_OBS, 128)

    low_only = ObsEncoder([], low_dim_dim=LOW_DIM)
    assert low_only.out_dim == LOW_DIM
    assert torch.equal(low_only({"low_dim": low_dim}), low_dim)

    both = ObsEncoder(["left"], low_dim_dim=LOW_DIM).to(memory_format=torch.channels_last)
    out = both({"rgb": {"left": rgb["left"]}, "low_dim": low_dim})
    assert out.shape == (2, T_OBS, 64 + LOW_DIM)
    assert torch.equal(out[..., 64:], low_dim)

    with pytest.raises(ValueError, match="rgb"):
        both({"low_dim": low_dim})


def test_policy_overfits_and_samples_in_range() -> None:
    torch.manual_seed(0)
    batch, target = toy_batch()
    enc, net = ObsEncoder([], LOW_DIM), tiny_unet()
    policy = DiffusionPolicy(enc, net, ACT, CHUNK, sampler="ddpm", prediction_type="epsilon")
    losses = train(policy, batch, steps=250)
    assert sum(losses[-20:]) / 20 < 0.25 * sum(losses[:20]) / 20

    policy.eval()
    obs = {"low_dim": batch["low_dim"]}
    ddpm = policy.predict(obs)
    ddim = policy.with_sampler("ddim", 10).eval().predict(obs)
    for out in (ddpm, ddim):
        assert out.shape == (16, CHUNK, ACT)
        assert out.min() >= -1.0 and out.max() <= 1.0
    assert (ddpm - target).abs().mean() < 0.15  # 0.06-0.11 across seeds; reversed timesteps give > 0.25


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_prediction_reaches_target(sampler: str) -> None:
    torch.manual_seed(0)
    batch, target = toy_batch()
    policy = DiffusionPolicy(ObsEncoder([], LOW_DIM), tiny_unet(), ACT, CHUNK, sampler=sampler, prediction_type="sample")
    train(policy, batch, steps=100)
    out = policy.eval().predict({"low_dim": batch["low_dim"]})
    assert (out - target).abs().mean() < 0.05
    other = policy.with_sampler("ddim" if sampler == "ddpm" else "ddpm", 10).eval()  # the same networks, sampled otherwise
    assert other.noise_net is policy.noise_net and other.prediction_type == "sample"
    assert (other.predict({"low_dim": batch["low_dim"]}) - target).abs().mean() < 0.05  # read as epsilon, it would not


def test_mask_padding() -> None:
    batch, _ = toy_batch(4)
    policy = DiffusionPolicy(ObsEncoder([], LOW_DIM), tiny_unet(), ACT, CHUNK, mask_padding=True)
    with pytest.raises(ValueError, match="is_pad"):
        policy.compute_loss(batch)
    batch["is_pad"] = torch.zeros(4, CHUNK, dtype=torch.bool)
    torch.manual_seed(1)
    masked = policy.compute_loss(batch)["total_loss"]
    policy.mask_padding = False
    torch.manual_seed(1)
    plain = policy.compute_loss(batch)["total_loss"]
    assert torch.allclose(masked, plain)


def test_bf16_autocast() -> None:
    torch.manual_seed(0)
    enc = ObsEncoder(["cam"], low_dim_dim=LOW_DIM)
    net = tiny_unet(cond_dim=T_OBS * enc.out_dim)
    batch = {
        "rgb": {"cam": torch.rand(2, T_OBS, 3, 76, 76) * 2 - 1},
        "low_dim": torch.randn(2, T_OBS, LOW_DIM),
        "action": torch.rand(2, CHUNK, ACT) * 2 - 1,
    }
    for sampler in ("ddpm", "ddim"):
        policy = DiffusionPolicy(enc, net, ACT, CHUNK, sampler=sampler)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = policy.compute_loss(batch)["total_loss"]
            loss.backward()
            out = policy.predict({k: v for k, v in batch.items() if k != "action"})
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert out.dtype == torch.float32 and out.shape == (2, CHUNK, ACT)
        assert torch.isfinite(out).all() and out.abs().max() <= 1.0


def test_cpu_sampling_encodes_in_bf16_and_denoises_in_fp32() -> None:
    """Under a bf16 autocast on the CPU, the ResNet runs in bf16 and every UNet pass in fp32."""
    torch.manual_seed(0)
    enc = ObsEncoder(["cam"], low_dim_dim=LOW_DIM)
    net = tiny_unet(cond_dim=T_OBS * enc.out_dim)
    policy = DiffusionPolicy(enc, net, ACT, CHUNK, sampler="ddim", num_inference_steps=3).eval()
    seen: dict[str, list] = {"encoder": [], "unet": []}
    enc.cams[0].register_forward_hook(lambda m, i, o: seen["encoder"].append(o.dtype))
    net.register_forward_hook(lambda m, i, o: seen["unet"].append((torch.is_autocast_enabled("cpu"), o.dtype, i[2].dtype)))
    obs = {"rgb": {"cam": torch.rand(2, T_OBS, 3, 76, 76) * 2 - 1}, "low_dim": torch.randn(2, T_OBS, LOW_DIM)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = policy.predict(obs)
        assert torch.is_autocast_enabled("cpu")  # restored for the caller
    assert seen["encoder"] == [torch.bfloat16]
    assert seen["unet"] == [(False, torch.float32, torch.float32)] * 3
    assert out.dtype == torch.float32 and out.shape == (2, CHUNK, ACT)


def test_ema_schedule_matches_hand_computation() -> None:
    model = nn.Linear(3, 2)
    model.register_buffer("counter", torch.zeros(1))
    ema = EMA(model)
    history = []
    for step in range(4):
        with torch.no_grad():
            model.weight.fill_(float(step + 1))
            model.counter.fill_(float(step))
        ema.update(model)
        history.append(ema.module.weight[0, 0].item())
    d2 = 1 - 2**-0.75  # third update: k = 1 -> 1 - (1 + 1) ** -0.75
    d3 = 1 - 3**-0.75
    expected_2 = d2 * 2.0 + (1 - d2) * 3.0
    expected_3 = d3 * expected_2 + (1 - d3) * 4.0
    assert history[:2] == [1.0, 2.0]  # decay is 0 for the first two updates
    assert history[2] == pytest.approx(expected_2, rel=1e-6)
    assert history[3] == pytest.approx(expected_3, rel=1e-6)
    assert ema.decay == pytest.approx(d3)
    assert ema.module.counter.item() == 3.0

    fresh = nn.Linear(3, 2)
    fresh.register_buffer("counter", torch.zeros(1))
    restored = EMA(fresh)
    restored.load_state_dict(ema.state_dict())
    assert restored.step == 4
    assert torch.equal(restored.module.weight, ema.module.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


class MixtureDenoiser(nn.Module):
    """The exact denoiser of a 1-D Gaussian mixture under DDPM noising (no parameters, nothing learnt).

    With ``x_t = sqrt(a) x_0 + sqrt(1 - a) eps`` and ``x_0 ~ sum_k w_k N(mu_k, s_k^2)``, the noisy
    marginal is ``sum_k w_k N(sqrt(a) mu_k, a s_k^2 + 1 - a)``; its posterior mean gives the
    optimal epsilon prediction ``E[eps | x_t] = (x_t - sqrt(a) E[x_0 | x_t]) / sqrt(1 - a)``.
    """

    def __init__(self, alphas_cumprod: Tensor, weights: list[float], means: list[float], stds: list[float],
                 prediction_type: str) -> None:
        super().__init__()
        self.abar = alphas_cumprod.double()
        self.w, self.mu, self.s = (torch.tensor(v, dtype=torch.float64) for v in (weights, means, stds))
        self.prediction_type = prediction_type

    def forward(self, sample: Tensor, timestep: Tensor, global_cond: Tensor) -> Tensor:
        x = sample.double()  # (B, 1, 1)
        a = self.abar[timestep].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        var = a * self.s**2 + 1 - a  # (B, 1, 1, K) variance of each component at x_t
        log_r = torch.log(self.w) - 0.5 * (x[..., None] - a.sqrt() * self.mu) ** 2 / var - 0.5 * var.log()
        r = torch.softmax(log_r, dim=-1)  # (B, 1, 1, K) responsibilities
        # E[x_0 | x_t, k] for a Gaussian component, then averaged over components.
        x0_k = self.mu + a.sqrt() * self.s**2 / var * (x[..., None] - a.sqrt() * self.mu)
        x0 = (r * x0_k).sum(-1)  # (B, 1, 1)
        out = x0 if self.prediction_type == "sample" else (x - a[..., 0].sqrt() * x0) / (1 - a[..., 0]).sqrt()
        return out.to(sample.dtype)


class ZeroEncoder(nn.Module):
    """An unconditional policy's observation encoder: one zero feature per sample."""

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.zeros(batch["low_dim"].shape[0], 1, 1)  # (B, T_obs=1, F=1)


def mixture_samples(sampler: str, steps: int, prediction_type: str, n: int = 8000) -> Tensor:
    """``n`` actions ``(n,)`` sampled by DiffusionPolicy with the exact denoiser of ``MIXTURE``."""
    policy = DiffusionPolicy(ZeroEncoder(), nn.Identity(), 1, 1, sampler=sampler, num_inference_steps=steps,
                             prediction_type=prediction_type)
    policy.noise_net = MixtureDenoiser(policy.train_scheduler.alphas_cumprod, *MIXTURE, prediction_type)
    assert len(policy.sample_scheduler.timesteps) == (100 if sampler == "ddpm" else steps)
    torch.manual_seed(0)
    return policy.predict({"low_dim": torch.zeros(n, 1, 1)}).flatten().double()


MIXTURE = ([0.3, 0.7], [-0.5, 0.4], [0.08, 0.12])  # weights, means, stds: two modes inside [-1, 1]


def moments(x: Tensor) -> dict[str, float]:
    """Mean, variance, the right mode's weight, and each mode's mean and std (the modes split at 0)."""
    right = x > 0
    return {"mean": x.mean().item(), "var": x.var().item(), "weight": right.double().mean().item(),
            "mean0": x[~right].mean().item(), "std0": x[~right].std().item(),
            "mean1": x[right].mean().item(), "std1": x[right].std().item()}


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_ddim_and_ddpm_sample_a_known_mixture(prediction_type: str) -> None:
    """With the exact denoiser, DDPM (100 steps) and DDIM (100 steps) draw the mixture: its mean,
    variance, mode weights and each mode's mean and spread. DDIM with the paper's 10 steps keeps the
    mean and the mode weights; its coarse grid spreads the modes, an error that shrinks with more
    steps (measured: variance 0.157 at 10 steps, 0.171 at 20, 0.181 at 100, against 0.182)."""
    weights, means, stds = MIXTURE
    mean = sum(w * m for w, m in zip(weights, means))
    var = sum(w * (s**2 + m**2) for w, m, s in zip(weights, means, stds)) - mean**2
    truth = {"mean": mean, "var": var, "weight": weights[1], "mean0": means[0], "std0": stds[0],
             "mean1": means[1], "std1": stds[1]}
    # Standard errors at n = 8000: mean 0.005, variance 0.002, weight 0.005, a mode's mean and std <= 0.002.
    tight = {"mean": 0.02, "var": 0.01, "weight": 0.02, "mean0": 0.015, "std0": 0.015, "mean1": 0.015, "std1": 0.015}
    ddpm, ddim100, ddim10 = (moments(mixture_samples(s, k, prediction_type)) for s, k in
                             (("ddpm", 100), ("ddim", 100), ("ddim", 10)))
    for name, got in (("ddpm", ddpm), ("ddim100", ddim100)):
        for key, bound in tight.items():
            assert abs(got[key] - truth[key]) < bound, (name, key, got[key], truth[key])
    assert abs(ddim10["mean"] - ddpm["mean"]) < 0.02 and abs(ddim10["weight"] - ddpm["weight"]) < 0.02
    assert abs(ddim10["mean0"] - means[0]) < 0.1 and abs(ddim10["mean1"] - means[1]) < 0.05
    assert abs(ddim10["var"] - var) < 0.04
    assert abs(ddim10["var"] - var) > abs(ddim100["var"] - var)
