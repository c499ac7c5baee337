"""Time-series diffusion transformer for action-chunk denoising.

Architecture of Chi et al., "Diffusion Policy: Visuomotor Policy Learning via Action Diffusion",
RSS 2023 (reference code: github.com/real-stanford/diffusion_policy, `TransformerForDiffusion`,
itself built on minGPT): every step of the noisy action chunk is one token (Linear embedding +
learned positional embedding); the condition sequence is the sinusoidal diffusion-step token
followed by one token per observation step (Linear embedding), plus a learned positional
embedding, passed through a condition encoder (a per-token Linear-Mish-Linear MLP when
`n_cond_layers=0`, else a pre-norm `nn.TransformerEncoder`); a pre-norm GELU
`nn.TransformerDecoder` runs causal self-attention over the action tokens and cross-attention to
the condition tokens, where action step t sees the diffusion-step token and observation steps
<= t; a final LayerNorm and Linear head give the prediction. Weights are initialised as in the
reference (normal(0, 0.02) for Linear, attention in-projection and positional embeddings, zero
biases, LayerNorm ones/zeros).

Paper defaults (image PushT and robomimic): `n_layer=8`, `n_head=4`, `n_emb=256`,
`p_drop_emb=0.0`, `p_drop_attn=0.3`, `causal_attn=True`, `n_cond_layers=0`, prediction horizon
10 with 2 observation steps. Only the reference's `time_as_cond=True, obs_as_cond=True` variant
exists here: `DiffusionPolicy` always conditions on the observations.

Optimiser recipe of the reference (`DiffusionTransformerHybridImagePolicy.get_optimizer`): AdamW
with lr 1e-4, betas (0.9, 0.95), weight decay 1e-3 on this network's `optim_groups` and 1e-6 on the
observation encoder, 1000 LR warmup steps.
"""

import torch
from torch import Tensor, nn

from mimictest.nets.unet1d import SinusoidalPosEmb
from mimictest.recipe import Recorded


class DiffusionTransformer(Recorded, nn.Module):
    """Noise-prediction transformer over the steps of an action chunk.

    `forward(sample (B, T, A), timestep (B,) or scalar, global_cond (B, n_obs_steps * cond_dim))
    -> (B, T, A)` with `T == chunk_size`; `global_cond` is the flattened `(B, n_obs_steps, cond_dim)`
    per-step observation features that `DiffusionPolicy` passes.

    Recommended optimiser (Chi et al. 2023): `torch.optim.AdamW(net.optim_groups(1e-3) +
    [{"params": obs_encoder.parameters(), "weight_decay": 1e-6}], lr=1e-4, betas=(0.9, 0.95))`
    with 1000 warmup steps.

    With `causal_attn=True`, action token t attends to action tokens <= t, to the diffusion-step
    token and to observation tokens <= t (the reference's `memory_mask`). The condition encoder
    itself is unmasked, as in the reference, so with `n_cond_layers > 0` later observation steps can
    still reach earlier action steps through the encoded condition tokens.
    """

    def __init__(
        self,
        action_dim: int,
        chunk_size: int,
        n_obs_steps: int,
        cond_dim: int,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.3,
        causal_attn: bool = True,
        n_cond_layers: int = 0,
    ) -> None:
        super().__init__()
        sizes = dict(action_dim=action_dim, chunk_size=chunk_size, n_obs_steps=n_obs_steps, cond_dim=cond_dim,
                     n_layer=n_layer, n_head=n_head)
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise ValueError(f"DiffusionTransformer sizes must be >= 1; got {bad}")
        if n_cond_layers < 0:
            raise ValueError(f"n_cond_layers must be >= 0 (0 = MLP condition encoder); got {n_cond_layers}")
        if n_emb % n_head != 0 or n_emb % 2 != 0:
            raise ValueError(f"n_emb must be even and divisible by n_head; got n_emb={n_emb}, n_head={n_head}")
        self.action_dim = action_dim
        self.chunk_size = chunk_size
        self.n_obs_steps = n_obs_steps
        self.cond_dim = cond_dim
        cond_len = 1 + n_obs_steps  # diffusion-step token + one token per observation step

        self.input_emb = nn.Linear(action_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, chunk_size, n_emb))
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, cond_len, n_emb))
        self.drop = nn.Dropout(p_drop_emb)

        if n_cond_layers > 0:
            enc_layer = nn.TransformerEncoderLayer(n_emb, n_head, dim_feedforward=4 * n_emb, dropout=p_drop_attn,
                                                   activation="gelu", batch_first=True, norm_first=True)
            self.cond_encoder = nn.TransformerEncoder(enc_layer, n_cond_layers, enable_nested_tensor=False)
        else:
            self.cond_encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
        dec_layer = nn.TransformerDecoderLayer(n_emb, n_head, dim_feedforward=4 * n_emb, dropout=p_drop_attn,
                                               activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(dec_layer, n_layer)
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, action_dim)

        # Boolean masks, True = may NOT attend. Condition token s is the step token (s = 0) or observation step s - 1.
        self.causal_attn = causal_attn
        if causal_attn:
            steps = torch.arange(chunk_size)
            self.register_buffer("self_mask", steps[None, :] > steps[:, None], persistent=False)  # (T, T)
            cond_steps = torch.arange(cond_len) - 1  # (T_cond,), -1 for the step token
            self.register_buffer("memory_mask", cond_steps[None, :] > steps[:, None], persistent=False)  # (T, T_cond)
        else:
            self.self_mask = None
            self.memory_mask = None

        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)
        nn.init.normal_(self.cond_pos_emb, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Reference init: normal(0, 0.02) weights and zero biases; LayerNorm ones/zeros."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def optim_groups(self, weight_decay: float = 1e-3) -> list[dict]:
        """AdamW groups: decay on Linear and attention in-projection weights; none on biases, LayerNorm, pos-embs.

        Chi et al. use `weight_decay=1e-3` here (and 1e-6 for the observation encoder, in its own group).
        """
        decay, no_decay = [], []
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if name.endswith("bias") or isinstance(module, nn.LayerNorm) or name in ("pos_emb", "cond_pos_emb"):
                    no_decay.append(param)
                elif isinstance(module, (nn.Linear, nn.MultiheadAttention)) and name.endswith("weight"):
                    decay.append(param)
                else:
                    raise RuntimeError(f"optim_groups has no weight-decay rule for {type(module).__name__}.{name}")
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def forward(self, sample: Tensor, timestep: Tensor | int | float, global_cond: Tensor) -> Tensor:
        """Predict noise (or the clean sample) for `sample (B, T, A)` -> `(B, T, A)`."""
        if sample.ndim != 3 or sample.shape[1:] != (self.chunk_size, self.action_dim):
            raise ValueError(
                f"sample must be (B, {self.chunk_size}, {self.action_dim}), got {tuple(sample.shape)}; "
                "build the transformer with chunk_size equal to the policy's chunk size"
            )
        batch = sample.shape[0]
        if global_cond.shape != (batch, self.n_obs_steps * self.cond_dim):
            raise ValueError(
                f"global_cond must be ({batch}, n_obs_steps * cond_dim = {self.n_obs_steps} * {self.cond_dim}), "
                f"got {tuple(global_cond.shape)}; set n_obs_steps to the observation horizon and cond_dim to the "
                "observation encoder's per-step feature size (obs_encoder.out_dim)"
            )
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(batch) if t.ndim == 0 else t  # (B,)

        obs = global_cond.reshape(batch, self.n_obs_steps, self.cond_dim)  # (B, T_obs, F)
        step_token = self.time_emb(t).unsqueeze(1)  # (B, 1, n_emb)
        cond = torch.cat((step_token, self.cond_obs_emb(obs)), dim=1)  # (B, 1 + T_obs, n_emb)
        memory = self.cond_encoder(self.drop(cond + self.cond_pos_emb))  # (B, 1 + T_obs, n_emb)

        x = self.drop(self.input_emb(sample) + self.pos_emb)  # (B, T, n_emb)
        x = self.decoder(x, memory, tgt_mask=self.self_mask, memory_mask=self.memory_mask,
                         tgt_is_causal=self.causal_attn)  # (B, T, n_emb)
        return self.head(self.ln_f(x))  # (B, T, A)
