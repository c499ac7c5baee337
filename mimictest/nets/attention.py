"""Multi-head attention with `nn.MultiheadAttention`'s parameters, and dropout that is cheap on the CPU.

`nn.MultiheadAttention` with dropout falls back, on the CPU, to an unfused path whose attention
dropout draws a Bernoulli sample per attention weight. This module computes the same attention
(same `in_proj_weight`, `in_proj_bias` and `out_proj` parameters, so state dicts are
interchangeable) with `mimictest.nets.dropout` on the CPU, and with the fused
`scaled_dot_product_attention` (dropout included) elsewhere.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimictest.nets.dropout import dropout


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention. `query (B, Q, d)`, `key`/`value (B, S, d)` -> `(B, Q, d)`."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """`key_padding_mask (B, S)` is True at keys never attended to."""
        batch, q_len, dim = query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, h, Q, hd)
        k = F.linear(key, w_k, b_k).unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, h, S, hd)
        v = F.linear(value, w_v, b_v).unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, h, S, hd)
        p = self.dropout if self.training else 0.0
        if query.device.type == "cpu" and p > 0:
            scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # (B, h, Q, S)
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            out = dropout(scores.softmax(dim=-1), p, training=True) @ v  # (B, h, Q, hd)
        else:
            mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(batch, q_len, dim))
