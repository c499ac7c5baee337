"""Per-step observation encoder: an image encoder per camera (or one shared), low-dim state and the instruction.

Follows Diffusion Policy's multi-image observation encoder (Chi et al., RSS 2023,
github.com/real-stanford/diffusion_policy, `MultiImageObsEncoder`): each camera has its own
ResNet-18 + spatial-softmax encoder (`share_rgb_model=False`, the default) or all cameras share one
(`share_rgb_model=True`), and the per-camera features are concatenated with the low-dim
observation at every observation step. Cameras may differ in size: spatial softmax pools any
feature map to one vector. A language-conditioned policy also gets the instruction embedding
`lang_emb` at every step.

`forward` gives the flat per-step vector `(B, T, out_dim)` that the UNet's FiLM condition is built
from; `tokens` gives `(B, T, N_tokens, token_dim)`, one token per camera, one for the low-dim state
and one for the instruction, for heads that attend to tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mimictest.nets.vision import ResNet18SpatialSoftmax
from mimictest.recipe import Recorded


class ObsEncoder(Recorded, nn.Module):
    """`{"rgb": {cam: (B, T, 3, H_c, W_c)}, "low_dim": (B, T, D), "lang_emb": (B, D_lang)}` -> `(B, T, out_dim)`.

    Args:
        cams: camera names, in order (empty: no `rgb` key is expected).
        low_dim_dim: `D` (0: no `low_dim` key is expected).
        lang_dim: `D_lang` of `lang_emb` (0: the policy takes no instruction).
        share_trunk: one ResNet-18 for every camera instead of one per camera.
        num_kp, feature_dim: spatial-softmax keypoints and the per-camera feature size.
        token_dim: the size of each token from `tokens` (each part is projected to it), or `None`
            when only the flat features are used.
    """

    def __init__(self, cams: list[str] | tuple[str, ...], low_dim_dim: int, lang_dim: int = 0, share_trunk: bool = False,
                 num_kp: int = 32, feature_dim: int = 64, token_dim: int | None = None) -> None:
        super().__init__()
        self.cam_names = list(cams)
        if low_dim_dim < 0 or lang_dim < 0 or len(self.cam_names) + low_dim_dim == 0:
            raise ValueError(
                f"ObsEncoder needs cameras or low-dim observations (low_dim_dim > 0), and lang_dim >= 0; "
                f"got cams={self.cam_names}, low_dim_dim={low_dim_dim}, lang_dim={lang_dim}"
            )
        self.low_dim_dim, self.lang_dim = low_dim_dim, lang_dim
        num_trunks = min(len(self.cam_names), 1) if share_trunk else len(self.cam_names)
        self.cams = nn.ModuleList(ResNet18SpatialSoftmax(num_kp, feature_dim) for _ in range(num_trunks))
        self.feature_dim = feature_dim
        self.out_dim = len(self.cam_names) * feature_dim + low_dim_dim + lang_dim
        self.token_proj = None
        if token_dim is not None:
            parts = [feature_dim] * len(self.cam_names) + [d for d in (low_dim_dim, lang_dim) if d]
            self.token_proj = nn.ModuleList(nn.Linear(d, token_dim) for d in parts)
            self.num_tokens = len(parts)

    def _parts(self, batch: dict) -> list[Tensor]:
        """Per-step features: each camera's `(B, T, feature_dim)`, then `(B, T, D)`, then `(B, T, D_lang)`."""
        parts = []
        if self.cam_names:
            rgb = batch.get("rgb")
            if not isinstance(rgb, dict) or any(cam not in rgb for cam in self.cam_names):
                got = sorted(rgb) if isinstance(rgb, dict) else type(rgb).__name__
                raise ValueError(f"batch['rgb'] must be {{camera: (B, T, 3, H, W)}} with cameras {self.cam_names}, got "
                                 f"{got}; run the Preprocessor first and list the same cameras in both")
            for i, cam in enumerate(self.cam_names):
                images = rgb[cam]
                if images.ndim != 5 or images.shape[2] != 3:
                    raise ValueError(f"batch['rgb'][{cam!r}] must be (B, T, 3, H, W), got {tuple(images.shape)}")
                encoder = self.cams[i % len(self.cams)]
                parts.append(encoder(images.flatten(0, 1)).unflatten(0, images.shape[:2]))  # (B, T, feature_dim)
        steps = parts[0].shape[1] if parts else None
        if self.low_dim_dim > 0:
            low_dim = batch.get("low_dim")
            if low_dim is None or low_dim.ndim != 3 or low_dim.shape[-1] != self.low_dim_dim:
                got = None if low_dim is None else tuple(low_dim.shape)
                raise ValueError(
                    f"batch['low_dim'] must be (B, T, {self.low_dim_dim}), got {got}; "
                    "set low_dim_dim to the concatenated low-dim observation size"
                )
            parts.append(low_dim)
            steps = low_dim.shape[1]
        if self.lang_dim > 0:
            lang = batch.get("lang_emb")
            if lang is None or lang.ndim != 2 or lang.shape[1] != self.lang_dim:
                got = None if lang is None else tuple(lang.shape)
                raise ValueError(
                    f"this policy is conditioned on instructions: batch['lang_emb'] must be (B, {self.lang_dim}), got "
                    f"{got}; train on a dataset with instructions (a 'lang' per episode) or build it with lang_dim=0"
                )
            parts.append(lang[:, None].expand(-1, steps, -1))  # (B, T, D_lang)
        return parts

    def forward(self, batch: dict) -> Tensor:
        """Encode every observation step of `batch` -> `(B, T, out_dim)`."""
        parts = self._parts(batch)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def tokens(self, batch: dict) -> Tensor:
        """Encode every observation step of `batch` as tokens -> `(B, T, num_tokens, token_dim)`."""
        if self.token_proj is None:
            raise ValueError("ObsEncoder.tokens needs token_dim; build the encoder with token_dim=<size>")
        parts = self._parts(batch)
        return torch.stack([proj(part) for proj, part in zip(self.token_proj, parts)], dim=2)
