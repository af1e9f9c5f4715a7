"""A plain-text progress line on stderr for the command line, and Ctrl-C as a cancel token."""

from __future__ import annotations

import sys
import time


class TextProgress:
    """Prints `[ 42%] message` on stderr, at most a few times a second, and always the last one."""

    def __init__(self, stream=None, interval: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last_time = 0.0
        self._last_message = ""

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if (
            fraction < 1.0
            and message == self._last_message
            and now - self._last_time < self.interval
        ):
            return
        self._last_time, self._last_message = now, message
        self.stream.write(f"[{100 * fraction:3.0f}%] {message}\n")
        self.stream.flush()
