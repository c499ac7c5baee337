"""MDT-style diffusion transformer: AdaLN-conditioned blocks that denoise an action chunk, cross-attending to tokens.

Reuss et al., "Multimodal Diffusion Transformer: Learning Versatile Behavior from Multimodal Goals",
RSS 2024 (github.com/intuitive-robots/mdt_policy, ``TransformerFiLMDecoder`` / ``ConditionedBlock``),
as mimictest's Florence MDT head uses it: every step of the noisy chunk is one token (Linear +
learned positional embedding); each block runs causal self-attention and an MLP, both modulated
by the diffusion-step embedding through AdaLN (shift, scale and gate), and an unmodulated
pre-norm cross-attention to the condition tokens (Florence's query states). The AdaLN layers and
the output layer start at zero (AdaLN-Zero, Peebles & Xie, "Scalable Diffusion Models with
Transformers", ICCV 2023), so every block starts as the identity; MDT modulates with
``x * scale + shift`` where DiT uses ``x * (1 + scale) + shift``, which is what makes the zero
start possible.

mimictest's Florence MDT values on robomimic Square: width 128, 4 layers, 8 heads, attention
dropout 0.3, residual dropout 0.1, MLP dropout 0.05, 64 condition tokens, chunk 16.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimictest.nets.unet1d import SinusoidalPosEmb
from mimictest.recipe import Recorded


class _Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA)."""

    def __init__(self, dim: int, heads: int, p_attn: float, p_resid: float, causal: bool) -> None:
        super().__init__()
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.heads, self.p_attn, self.causal = heads, p_attn, causal
        self.resid_drop = nn.Dropout(p_resid)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """`x (B, T, d)` attends to `context (B, S, d)` (itself for self-attention) -> `(B, T, d)`."""
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, L, d / h)
        k, v = self.kv(context).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(split(self.q(x)), split(k), split(v), is_causal=self.causal,
                                             dropout_p=self.p_attn if self.training else 0.0)
        return self.resid_drop(self.out(out.transpose(1, 2).flatten(2)))


class DiTBlock(nn.Module):
    """AdaLN-modulated causal self-attention and MLP, with a plain cross-attention to the condition between them."""

    def __init__(self, dim: int, heads: int, p_attn: float, p_resid: float, p_mlp: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = _Attention(dim, heads, p_attn, p_resid, causal=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = _Attention(dim, heads, p_attn, p_resid, causal=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(p_mlp))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada_ln[1].weight)
        nn.init.zeros_(self.ada_ln[1].bias)

    def forward(self, x: Tensor, c: Tensor, cond: Tensor) -> Tensor:
        """`x (B, T, d)`, step embedding `c (B, 1, d)`, condition tokens `cond (B, S, d)` -> `(B, T, d)`."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(c).chunk(6, dim=-1)  # each (B, 1, d)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.self_attn(h, h)
        x = x + self.cross_attn(self.norm_cross(x), cond)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(Recorded, nn.Module):
    """Noise-prediction transformer for `DiffusionPolicy` over an action chunk, conditioned on tokens.

    `forward(sample (B, chunk, A), timestep (B,) or scalar, global_cond (B, n_cond_tokens * cond_dim))
    -> (B, chunk, A)`; `global_cond` is `DiffusionPolicy`'s flattening of the observation encoder's
    `(B, n_cond_tokens, cond_dim)` tokens (`FlorenceQueryEncoder`), which are projected to `n_emb`.
    """

    def __init__(self, action_dim: int, chunk_size: int, n_cond_tokens: int, cond_dim: int, n_layer: int = 4,
                 n_head: int = 8, n_emb: int = 128, p_drop_attn: float = 0.3, p_drop_resid: float = 0.1,
                 p_drop_mlp: float = 0.05) -> None:
        super().__init__()
        sizes = dict(action_dim=action_dim, chunk_size=chunk_size, n_cond_tokens=n_cond_tokens, cond_dim=cond_dim,
                     n_layer=n_layer, n_head=n_head)
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad or n_emb % n_head or n_emb % 2:
            raise ValueError(f"DiT sizes must be >= 1 and n_emb even and divisible by n_head; got {sizes}, n_emb={n_emb}")
        self.action_dim, self.chunk_size, self.n_cond_tokens, self.cond_dim = action_dim, chunk_size, n_cond_tokens, cond_dim
        self.action_emb = nn.Linear(action_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.randn(1, chunk_size, n_emb) * 0.02)
        self.cond_emb = nn.Linear(cond_dim, n_emb)
        self.time_emb = nn.Sequential(SinusoidalPosEmb(n_emb), nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
        self.drop = nn.Dropout(p_drop_resid)
        self.blocks = nn.ModuleList(DiTBlock(n_emb, n_head, p_drop_attn, p_drop_resid, p_drop_mlp) for _ in range(n_layer))
        self.norm_out = nn.LayerNorm(n_emb, elementwise_affine=False)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(n_emb, 2 * n_emb))
        self.head = nn.Linear(n_emb, action_dim)
        for layer in (self.ada_out[1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, sample: Tensor, timestep: Tensor | int | float, global_cond: Tensor) -> Tensor:
        if sample.ndim != 3 or sample.shape[1:] != (self.chunk_size, self.action_dim):
            raise ValueError(f"sample must be (B, {self.chunk_size}, {self.action_dim}), got {tuple(sample.shape)}; "
                             "build the DiT with the policy's chunk size and action dim")
        B = sample.shape[0]
        if global_cond.shape != (B, self.n_cond_tokens * self.cond_dim):
            raise ValueError(f"global_cond must be ({B}, n_cond_tokens * cond_dim = {self.n_cond_tokens} * {self.cond_dim}), "
                             f"got {tuple(global_cond.shape)}; set them to the observation encoder's num_tokens and out_dim")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(B) if t.ndim == 0 else t  # (B,)
        c = self.time_emb(t).unsqueeze(1)  # (B, 1, n_emb)
        cond = self.cond_emb(global_cond.reshape(B, self.n_cond_tokens, self.cond_dim))  # (B, S, n_emb)
        x = self.drop(self.action_emb(sample) + self.pos_emb)  # (B, chunk, n_emb)
        for block in self.blocks:
            x = block(x, c, cond)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        return self.head(self.norm_out(x) * (1 + scale) + shift)  # (B, chunk, A)
