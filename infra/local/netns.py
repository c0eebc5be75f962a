"""Run the local stack on loopback only: inside a private network namespace when the host has more.

Ray binds and advertises the first non-loopback address even when told 127.0.0.1, and on the
machines this project is built on only loopback traffic is allowed. As root with iproute2, every
command that starts or talks to the stack is re-executed inside a persistent namespace whose only
interface is `lo`; on an ordinary user's machine commands run as they are.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

NAMESPACE = os.environ.get("HYBRIDDIT_NETNS_NAME", "hybriddit")
# "auto" (default): private namespace when root and the host has non-loopback interfaces; "off": never.
MODE_ENV = "HYBRIDDIT_NETNS"


def network_interfaces() -> list[str]:
    return sorted(os.listdir("/sys/class/net")) if Path("/sys/class/net").is_dir() else []


def only_loopback() -> bool:
    """True inside a namespace (or host) whose only network interface is `lo`."""
    return network_interfaces() in ([], ["lo"])


def wants_private_namespace() -> bool:
    mode = os.environ.get(MODE_ENV, "auto")
    if mode not in ("auto", "off"):
        raise ValueError(f"{MODE_ENV}={mode!r} is not allowed: use 'auto' or 'off'")
    return mode == "auto" and os.geteuid() == 0 and not only_loopback()


def ensure_namespace() -> None:
    """Create the persistent loopback-only namespace once; later calls find it."""
    if shutil.which("ip") is None:
        raise RuntimeError(
            "running as root on a host with non-loopback interfaces needs iproute2's `ip` to keep the stack "
            f"on loopback: install iproute2, or set {MODE_ENV}=off to run on the host network"
        )
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    if NAMESPACE not in existing.split():
        subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
        log.info("created network namespace %s (loopback only)", NAMESPACE)
    subprocess.run(["ip", "-n", NAMESPACE, "link", "set", "lo", "up"], check=True)


def loopback_command(argv: list[str]) -> list[str]:
    """`argv` as it must be run to reach the stack: prefixed with `ip netns exec` when needed."""
    if not wants_private_namespace():
        return list(argv)
    ensure_namespace()
    return ["ip", "netns", "exec", NAMESPACE, *argv]


def set_loopback_env() -> None:
    """On loopback only, point gloo (CPU DDP) at `lo`: it picks the host's first interface otherwise.

    The jobs forward the variable to their workers, so they never need to know about this namespace.
    """
    if wants_private_namespace() or only_loopback():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def reexec_on_loopback() -> None:
    """Replace this process by itself inside the namespace, unless it already is on loopback only."""
    set_loopback_env()
    if wants_private_namespace():
        argv = loopback_command([sys.executable, *sys.argv])
        os.execvp(argv[0], argv)


if __name__ == "__main__":
    # `python -m infra.local.netns CMD ...`: run CMD on loopback only (what `make test` does).
    command = sys.argv[1:]
    if not command:
        raise SystemExit("usage: python -m infra.local.netns CMD [ARG ...]")
    set_loopback_env()
    full = loopback_command(command)
    os.execvp(full[0], full)
