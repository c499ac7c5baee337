"""Exponential moving average of a model's weights with Diffusion Policy's warm-up schedule.

Chi et al., RSS 2023 (github.com/real-stanford/diffusion_policy, `EMAModel`, after
@crowsonkb's schedule): at optimisation step n, with k = max(0, n - update_after_step - 1),
decay = 0 if k == 0 else clamp(1 - (1 + k / inv_gamma) ** -power, min_value, max_value).
Defaults from the paper's configs: inv_gamma=1, power=0.75, min_value=0, max_value=0.9999,
update_after_step=0. Trainable floating-point parameters are averaged; frozen parameters and
buffers are copied.
"""

import copy

import torch
from torch import Tensor, nn


class EMA:
    """Holds `module`, an averaged copy of a model, for evaluation and checkpointing."""

    def __init__(
        self,
        model: nn.Module,
        power: float = 0.75,
        inv_gamma: float = 1.0,
        min_value: float = 0.0,
        max_value: float = 0.9999,
        update_after_step: int = 0,
    ) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.power = power
        self.inv_gamma = inv_gamma
        self.min_value = min_value
        self.max_value = max_value
        self.update_after_step = update_after_step
        self.step = 0
        self.decay = 0.0

    def get_decay(self, step: int) -> float:
        """Decay used by the update at optimisation step `step` (0-based)."""
        k = max(0, step - self.update_after_step - 1)
        if k == 0:
            return 0.0
        value = 1.0 - (1.0 + k / self.inv_gamma) ** -self.power
        return max(self.min_value, min(value, self.max_value))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights and copy its buffers."""
        self.decay = self.get_decay(self.step)
        averaged: list[Tensor] = []
        current: list[Tensor] = []
        copied: list[Tensor] = []
        sources: list[Tensor] = []
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            if name not in ema_params:
                raise KeyError(f"EMA copy has no parameter {name!r}; build EMA from the same model you update it with")
            if param.requires_grad:
                averaged.append(ema_params[name])
                current.append(param.detach())
            else:
                copied.append(ema_params[name])
                sources.append(param.detach())
        ema_buffers = dict(self.module.named_buffers())
        for name, buf in model.named_buffers():
            copied.append(ema_buffers[name])
            sources.append(buf)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay)  # ema = decay*ema + (1-decay)*param
        if copied:
            torch._foreach_copy_(copied, sources)
        self.step += 1

    def state_dict(self) -> dict:
        """Averaged weights plus the step count."""
        return {"module": self.module.state_dict(), "step": self.step, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.module.load_state_dict(state["module"])
        self.step = int(state["step"])
        self.decay = float(state["decay"])
