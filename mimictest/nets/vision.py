"""ResNet-18 + spatial-softmax image encoder.

The visual backbone of Diffusion Policy's robomimic image configs (Chi et al., RSS 2023,
github.com/real-stanford/diffusion_policy, `obs_encoder_group_norm=True`), itself built from
robomimic's `ResNet18Conv` + `SpatialSoftmax` + `Linear` core (Mandlekar et al., CoRL 2021):
torchvision ResNet-18 trained from scratch with every BatchNorm swapped for GroupNorm
(channels // 16 groups), avgpool and fc dropped, a learned 1x1 conv to `num_kp=32` keypoint heat
maps, a softmax over space giving expected (x, y) coordinates in [-1, 1], then a Linear to
`feature_dim=64`.

`resnet18_trunk` is that ResNet-18 without its head, shared with ACT, which can also use ACT's
ImageNet-initialised variant with frozen BatchNorm.
"""

import os

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn


def _group_norm(channels: int) -> nn.GroupNorm:
    """The ResNet's norm layer: GroupNorm with 16 channels per group."""
    return nn.GroupNorm(channels // 16, channels)


class ConvFrozenBN(nn.Module):
    """A convolution followed by a frozen BatchNorm, computed as one convolution with scaled weights.

    `conv(x) * scale + shift == conv_{W * scale}(x) + shift`, so the BatchNorm costs nothing at the
    activations' resolution (ACT's 480x640 stem maps are 64 x 240 x 320 per image). The convolution
    weights stay trainable and the statistics frozen, exactly as with separate layers.
    """

    def __init__(self, conv: nn.Conv2d, bn: torchvision.ops.FrozenBatchNorm2d) -> None:
        super().__init__()
        if conv.bias is not None:
            raise ValueError("ConvFrozenBN expects a bias-free convolution, as in torchvision's ResNets")
        self.conv, self.bn = conv, bn

    def forward(self, x: Tensor) -> Tensor:
        """`(N, C_in, H, W)` -> `(N, C_out, H', W')`."""
        bn, conv = self.bn, self.conv
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C_out,)
        shift = bn.bias - bn.running_mean * scale  # (C_out,)
        return F.conv2d(x, conv.weight * scale[:, None, None, None], shift, conv.stride, conv.padding, conv.dilation,
                        conv.groups)


def _fold_frozen_batchnorms(resnet: torchvision.models.ResNet) -> None:
    """Replace each convolution -> FrozenBatchNorm2d pair of a torchvision ResNet by a `ConvFrozenBN`."""
    pairs = [(resnet, "conv1", "bn1")]
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in layer:
            pairs += [(block, "conv1", "bn1"), (block, "conv2", "bn2")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv, bn in pairs:
        setattr(parent, conv, ConvFrozenBN(getattr(parent, conv), getattr(parent, bn)))
        setattr(parent, bn, nn.Identity())


BACKBONE_NORMS = ("group", "frozen_batch")


def resnet18_trunk(norm: str = "group", weights: str | None = None) -> nn.Sequential:
    """Torchvision ResNet-18 up to layer4: `(N, 3, H, W)` -> `(N, 512, ceil(H/32), ceil(W/32))`.

    Args:
        norm: ``"group"`` (GroupNorm, trained from scratch) or ``"frozen_batch"`` (ACT's frozen BatchNorm).
        weights: a local torchvision ResNet-18 state dict (e.g. ``resnet18-f37072fd.pth``, ImageNet),
            only with ``norm="frozen_batch"``; ``None`` starts from random weights.
    """
    if norm not in BACKBONE_NORMS:
        raise ValueError(f"backbone_norm must be one of {BACKBONE_NORMS}, got {norm!r}")
    if weights is not None and norm != "frozen_batch":
        raise ValueError("pretrained ResNet weights carry BatchNorm statistics: set backbone_norm='frozen_batch'")
    frozen = torchvision.ops.FrozenBatchNorm2d
    resnet = torchvision.models.resnet18(weights=None, norm_layer=_group_norm if norm == "group" else frozen)
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"no ResNet-18 weights at {weights!r}: download torchvision's resnet18-f37072fd.pth (ImageNet) "
                "to this path, or set BACKBONE_WEIGHTS = None to train the ResNet from scratch"
            )
        try:
            resnet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except RuntimeError as err:
            raise ValueError(f"{weights!r} is not a torchvision ResNet-18 state dict: {err}") from err
    if norm == "frozen_batch":
        _fold_frozen_batchnorms(resnet)
    return nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool + fc


class SpatialSoftmax(nn.Module):
    """Feature map `(N, C, h, w)` -> expected keypoint coordinates `(N, num_kp * 2)` in [-1, 1]."""

    def __init__(self, in_channels: int, num_kp: int = 32) -> None:
        super().__init__()
        self.num_kp = num_kp
        self.keypoint_conv = nn.Conv2d(in_channels, num_kp, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """`(N, C, h, w)` -> `(N, num_kp * 2)` as (x, y) pairs per keypoint."""
        maps = self.keypoint_conv(x)  # (N, K, h, w)
        h, w = maps.shape[-2:]
        attn = torch.softmax(maps.flatten(2).float(), dim=-1)  # (N, K, h*w)
        ys = torch.linspace(-1.0, 1.0, h, device=x.device)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
        grid = torch.stack((grid_x.flatten(), grid_y.flatten()), dim=-1)  # (h*w, 2)
        keypoints = (attn.unsqueeze(-1) * grid).sum(dim=-2)  # (N, K, 2), fp32 even under autocast
        return keypoints.flatten(1)  # (N, K * 2)


class ResNet18SpatialSoftmax(nn.Module):
    """Image `(N, 3, H, W)` in [-1, 1] -> feature `(N, feature_dim)`."""

    def __init__(self, num_kp: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.backbone = resnet18_trunk("group")
        self.pool = SpatialSoftmax(512, num_kp)
        self.proj = nn.Linear(num_kp * 2, feature_dim)
        self.out_dim = feature_dim

    def forward(self, image: Tensor) -> Tensor:
        """`(N, 3, H, W)` -> `(N, feature_dim)`."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (N, 3, H, W), got {tuple(image.shape)}")
        feat = self.backbone(image)  # (N, 512, ceil(H/32), ceil(W/32))
        return self.proj(self.pool(feat).to(feat.dtype))
