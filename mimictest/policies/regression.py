"""Deterministic action heads: a regressed chunk (L1 / MSE) or a classified one (uniform bins).

Any network `net(batch)` that returns the whole action chunk in one pass fits here:

- ``loss="l1"`` or ``"mse"``: `net(batch) -> (B, chunk, A)` normalised actions in [-1, 1]; the
  loss is averaged over the non-padded entries (`batch["is_pad"] (B, chunk)`), as in
  `mimictest.policies.act`. This is mimictest's RT-1 variant (continuous action chunks) and the
  Florence-2 linear head.
- ``loss="ce"``: `net(batch) -> (B, chunk, A, bins)` logits over `bins` uniform bins of [-1, 1]
  per action dimension, trained with cross-entropy against `encode_bins(action)`. This is RT-1's
  head (Brohan et al. 2022, "RT-1: Robotics Transformer for Real-World Control at Scale": 256 bins
  per dimension, one action per step). ``decode="argmax"`` returns the centre of the most likely
  bin (RT-1); ``"expectation"`` returns the probability-weighted mean of the bin centres, which is
  smoother and not limited to bin centres.

`encode_bins` / `decode_bins` are module functions so other heads and tests use the same grid.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimictest.policies.base import Policy


def encode_bins(action: Tensor, bins: int) -> Tensor:
    """Normalised actions in [-1, 1] (any shape) -> bin indices (same shape, int64) of `bins` uniform bins.

    Values outside [-1, 1] go to the end bins. Decoding an index with `decode_bins` gives the
    bin's centre, within half a bin width (`1 / bins`) of any value inside [-1, 1].
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    index = torch.floor((action.float() + 1.0) * (bins / 2.0))
    return index.clamp(0, bins - 1).long()


def bin_centres(bins: int, device: torch.device | str | None = None) -> Tensor:
    """The `(bins,)` centres of `bins` uniform bins of [-1, 1]."""
    return (torch.arange(bins, device=device, dtype=torch.float32) + 0.5) * (2.0 / bins) - 1.0


def decode_bins(index: Tensor, bins: int) -> Tensor:
    """Bin indices (any shape) -> the bins' centres in [-1, 1] (same shape, float32)."""
    return (index.float() + 0.5) * (2.0 / bins) - 1.0


class RegressionPolicy(Policy):
    """One forward pass per chunk: `net(batch)` is the prediction, in actions or in bin logits.

    `net(batch) -> (B, chunk, A)` for ``loss="l1" | "mse"``, or `(B, chunk, A, bins)` logits for
    ``loss="ce"``. `predict` returns `(B, chunk, A)` normalised actions either way.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: Literal["l1", "mse", "ce"] = "l1",
        bins: int = 256,
        decode: Literal["argmax", "expectation"] = "argmax",
    ) -> None:
        super().__init__()
        if loss not in ("l1", "mse", "ce"):
            raise ValueError(f"loss must be 'l1', 'mse' or 'ce' (binned cross-entropy), got {loss!r}")
        if decode not in ("argmax", "expectation"):
            raise ValueError(f"decode must be 'argmax' or 'expectation', got {decode!r}")
        if loss == "ce" and bins < 2:
            raise ValueError(f"bins must be >= 2 for loss='ce', got {bins}")
        self.net = net
        self.loss = loss
        self.bins = bins
        self.decode = decode

    def _output(self, batch: dict[str, Tensor]) -> Tensor:
        """`net(batch)` as float32, with its shape checked against the loss mode."""
        out = self.net(batch).float()
        want = 4 if self.loss == "ce" else 3
        if out.dim() != want or (self.loss == "ce" and out.shape[-1] != self.bins):
            expected = f"(B, chunk, A, {self.bins}) logits" if self.loss == "ce" else "(B, chunk, A) actions"
            raise ValueError(f"loss={self.loss!r} needs net(batch) -> {expected}, got {tuple(out.shape)}")
        return out

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`batch` with `action (B, chunk, A)` and `is_pad (B, chunk)` -> `{"total_loss", <loss>}`."""
        action, is_pad = batch.get("action"), batch.get("is_pad")
        if action is None or is_pad is None:
            raise ValueError(
                f"the regression loss needs batch['action'] (B, chunk, A) and batch['is_pad'] (B, chunk); "
                f"got keys {sorted(batch)}"
            )
        action = action.float()
        out = self._output(batch)
        if out.shape[:3] != action.shape:
            raise ValueError(f"net(batch) predicts {tuple(out.shape[:3])} actions, batch['action'] is {tuple(action.shape)}")
        valid = (~is_pad.bool()).unsqueeze(-1).float()  # (B, chunk, 1)
        if self.loss == "ce":
            target = encode_bins(action, self.bins)  # (B, chunk, A)
            err = F.cross_entropy(out.flatten(0, 2), target.flatten(), reduction="none").view_as(action)
        elif self.loss == "l1":
            err = (out - action).abs()
        else:
            err = (out - action).pow(2)
        value = (err * valid).sum() / (valid.sum() * action.shape[-1]).clamp(min=1.0)
        return {"total_loss": value, self.loss: value.detach()}

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Action chunk `(B, chunk, A)` in normalised model space."""
        out = self._output(batch)
        if self.loss != "ce":
            return out
        if self.decode == "argmax":
            return decode_bins(out.argmax(-1), self.bins)
        return out.softmax(-1) @ bin_centres(self.bins, out.device)  # (B, chunk, A)
