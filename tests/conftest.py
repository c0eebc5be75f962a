"""Session fixtures shared by every test folder: real servers started once, on loopback, stopped by PID."""

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.ray_cluster"]
