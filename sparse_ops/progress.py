"""A status line for long work, on stderr so ``--json`` output stays clean."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Rewrites one line in place on a terminal; elsewhere prints at most every
    ``interval`` seconds (plus every :meth:`line`), so logs stay short."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, interval: float = 5):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interval = interval
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._width = 0

    def update(self, text: str) -> None:
        """A transient status (overwritten by the next update or line)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
            self.stream.flush()
        elif now - self._last >= self.interval:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last = now

    def line(self, text: str) -> None:
        """A permanent line."""
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last = time.monotonic()
