"""Deployment files as parsed data, shared by the tests in this folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY_SERVICES = ("ray-head", "ray-worker", "ray-worker-gpu")


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
