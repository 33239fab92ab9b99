"""Helpers for tests of the worker service's clients: wait on their events, run a shared worker."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def poll_until(source, until, timeout: float = 120) -> list[dict]:
    """Collect ``source.poll()`` events (a worker client, a session, a web panel) until
    ``until(events)`` holds."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += source.poll()
        if until(events):
            return events
        time.sleep(0.05)
    raise AssertionError(f"timed out: {events}")


@contextmanager
def shared_worker(path: Path, model: str = "untrained-tiny", hidden: Path | None = None):
    """``instructx2x serve --socket`` on the CPU, ready when its socket exists; stopped with
    SIGTERM, which must end it cleanly. With ``hidden``, the worker runs in a mount namespace of
    its own where an empty file system covers that folder: it sees none of the files there, as
    a worker on another machine (needs root: ``unshare --mount``)."""
    command = [
        sys.executable,
        "-m",
        "instructx2x.cli",
        "serve",
        "--socket",
        str(path),
        "--model",
        model,
        "--device",
        "cpu",
    ]
    if hidden is not None:
        command = [
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount -t tmpfs none "$1" && shift && exec "$@"',
            "sh",
            str(hidden),
            *command,
        ]
    server = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stderr is not None
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert server.poll() is None, server.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the shared worker did not start within 120 s"
            time.sleep(0.05)
        yield server
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert not path.exists()


def radiograph(scene):
    """A 72 x 64 single-slice volume with structure everywhere, in modality-like values."""
    import numpy as np

    from InstructX2XModuleLib import scene as layer

    yy, xx = np.mgrid[0:72, 0:64]
    return layer.array_to_volume(
        scene, (2000 + 900 * np.sin(yy / 7) * np.cos(xx / 5)).astype(np.float32), "chest"
    )
