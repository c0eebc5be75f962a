"""Session fixtures shared by every test folder: real servers started once, on loopback, stopped by PID."""

import signal

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.ray_cluster"]


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # A terminated run (a CI timeout, `kill`) then ends like Ctrl-C: fixture teardown stops the servers it started.
    signal.signal(signal.SIGTERM, _interrupt)
