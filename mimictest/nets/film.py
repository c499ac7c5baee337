"""RT-1's image tokenizer: a torchvision EfficientNet with a FiLM layer after every MBConv block.

Brohan et al. 2022, "RT-1: Robotics Transformer for Real-World Control at Scale"
(github.com/google-research/robotics_transformer, ``film_efficientnet/``): an ImageNet
EfficientNet-B3 whose MBConv blocks are each followed by FiLM (Perez et al. 2018) on the
instruction embedding, then a 1x1 convolution to 512 channels followed by one more FiLM layer. The
FiLM projections start at zero and scale by ``1 + gamma``, so at initialisation every FiLM layer is
the identity and a pretrained EfficientNet computes exactly its ImageNet features.

Here the trunk is torchvision's ``efficientnet_b0`` .. ``b3`` or ``efficientnet_v2_s`` (whose early
blocks are Fused-MBConv; they get FiLM too). ``cond_dim=0`` builds no FiLM layers (RT-1 without
an instruction); calling with ``cond=None`` skips them.

Normalisation: RT-1 fine-tunes ImageNet BatchNorm. ``norm="frozen_batch"`` keeps the ImageNet
statistics fixed (as ACT does with its ResNet), which is also what makes a frozen vision tower
truly frozen; ``"batch"`` trains BatchNorm as RT-1 does; ``"group"`` (the default without weights)
trains the trunk from scratch with GroupNorm, Diffusion Policy's choice for from-scratch encoders
(no running statistics, no train/eval gap at small batches).
"""

from __future__ import annotations

import math
import os

import torch
import torchvision
from torch import Tensor, nn

EFFICIENTNETS = ("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_s")
NORMS = ("group", "batch", "frozen_batch")
_WEIGHT_FILES = {  # torchvision's ImageNet files, for the error message when one is missing
    "efficientnet_b0": "efficientnet_b0_rwightman-7f5810bc.pth",
    "efficientnet_b1": "efficientnet_b1-c27df63c.pth",
    "efficientnet_b2": "efficientnet_b2_rwightman-c35c1473.pth",
    "efficientnet_b3": "efficientnet_b3_rwightman-b3899882.pth",
    "efficientnet_v2_s": "efficientnet_v2_s-dd5fe13b.pth",
}


class FiLM(nn.Module):
    """Feature-wise linear modulation, identity at initialisation: `(1 + gamma(c)) * x + beta(c)`.

    `x (N, C, H, W)` or `(N, C)`, `cond (N, cond_dim)` -> same shape as `x`.
    """

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.mult = nn.Linear(cond_dim, channels)
        self.add = nn.Linear(cond_dim, channels)
        for layer in (self.mult, self.add):  # RT-1: zero kernels and biases
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        gamma, beta = self.mult(cond).to(x.dtype), self.add(cond).to(x.dtype)  # (N, C) each
        if x.ndim == 4:
            gamma, beta = gamma[:, :, None, None], beta[:, :, None, None]
        return x * (1 + gamma) + beta


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups; every EfficientNet width is a multiple of 8."""
    return nn.GroupNorm(math.gcd(channels, 32), channels)


def _replace_batchnorms(module: nn.Module, norm: str) -> None:
    """Swap every ``BatchNorm2d`` below `module` for GroupNorm, or for a frozen copy of its statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            if norm == "group":
                new = _group_norm(child.num_features)
            else:
                new = torchvision.ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(new, key).copy_(getattr(child, key).detach())
            setattr(module, name, new)
        else:
            _replace_batchnorms(child, norm)


def efficientnet_trunk(arch: str, norm: str = "group", weights: str | None = None) -> nn.Sequential:
    """Torchvision EfficientNet's ``features``: `(N, 3, H, W)` -> `(N, C_last, ceil(H/32), ceil(W/32))`.

    Args:
        arch: one of `EFFICIENTNETS`.
        norm: one of `NORMS` (see the module docstring).
        weights: a local torchvision ImageNet state dict for `arch` (e.g.
            ``efficientnet_b3_rwightman-b3899882.pth``), or ``None`` for random weights.
    """
    if arch not in EFFICIENTNETS:
        raise ValueError(f"efficientnet must be one of {EFFICIENTNETS}, got {arch!r}")
    if norm not in NORMS:
        raise ValueError(f"backbone_norm must be one of {NORMS}, got {norm!r}")
    if weights is not None and norm == "group":
        raise ValueError("ImageNet EfficientNet weights carry BatchNorm statistics: set backbone_norm='frozen_batch' "
                         "(or 'batch' to fine-tune them, as RT-1)")
    model = getattr(torchvision.models, arch)(weights=None)  # torchvision's BatchNorm (and its eps for the weights)
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no EfficientNet weights at {weights!r}: put torchvision's {_WEIGHT_FILES[arch]} "
                                    "(ImageNet) at this path, or set BACKBONE_WEIGHTS = None to train from scratch")
        try:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except RuntimeError as err:
            raise ValueError(f"{weights!r} is not a torchvision {arch} state dict: {err}") from err
    if norm != "batch":
        _replace_batchnorms(model, norm)
    return model.features


class FiLMEfficientNet(nn.Module):
    """Image `(N, 3, H, W)` in [-1, 1] and condition `(N, cond_dim)` -> feature map `(N, out_dim, h, w)`.

    Args:
        arch, norm, weights: the trunk (`efficientnet_trunk`). With weights, images are normalised
            with ImageNet's mean and std, as the weights expect.
        cond_dim: size of the FiLM condition (0: no FiLM layers).
        out_dim: channels of the 1x1 projection after the trunk (RT-1: 512).
    """

    def __init__(self, arch: str = "efficientnet_b3", cond_dim: int = 0, out_dim: int = 512, norm: str = "group",
                 weights: str | None = None) -> None:
        super().__init__()
        if cond_dim < 0 or out_dim < 1:
            raise ValueError(f"cond_dim must be >= 0 and out_dim >= 1, got {cond_dim} and {out_dim}")
        self.trunk = efficientnet_trunk(arch, norm, weights)
        self.cond_dim = cond_dim
        self.imagenet_input = weights is not None
        self.register_buffer("imagenet_mean", torch.tensor([0.485, 0.456, 0.406])[:, None, None], persistent=False)
        self.register_buffer("imagenet_std", torch.tensor([0.229, 0.224, 0.225])[:, None, None], persistent=False)
        # features[0] is the stem and features[-1] the last 1x1 conv; the stages between hold the MBConv blocks.
        self._stages = range(1, len(self.trunk) - 1)
        blocks = [block for i in self._stages for block in self.trunk[i]]
        self.films = nn.ModuleList(FiLM(cond_dim, block.out_channels) for block in blocks) if cond_dim else None
        last_channels = self.trunk[-1][0].out_channels
        self.proj = nn.Conv2d(last_channels, out_dim, kernel_size=1, bias=False)  # RT-1: no bias
        self.proj_film = FiLM(cond_dim, out_dim) if cond_dim else None
        self.out_dim = out_dim

    def forward(self, image: Tensor, cond: Tensor | None = None) -> Tensor:
        """`(N, 3, H, W)`, `(N, cond_dim)` or None (FiLM skipped) -> `(N, out_dim, ceil(H/32), ceil(W/32))`."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (N, 3, H, W), got {tuple(image.shape)}")
        film = cond is not None and self.films is not None
        if film and cond.shape != (image.shape[0], self.cond_dim):
            raise ValueError(f"cond must be ({image.shape[0]}, {self.cond_dim}), got {tuple(cond.shape)}")
        x = image
        if self.imagenet_input:  # [-1, 1] -> ImageNet-normalised
            x = ((x + 1) / 2 - self.imagenet_mean.to(x.dtype)) / self.imagenet_std.to(x.dtype)
        x = self.trunk[0](x)
        k = 0
        for i in self._stages:
            for block in self.trunk[i]:
                x = block(x)
                if film:
                    x = self.films[k](x, cond)
                k += 1
        x = self.proj(self.trunk[-1](x))
        return self.proj_film(x, cond) if film else x
