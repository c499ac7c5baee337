"""Tests for ACT: network shapes, padding mask, CVAE at train vs. inference time, overfitting, optimiser groups."""

import math

import pytest
import torch
from torch import Tensor

from mimictest.nets.act import ACT, sinusoidal_1d, sinusoidal_2d
from mimictest.policies.act import ACTPolicy

LOW_DIM, CHUNK, ACTION = 5, 8, 10
IMAGE = 32  # ResNet-18 layer4 gives a 1x1 map: one token per camera


pytestmark = pytest.mark.usefixtures("single_thread")


def cams(num_cams: int) -> list[str]:
    return [f"cam{i}" for i in range(num_cams)]


def tiny_act(num_cams: int, low_dim_dim: int = LOW_DIM, shared_backbone: bool = True) -> ACT:
    return ACT(ACTION, CHUNK, low_dim_dim, cams(num_cams), shared_backbone=shared_backbone, d_model=32, nhead=4,
               num_encoder_layers=2, dim_feedforward=64, num_vae_encoder_layers=2, latent_dim=8)


def random_batch(batch_size: int, num_cams: int, image: int = IMAGE) -> dict:
    batch = {
        "low_dim": torch.randn(batch_size, 1, LOW_DIM),
        "action": torch.rand(batch_size, CHUNK, ACTION) * 2 - 1,
        "is_pad": torch.zeros(batch_size, CHUNK, dtype=torch.bool),
    }
    if num_cams:
        batch["rgb"] = {cam: torch.rand(batch_size, 1, 3, image, image) * 2 - 1 for cam in cams(num_cams)}
    return batch


def obs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("rgb", "low_dim")}


@pytest.mark.parametrize("num_cams, shared", [(1, True), (2, True), (2, False)])
def test_train_step_and_predict_shapes(num_cams: int, shared: bool) -> None:
    torch.manual_seed(0)
    policy = ACTPolicy(tiny_act(num_cams, shared_backbone=shared))
    assert len(policy.net.backbones) == (1 if shared else num_cams)
    batch = random_batch(3, num_cams, image=40)  # layer4: 2x2 tokens per camera
    batch["is_pad"][:, -3:] = True
    opt = torch.optim.AdamW(policy.param_groups(lr_backbone=1e-4), lr=1e-3)
    before = policy.net.backbones[0][0].weight.clone()
    losses = policy(batch)
    assert set(losses) == {"total_loss", "l1", "kl"}
    assert losses["total_loss"].ndim == 0 and torch.isfinite(losses["total_loss"])
    losses["total_loss"].backward()
    opt.step()
    assert not torch.equal(before, policy.net.backbones[0][0].weight), "the ResNet should be trained"

    policy.eval()
    out = policy.predict(obs(batch))
    assert out.shape == (3, CHUNK, ACTION) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_aloha_sizes_low_dim_only_and_bad_inputs() -> None:
    net = ACT(14, CHUNK, 14, cams=[], d_model=32, nhead=4, num_encoder_layers=1, dim_feedforward=64,
              num_vae_encoder_layers=1)
    pred, mu, logvar = net({"low_dim": torch.randn(2, 1, 14)}, torch.randn(2, CHUNK, 14),
                           torch.zeros(2, CHUNK, dtype=torch.bool))
    assert pred.shape == (2, CHUNK, 14) and mu.shape == logvar.shape == (2, 32)
    with pytest.raises(ValueError, match="OBS_HORIZON = 1"):
        net({"low_dim": torch.randn(2, 2, 14)})
    with pytest.raises(ValueError, match="is_pad"):
        net({"low_dim": torch.randn(2, 1, 14)}, torch.randn(2, CHUNK, 14))
    with pytest.raises(ValueError, match="rgb"):
        tiny_act(num_cams=1)({"low_dim": torch.randn(2, 1, LOW_DIM)})
    with pytest.raises(ValueError, match="is_pad"):
        ACTPolicy(tiny_act(0)).compute_loss({"low_dim": torch.randn(2, 1, LOW_DIM), "action": torch.randn(2, CHUNK, ACTION)})
    with pytest.raises(ValueError, match="needs cameras or low_dim_dim > 0"):
        ACT(ACTION, CHUNK, low_dim_dim=0, cams=[])


def test_padded_steps_do_not_affect_the_loss() -> None:
    torch.manual_seed(0)
    policy = ACTPolicy(tiny_act(num_cams=1)).eval()  # no dropout; the latent noise is reseeded below
    batch = random_batch(4, 1)
    batch["is_pad"][:, 5:] = True
    batch["is_pad"][0] = False

    def losses(b: dict[str, Tensor]) -> dict[str, Tensor]:
        torch.manual_seed(1)
        return policy.compute_loss(b)

    base = losses(batch)
    changed = {**batch, "action": batch["action"].clone()}
    changed["action"][1:, 5:] = 100.0  # padded targets, also seen (masked) by the CVAE encoder
    after = losses(changed)
    assert torch.allclose(base["l1"], after["l1"]) and torch.allclose(base["kl"], after["kl"])
    changed["action"][0, 6] = 100.0  # a valid step
    assert losses(changed)["l1"] > base["l1"] + 1.0


def test_kl_at_init_and_deterministic_inference_without_cvae() -> None:
    torch.manual_seed(0)
    net = tiny_act(num_cams=1)
    batch = random_batch(16, 1)
    _, mu, logvar = net(obs(batch), batch["action"], batch["is_pad"])
    assert mu.pow(2).mean() < 1.0 and logvar.pow(2).mean() < 1.0  # the posterior starts near N(0, I)
    kl = ACTPolicy(net).compute_loss(batch)["kl"]
    assert 0.0 < kl < net.latent_dim  # well under one nat per latent dimension

    calls = []
    net.vae_encoder.register_forward_hook(lambda *args: calls.append(1))
    policy = ACTPolicy(net).eval()
    first, second = policy.predict(obs(batch)), policy.predict(batch)  # actions in the batch are ignored
    assert not calls, "inference must not run the CVAE encoder"
    assert torch.equal(first, second)
    policy.compute_loss(batch)
    assert calls, "training runs the CVAE encoder"


def test_overfits_a_fixed_batch() -> None:
    torch.manual_seed(0)
    batch_size = 8
    sign = torch.where(torch.arange(batch_size) % 2 == 0, 1.0, -1.0)  # (B,) two observation modes
    ramp = torch.linspace(-0.8, 0.8, CHUNK)[None, :, None]  # (1, chunk, 1)
    target = (ramp * sign[:, None, None]).expand(batch_size, CHUNK, ACTION).clone()  # (B, chunk, A)
    batch = {"low_dim": sign[:, None, None].expand(batch_size, 1, LOW_DIM).clone(), "action": target,
             "is_pad": torch.zeros(batch_size, CHUNK, dtype=torch.bool)}
    policy = ACTPolicy(tiny_act(num_cams=0))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    first = None
    for _ in range(150):
        losses = policy(batch)
        opt.zero_grad()
        losses["total_loss"].backward()
        opt.step()
        first = first if first is not None else losses["l1"].item()
    assert losses["l1"].item() < 0.35 * first
    out = policy.eval().predict(obs(batch))
    assert (out - target).abs().mean() < 0.12


def test_bf16_autocast() -> None:
    torch.manual_seed(0)
    policy = ACTPolicy(tiny_act(num_cams=1))
    batch = random_batch(2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = policy(batch)
        losses["total_loss"].backward()
        out = policy.eval().predict(obs(batch))
    assert losses["total_loss"].dtype == torch.float32 and torch.isfinite(losses["total_loss"])
    assert out.dtype == torch.float32 and out.shape == (2, CHUNK, ACTION) and torch.isfinite(out).all()


def test_param_groups_split_backbone() -> None:
    policy = ACTPolicy(tiny_act(num_cams=2, shared_backbone=False))
    groups = policy.param_groups(lr_backbone=1e-5)
    assert len(groups) == 2 and groups[1]["lr"] == 1e-5 and "lr" not in groups[0]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == {id(p) for p in policy.parameters()}
    assert ids[1] == {id(p) for p in policy.net.backbones.parameters()}
    assert len(ACTPolicy(tiny_act(num_cams=0)).param_groups(1e-5)) == 1


def test_position_embeddings() -> None:
    table = sinusoidal_1d(4, 6)
    assert table.shape == (4, 6)
    assert torch.allclose(table[0], torch.tensor([0.0, 1.0] * 3))
    assert torch.allclose(table[3, :2], torch.tensor([math.sin(3.0), math.cos(3.0)]))
    assert torch.allclose(table[3, 4:], torch.tensor([math.sin(3.0 / 10000 ** (4 / 6)), math.cos(3.0 / 10000 ** (4 / 6))]))
    grid = sinusoidal_2d(2, 3, 8)  # rows first, then columns; positions scaled to (0, 2 pi]
    assert grid.shape == (6, 8)
    assert torch.allclose(grid[:, :4].reshape(2, 3, 4)[:, 0], grid[:, :4].reshape(2, 3, 4)[:, 2])  # same row
    assert torch.allclose(grid[:, 4:].reshape(2, 3, 4)[0], grid[:, 4:].reshape(2, 3, 4)[1])  # same column
    assert torch.allclose(grid[5, 4:6], torch.tensor([0.0, 1.0]), atol=1e-4)  # last column: angle 2 pi


def test_frozen_batchnorm_trunk_loads_torchvision_weights(tmp_path) -> None:
    """A torchvision ResNet-18 file loads into the frozen-BatchNorm trunk, which then matches eval-mode BatchNorm."""
    import torchvision

    from mimictest.nets.vision import resnet18_trunk

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics, as ImageNet weights have
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    trunk = resnet18_trunk("frozen_batch", str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(reference.eval().children())[:-2])(x)
        torch.testing.assert_close(trunk(x), expected, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = trunk.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16, "frozen BatchNorm must not promote bf16 activations to fp32"
    trainable = {n for n, _ in trunk.named_parameters()}
    assert trainable and all(n.endswith("conv.weight") for n in trainable), "only convolutions train; BatchNorm is frozen"

    with pytest.raises(ValueError, match="frozen_batch"):
        resnet18_trunk("group", str(path))
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd"):
        resnet18_trunk("frozen_batch", str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision ResNet-18"):
        resnet18_trunk("frozen_batch", str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="backbone_norm"):
        resnet18_trunk("batch")


def test_act_with_pretrained_backbone_trains(tmp_path) -> None:
    """ACT with a frozen-BatchNorm backbone from a weights file trains its convolutions, not its statistics."""
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    policy = ACTPolicy(ACT(ACTION, CHUNK, LOW_DIM, cams(1), backbone_norm="frozen_batch", backbone_weights=str(path),
                           d_model=32, nhead=4, num_encoder_layers=1, dim_feedforward=64, num_vae_encoder_layers=1,
                           latent_dim=8))
    stem = policy.net.backbones[0][0]  # conv1 with bn1 folded in
    stats, conv = stem.bn.running_mean.clone(), stem.conv.weight.clone()
    opt = torch.optim.AdamW(policy.param_groups(lr_backbone=1e-3), lr=1e-3)
    policy(random_batch(2, 1))["total_loss"].backward()
    opt.step()
    assert torch.equal(stats, stem.bn.running_mean)
    assert not torch.equal(conv, stem.conv.weight)
