"""Per-step observation encoder: one image encoder per camera, concatenated with low-dim state.

Follows Diffusion Policy's multi-image observation encoder (Chi et al., RSS 2023,
github.com/real-stanford/diffusion_policy, `MultiImageObsEncoder` with `share_rgb_model=False`):
each camera has its own ResNet-18 + spatial-softmax encoder, and the per-camera features are
concatenated with the low-dim observation at every observation step.
"""

import torch
from torch import Tensor, nn

from mimictest.nets.vision import ResNet18SpatialSoftmax


class ObsEncoder(nn.Module):
    """`{"rgb": (B, T, cams, 3, H, W), "low_dim": (B, T, D)}` -> `(B, T, out_dim)`.

    `num_cams=0` means no `rgb` key is expected (pure low-dim: the output is `low_dim`);
    `low_dim_dim=0` means no `low_dim` key is expected.
    """

    def __init__(self, num_cams: int, low_dim_dim: int, num_kp: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        if num_cams < 0 or low_dim_dim < 0 or num_cams + low_dim_dim == 0:
            raise ValueError(
                f"ObsEncoder needs num_cams >= 0, low_dim_dim >= 0 and at least one of them > 0; "
                f"got num_cams={num_cams}, low_dim_dim={low_dim_dim}"
            )
        self.num_cams = num_cams
        self.low_dim_dim = low_dim_dim
        self.cams = nn.ModuleList(ResNet18SpatialSoftmax(num_kp, feature_dim) for _ in range(num_cams))
        self.out_dim = num_cams * feature_dim + low_dim_dim

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Encode every observation step of `batch` -> `(B, T, out_dim)`."""
        feats = []
        if self.num_cams > 0:
            rgb = batch.get("rgb")
            if rgb is None or rgb.ndim != 6 or rgb.shape[2] != self.num_cams or rgb.shape[3] != 3:
                got = None if rgb is None else tuple(rgb.shape)
                raise ValueError(
                    f"batch['rgb'] must be (B, T, {self.num_cams}, 3, H, W) float in [-1, 1], got {got}; "
                    "run the Preprocessor first or set num_cams to the number of cameras"
                )
            batch_size, steps = rgb.shape[:2]
            for cam, encoder in enumerate(self.cams):
                images = rgb[:, :, cam].flatten(0, 1)  # (B*T, 3, H, W)
                feats.append(encoder(images).unflatten(0, (batch_size, steps)))  # (B, T, feature_dim)
        if self.low_dim_dim > 0:
            low_dim = batch.get("low_dim")
            if low_dim is None or low_dim.ndim != 3 or low_dim.shape[-1] != self.low_dim_dim:
                got = None if low_dim is None else tuple(low_dim.shape)
                raise ValueError(
                    f"batch['low_dim'] must be (B, T, {self.low_dim_dim}), got {got}; "
                    "set low_dim_dim to the concatenated low-dim observation size"
                )
            feats.append(low_dim)
        return torch.cat(feats, dim=-1) if len(feats) > 1 else feats[0]  # (B, T, out_dim)
