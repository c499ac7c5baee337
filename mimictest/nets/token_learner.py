"""TokenLearner: a few learned spatial poolings of a feature map (Ryoo et al., NeurIPS 2021, version 1.1).

As used by RT-1 (github.com/google-research/robotics_transformer, ``tokenizers/token_learner.py``):
LayerNorm over channels, a two-layer MLP (bottleneck 64, GELU) giving one logit per position
and output token, a softmax over the positions, and for each output token the attention-weighted
sum of the (un-normalised) input features. RT-1 turns each image's 81 tokens into 8.
"""

from __future__ import annotations

from torch import Tensor, nn

from mimictest.nets.dropout import Dropout


class TokenLearner(nn.Module):
    """`(N, C, h, w)` feature map or `(N, S, C)` tokens -> `(N, num_tokens, C)`."""

    def __init__(self, dim: int, num_tokens: int = 8, bottleneck_dim: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, bottleneck_dim), nn.GELU(), Dropout(dropout),
                                 nn.Linear(bottleneck_dim, num_tokens), Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)  # (N, C, h, w) -> (N, S, C)
        weights = self.mlp(self.norm(x)).transpose(1, 2).softmax(dim=-1)  # (N, num_tokens, S)
        return weights @ x  # (N, num_tokens, C)
