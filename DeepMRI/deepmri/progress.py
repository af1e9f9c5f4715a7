"""Progress reporting and cancellation shared by every long-running function.

Long work takes `progress(fraction, message)` and a `cancel` token, and checks the token between
units of work so a Cancel button (or Ctrl-C in the CLI) stops it promptly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from deepmri.errors import Cancelled

ProgressCallback = Callable[[float, str], None]


class CancelLike(Protocol):
    """Anything with a boolean `cancelled` attribute can cancel DeepMRI work."""

    @property
    def cancelled(self) -> bool: ...


class CancelToken:
    """A thread-safe flag that a GUI, signal handler or test sets to stop a running job.

    Examples:
        >>> token = CancelToken()
        >>> token.cancel()
        >>> token.cancelled
        True
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def no_progress(fraction: float, message: str) -> None:
    """The default progress callback: report nothing."""


def check_cancel(cancel: CancelLike | None) -> None:
    """Raise `Cancelled` if the token says stop; called between units of work."""
    if cancel is not None and cancel.cancelled:
        raise Cancelled("Cancelled by the user; no output was written.")


def sub_progress(progress: ProgressCallback, start: float, stop: float) -> ProgressCallback:
    """Map a step's own 0..1 progress into the [start, stop] slice of its caller's progress."""

    def report(fraction: float, message: str) -> None:
        progress(start + (stop - start) * min(max(fraction, 0.0), 1.0), message)

    return report
