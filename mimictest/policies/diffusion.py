"""Diffusion Policy: DDPM training and DDPM/DDIM sampling of action chunks.

Chi et al., "Diffusion Policy: Visuomotor Policy Learning via Action Diffusion", RSS 2023
(reference code: github.com/real-stanford/diffusion_policy, `DiffusionUnetHybridImagePolicy` /
`DiffusionUnetLowdimPolicy`). Paper defaults: 100 training diffusion steps with the
`squaredcos_cap_v2` schedule, clipped samples, epsilon prediction, observation horizon 2,
prediction horizon 16, 8 executed actions, DDPM sampling with all 100 steps in simulation and DDIM
with 10 steps for fast (real-robot) inference, observations used as a global FiLM condition
(features of all observation steps flattened), AdamW lr 1e-4, EMA with power 0.75.
"""

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from mimictest.policies.base import Policy


class DiffusionPolicy(Policy):
    """Denoise an action chunk `(B, chunk, A)` conditioned on encoded observations.

    `obs_encoder(batch) -> (B, T_obs, F)`; `noise_net(sample (B, chunk, A), timestep (B,),
    global_cond (B, T_obs * F)) -> (B, chunk, A)` predicting the noise (`prediction_type="epsilon"`)
    or the clean chunk (`"sample"`). `sampler` picks DDPM (all `num_train_timesteps` steps) or DDIM
    (`num_inference_steps` steps) at inference. With `mask_padding=True` the loss ignores steps
    whose `is_pad` is True.
    """

    def __init__(
        self,
        obs_encoder: nn.Module,
        noise_net: nn.Module,
        action_dim: int,
        chunk_size: int,
        sampler: Literal["ddpm", "ddim"] = "ddpm",
        num_inference_steps: int = 10,
        num_train_timesteps: int = 100,
        prediction_type: Literal["epsilon", "sample"] = "epsilon",
        mask_padding: bool = False,
    ) -> None:
        super().__init__()
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'sample', got {prediction_type!r}")
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], "
                f"got {num_inference_steps}"
            )
        self.obs_encoder = obs_encoder
        self.noise_net = noise_net
        self.action_dim = action_dim
        self.chunk_size = chunk_size
        self.prediction_type = prediction_type
        self.mask_padding = mask_padding
        self.num_train_timesteps = num_train_timesteps
        schedule = dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule="squaredcos_cap_v2",
            clip_sample=True,
            prediction_type=prediction_type,
        )
        self.train_scheduler = DDPMScheduler(variance_type="fixed_small", **schedule)
        if sampler == "ddpm":
            self.sample_scheduler = DDPMScheduler(variance_type="fixed_small", **schedule)
            self.sample_scheduler.set_timesteps(num_train_timesteps)
        else:
            self.sample_scheduler = DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **schedule)
            self.sample_scheduler.set_timesteps(num_inference_steps)
        self.sampler = sampler

    def with_sampler(self, sampler: Literal["ddpm", "ddim"], num_inference_steps: int) -> "DiffusionPolicy":
        """The same networks (shared, not copied) and training settings behind another sampler.

        Sampling is not part of training, so a policy trained once can be evaluated with DDPM and
        DDIM (``python -m mimictest.evaluate POLICY_DIR --sampler ddim --inference-steps 10``).
        """
        return DiffusionPolicy(self.obs_encoder, self.noise_net, self.action_dim, self.chunk_size, sampler=sampler,
                               num_inference_steps=num_inference_steps, num_train_timesteps=self.num_train_timesteps,
                               prediction_type=self.prediction_type, mask_padding=self.mask_padding)

    def _global_cond(self, batch: dict[str, Tensor]) -> Tensor:
        """Encode the observations once -> `(B, T_obs * F)`."""
        return self.obs_encoder(batch).flatten(1)

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Denoising loss on `batch["action"] (B, chunk, A)` -> `{"total_loss", "mse"}`."""
        action = batch.get("action")
        if action is None or action.shape[1:] != (self.chunk_size, self.action_dim):
            got = None if action is None else tuple(action.shape)
            raise ValueError(f"batch['action'] must be (B, {self.chunk_size}, {self.action_dim}), got {got}")
        action = action.float()
        cond = self._global_cond(batch)  # (B, T_obs * F)
        noise = torch.randn_like(action)  # (B, chunk, A)
        timesteps = torch.randint(0, self.num_train_timesteps, (action.shape[0],), device=action.device)
        noisy = self.train_scheduler.add_noise(action, noise, timesteps)  # fp32 scheduler arithmetic
        pred = self.noise_net(noisy, timesteps, cond).float()  # (B, chunk, A)
        target = noise if self.prediction_type == "epsilon" else action
        if self.mask_padding:
            is_pad = batch.get("is_pad")
            if is_pad is None or is_pad.shape != action.shape[:2]:
                got = None if is_pad is None else tuple(is_pad.shape)
                raise ValueError(f"mask_padding needs batch['is_pad'] of shape {tuple(action.shape[:2])}, got {got}")
            valid = (~is_pad).unsqueeze(-1).float()  # (B, chunk, 1)
            sq_err = F.mse_loss(pred, target, reduction="none") * valid
            mse = sq_err.sum() / (valid.sum() * self.action_dim).clamp(min=1.0)
        else:
            mse = F.mse_loss(pred, target)
        return {"total_loss": mse, "mse": mse.detach()}

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Sample an action chunk `(B, chunk, A)` in [-1, 1] from the observations in `batch`.

        Under a caller's bf16 autocast, the observation encoder runs in bf16; on the CPU the
        denoising passes run in fp32 all the same. There, at sampling batch sizes (B * chunk rows),
        oneDNN's bf16 matmuls are slower than fp32 ones: one pass of the small PushT UNet at batch 1
        takes 7.4 ms under autocast and 3.6 ms in fp32, while the ResNet's convolutions are 2.5x
        faster in bf16 (`python -m mimictest.bench infer --precision both` shows whole chunks).
        """
        cond = self._global_cond(batch).float()  # (B, T_obs * F), computed once per chunk
        sample = torch.randn(cond.shape[0], self.chunk_size, self.action_dim, device=cond.device)
        scheduler = self.sample_scheduler
        on_cpu = cond.device.type == "cpu"
        with torch.autocast("cpu", enabled=False) if on_cpu else contextlib.nullcontext():
            for t in scheduler.timesteps.tolist():
                timesteps = torch.full((cond.shape[0],), t, device=cond.device, dtype=torch.long)
                model_out = self.noise_net(sample, timesteps, cond).float()  # (B, chunk, A)
                sample = scheduler.step(model_out, t, sample).prev_sample  # fp32
        return sample.clamp(-1.0, 1.0)
