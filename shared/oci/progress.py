"""Progress reporting seen from the library: the CLI plugs rich bars in, everything else gets no-ops."""

from __future__ import annotations

from typing import Protocol


class ProgressTask(Protocol):
    """One bar: a unit of long work with a known or unknown total."""

    def advance(self, amount: int) -> None:
        """Record ``amount`` more units done (may be called from worker threads)."""
        ...

    def reset(self) -> None:
        """Start over from zero (a retried download)."""
        ...

    def done(self) -> None:
        """The work is finished."""
        ...


class Progress(Protocol):
    """A factory of bars."""

    def task(self, description: str, total: int | None, *, unit: str = "bytes") -> ProgressTask:
        """Open a bar; ``unit`` is ``bytes`` or ``items``."""
        ...


class _NullTask:
    def advance(self, amount: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def done(self) -> None:
        pass


class NullProgress:
    """Progress that shows nothing."""

    def task(self, description: str, total: int | None, *, unit: str = "bytes") -> ProgressTask:
        """A bar that shows nothing."""
        return _NullTask()


NULL_TASK: ProgressTask = _NullTask()
