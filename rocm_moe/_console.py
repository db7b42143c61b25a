"""The command line's two streams: results on stdout (tables that people and tests read), progress
on stderr (``HH:MM:SS rank 1/2 ready (gloo, cpu)``), so a long command is never silent and its
stdout stays the same with or without progress."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.text import Text

console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 140)
_progress = Console(stderr=True, highlight=False, soft_wrap=True)


def progress(message: str) -> None:
    """One progress line on stderr, stamped with the wall-clock time (markup not interpreted)."""
    _progress.print(Text.assemble((time.strftime("%H:%M:%S"), "dim"), " ", message))


class Steps:
    """Progress of a loop of ``total`` steps: ``step()`` after each one reports ``what i/total``
    at most once per ``every_s`` seconds, and always the last step; silent if not ``enabled``
    (e.g. on every rank but one)."""

    def __init__(self, what: str, total: int, *, enabled: bool = True, every_s: float = 1.0):
        self.what, self.total, self.enabled, self.every_s = what, total, enabled, every_s
        self.done = 0
        self._last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.enabled and (self.done == self.total or now - self._last >= self.every_s):
            progress(f"{self.what} {self.done}/{self.total}")
            self._last = now
