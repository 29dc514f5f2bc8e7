"""Helpers for tests that start processes."""

import signal


def default_sigint() -> None:
    """``preexec_fn``: Ctrl-C handled as a user's shell leaves it. A job started in the background
    by a non-interactive shell (``cmd &`` in a CI script) ignores SIGINT, and so would every
    process it starts: Python then never raises KeyboardInterrupt, and the Ctrl-C tests would
    test the runner's environment instead of the harness."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
