"""ResNet-18 + spatial-softmax image encoder.

The visual backbone of Diffusion Policy's robomimic image configs (Chi et al., RSS 2023,
github.com/real-stanford/diffusion_policy, `obs_encoder_group_norm=True`), itself built from
robomimic's `ResNet18Conv` + `SpatialSoftmax` + `Linear` core (Mandlekar et al., CoRL 2021):
torchvision ResNet-18 trained from scratch with every BatchNorm swapped for GroupNorm
(channels // 16 groups), avgpool and fc dropped, a learned 1x1 conv to `num_kp=32` keypoint heat
maps, a softmax over space giving expected (x, y) coordinates in [-1, 1], then a Linear to
`feature_dim=64`.
"""

import torch
import torchvision
from torch import Tensor, nn


def _batchnorm_to_groupnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d inside `module` with GroupNorm(channels // 16, channels), in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(child.num_features // 16, child.num_features))
        else:
            _batchnorm_to_groupnorm(child)


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
        resnet = torchvision.models.resnet18(weights=None)
        _batchnorm_to_groupnorm(resnet)
        self.backbone = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool + fc
        self.pool = SpatialSoftmax(512, num_kp)
        self.proj = nn.Linear(num_kp * 2, feature_dim)
        self.out_dim = feature_dim

    def forward(self, image: Tensor) -> Tensor:
        """`(N, 3, H, W)` -> `(N, feature_dim)`."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (N, 3, H, W), got {tuple(image.shape)}")
        feat = self.backbone(image)  # (N, 512, ceil(H/32), ceil(W/32))
        return self.proj(self.pool(feat).to(feat.dtype))
