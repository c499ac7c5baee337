"""ACT: action chunks from a conditional VAE, trained with L1 reconstruction plus a weighted KL term.

Zhao et al., "Learning Fine-Grained Bimanual Manipulation with Low-Cost Hardware", RSS 2023
(github.com/tonyzhaozh/act ``policy.py``, ``detr/main.py``; huggingface/lerobot
``policies/act``). Loss: L1 between predicted and demonstrated normalised actions over the
non-padded steps, plus ``kl_weight`` (ACT: 10) times KL(posterior || N(0, I)) summed over the
32 latent dimensions and averaged over the batch. ACT averages the masked L1 over every entry,
padded ones included; this follows LeRobot's current code and averages over the valid entries
only, so chunks near episode ends are not down-weighted. Optimiser (ACT): AdamW, lr 1e-5, a
separate backbone lr of 1e-5 (``param_groups``), weight decay 1e-4, no LR schedule, no EMA.
At inference the latent is zero and the prediction is deterministic in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mimictest.nets.act import ACT
from mimictest.policies.base import Policy


class ACTPolicy(Policy):
    """Wraps the `ACT` network with its training loss and inference call."""

    def __init__(self, net: ACT, kl_weight: float = 10.0) -> None:
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.net = net
        self.kl_weight = kl_weight

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`batch` with `action (B, chunk, A)` and `is_pad (B, chunk)` -> `{"total_loss", "l1", "kl"}`."""
        action, is_pad = batch.get("action"), batch.get("is_pad")
        if action is None or is_pad is None:
            raise ValueError(
                f"ACT's loss needs batch['action'] (B, chunk, A) and batch['is_pad'] (B, chunk); got keys {sorted(batch)}"
            )
        action = action.float()
        pred, mu, logvar = self.net(batch, action, is_pad)  # (B, chunk, A), (B, L), (B, L)
        valid = (~is_pad.bool()).unsqueeze(-1).float()  # (B, chunk, 1)
        abs_err = (pred.float() - action).abs() * valid
        l1 = abs_err.sum() / (valid.sum() * action.shape[-1]).clamp(min=1.0)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(-1).mean()
        total = l1 + self.kl_weight * kl
        return {"total_loss": total, "l1": l1.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Action chunk `(B, chunk, A)` in normalised model space, with the latent at zero."""
        return self.net(batch)[0].float()

    def param_groups(self, lr_backbone: float) -> list[dict]:
        """AdamW groups: the ResNet at `lr_backbone`, everything else at the optimiser's `lr` (ACT)."""
        backbone = self.net.backbone_parameters()
        in_backbone = {id(p) for p in backbone}
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in in_backbone]}]
        if backbone:
            groups.append({"params": backbone, "lr": lr_backbone})
        return groups
