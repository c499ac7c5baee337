"""The training sampler: endless, seeded epochs whose position is a pure function of the step.

Epoch ``e`` is the permutation ``numpy.random.default_rng([seed, e]).permutation(n)``; process
``rank`` of ``world`` takes every ``world``-th index of it (the last ``n % world`` dropped, so every
process sees as many samples), cut into batches with the incomplete last batch dropped. So the batch
of optimizer step ``s`` is fixed by ``(seed, s)``: a resumed run starts at the batch where the
killed one stopped, mid-epoch, with no generator state to restore. It replaces
``DataLoader(shuffle=True)``, whose sampler draws its seed from the global torch generator at every
epoch and restarts at an epoch boundary.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class StepSampler(Sampler[list[int]]):
    """Yields batches of sample indices forever, starting at optimizer step ``start_step``."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start_step: int = 0) -> None:
        self.per_rank = num_samples // world
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} samples over {world} process(es) make no full batch of {batch_size}; "
                             "lower BATCH_SIZE")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world, self.start_step = rank, world, start_step

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch within the epoch)`` of optimizer step ``step`` (0-based)."""
        return divmod(step, self.batches_per_epoch)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This process's indices of epoch ``epoch``, in order: ``(batches_per_epoch * batch_size,)``."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        mine = perm[self.rank : self.per_rank * self.world : self.world]
        return mine[: self.batches_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = self.position(self.start_step)
        while True:
            batches = self.epoch_indices(epoch).reshape(self.batches_per_epoch, self.batch_size)
            for batch in batches[first:]:
                yield batch.tolist()
            epoch, first = epoch + 1, 0
