"""A command-line run that a service manager or ``kill`` stops (SIGTERM) cancels as Ctrl-C does:
the same ``KeyboardInterrupt``, so the same clean-up, message and exit code 130."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["sigterm_cancels"]


@contextlib.contextmanager
def sigterm_cancels() -> Iterator[None]:
    """Within the block SIGTERM raises ``KeyboardInterrupt``; the previous handler comes back
    after it. Signal handlers belong to the main thread: elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
