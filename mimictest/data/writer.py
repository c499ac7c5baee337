"""What every dataset writer shares: publish atomically on success, discard on error."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType


class AtomicWriter(ABC):
    """A context manager whose ``close`` moves a finished temporary dataset into place and whose
    ``abort`` deletes it, so an interrupted run never leaves a partial dataset under the final name."""

    @abstractmethod
    def close(self) -> None:
        """Finish the temporary dataset and rename it to its final path."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written so far."""

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
