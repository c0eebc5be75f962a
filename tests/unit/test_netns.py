"""Loopback-only execution: commands are wrapped in the private namespace only when needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from infra.local import netns


def test_commands_run_unwrapped_when_namespaces_are_turned_off(monkeypatch):
    monkeypatch.setenv(netns.MODE_ENV, "off")
    assert netns.loopback_command(["ray", "status"]) == ["ray", "status"]


def test_unknown_namespace_mode_is_rejected_with_the_allowed_values(monkeypatch):
    monkeypatch.setenv(netns.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="'auto' or 'off'"):
        netns.wants_private_namespace()


def test_wrapped_command_sees_only_the_loopback_interface_when_root():
    expected = (
        ["lo"] if netns.wants_private_namespace() or netns.only_loopback() else netns.network_interfaces()
    )
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.local.netns",
            sys.executable,
            "-c",
            "import os; print(sorted(os.listdir('/sys/class/net')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert listed == str(expected)
