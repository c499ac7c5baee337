"""What every policy wrapper is: a loss for training and a chunk for acting.

A policy sees only network batches (``mimictest.preprocess.Preprocessor`` output), never numpy or
an env. DDP, accelerate and ``torch.compile`` wrap ``forward``, so ``forward`` is the training
loss; the evaluation loop calls ``predict``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from mimictest.recipe import Recorded


class Policy(Recorded, nn.Module, ABC):
    """``compute_loss(batch) -> {"total_loss", ...}`` and ``predict(batch) -> (B, chunk, A)`` in model space."""

    @abstractmethod
    def compute_loss(self, batch: dict) -> dict[str, Tensor]:
        """The loss terms of a training batch; ``total_loss`` is what is minimised."""

    @abstractmethod
    def predict(self, batch: dict) -> Tensor:
        """An action chunk ``(B, chunk, A)`` for the observations in ``batch``."""

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """The training loss (what DDP, accelerate and ``torch.compile`` wrap)."""
        return self.compute_loss(batch)
