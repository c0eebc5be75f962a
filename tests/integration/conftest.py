"""Fixtures shared by the integration tests: a fresh S3 prefix per test, a port nobody listens on."""

import socket
import time

import pytest


@pytest.fixture
def prefix(s3_server, request) -> str:
    """A fresh prefix per test inside the session's bucket."""
    return s3_server.uri("tests", f"{request.node.name}-{time.monotonic_ns()}")


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
