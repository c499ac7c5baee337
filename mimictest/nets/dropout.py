"""Dropout with a cheaper random mask on the CPU.

`nn.Dropout` on the CPU draws one Bernoulli sample per element (`bernoulli_`), which dominates
ACT's training step there: about 80 M elements a step at ACT's configuration. Here one 64-bit
random integer gives the keep decisions of four elements (each compares a uniform 16-bit slice
with a threshold), and the mask is applied as one multiply forward and one backward. The drop
probability is rounded to a multiple of 1/65536. On CUDA, `torch.nn.functional.dropout` is used.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_HALF_RANGE = 2**15  # int16 spans [-2**15, 2**15)


def keep_multiplier(x: Tensor, p: float) -> Tensor:
    """`1 / (1 - p)` where an element of `x` is kept, `0` where it is dropped; `x`'s shape and dtype."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
    halves = words.view(torch.int16)[:n].view(x.shape)  # uniform over the int16 range
    keep = halves >= round(p * 2 * _HALF_RANGE) - _HALF_RANGE  # P(keep) = 1 - p
    return keep.to(x.dtype).mul_(1.0 / (1.0 - p))


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: zero each element with probability `p` and scale the rest by `1 / (1 - p)`."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * keep_multiplier(x, p)


class Dropout(nn.Module):
    """`nn.Dropout` with the cheaper CPU mask of this module."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
