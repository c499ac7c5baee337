"""Moves batches to the device ahead of time and measures how long training waited for data.

On CUDA the next batch's host-to-device copy runs on a side stream while the current step
computes (the prefetcher of EDiRobotics/mimictest, after NVIDIA's apex ImageNet example); the
DataLoader should use ``pin_memory=True`` so the copies are truly asynchronous. On CPU it is a
pass-through with the same interface and the same timing.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import torch

Batch = dict[str, Any]  # tensors, nested dicts of tensors (per-camera ``rgb``) and lists of strings (``lang``)


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in a (nested) dict or list batch; other leaves (strings) pass through."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


class Prefetcher:
    """Wraps an (endless) iterator of CPU batches; ``next()`` returns a batch on ``device``.

    ``wait_seconds`` accumulates the time the caller spent blocked on data (DataLoader plus any
    copy not hidden behind compute); ``pop_wait()`` returns and resets it.
    """

    def __init__(self, batches: Iterator[Batch], device: torch.device) -> None:
        self.batches = batches
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.wait_seconds = 0.0
        self._next: Batch | None = None
        if self.cuda:
            self._preload()

    def _fetch(self) -> Batch:
        start = time.perf_counter()
        batch = next(self.batches)
        self.wait_seconds += time.perf_counter() - start
        return batch

    def _preload(self) -> None:
        batch = self._fetch()
        with torch.cuda.stream(self.stream):
            self._next = map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        if not self.cuda:
            return map_tensors(self._fetch(), lambda t: t.to(self.device))
        start = time.perf_counter()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        batch = self._next
        # The caching allocator must not reuse these on the side stream.
        map_tensors(batch, lambda t: t.record_stream(torch.cuda.current_stream(self.device)))
        self.wait_seconds += time.perf_counter() - start
        self._preload()
        return batch

    def pop_wait(self) -> float:
        """Seconds waited for data since the last call."""
        wait, self.wait_seconds = self.wait_seconds, 0.0
        return wait


def endless(loader: torch.utils.data.DataLoader, start_epoch: int = 0) -> Iterator[Batch]:
    """Yields batches forever, calling ``set_epoch`` so distributed shuffles differ per epoch."""
    epoch = start_epoch
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1
