"""SIGINT/SIGTERM/SIGHUP become an exception, so every `finally` runs and no half-written output stays.

By default SIGTERM (and SIGHUP) kill Python without unwinding; a build killed that way would
leave its temporary folder and lock behind. Inside `signals_as_exceptions()` the first signal
raises `Interrupted` at the next bytecode; later ones are ignored while the clean-up runs.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """Raised by a caught signal. A BaseException (like KeyboardInterrupt): `except Exception` lets it pass."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    raised = [False]

    def handler(signum: int, _frame) -> None:
        if raised[0]:
            return  # clean-up in progress: finish it
        raised[0] = True
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
