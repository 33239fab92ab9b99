"""Settings for every test under the repository (pyproject.toml holds paths and markers)."""

import signal


def pytest_configure(config):
    """Give the tests, and every command they start, Ctrl-C's default disposition.

    A shell that starts a job in the background without job control (``cmd &`` in a script,
    some CI runners) starts it with SIGINT ignored, and every child inherits that: the tests
    that press Ctrl-C on a command would see it run to the end. A user's Ctrl-C reaches a
    command with the default disposition, which a Python handler here gives each child.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
