"""Detached server processes tracked by PID file: start once, find again, stop by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class PortInUseError(RuntimeError):
    """A port the stack needs is held by another process."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(*names: str) -> dict[str, int]:
    """A distinct loopback port the OS reports free now for each name (servers started on ports of their own).

    The probes stay bound until all are picked: probing one port at a time can get the same port back twice
    (seen: a Ray node given one port as both its node manager and metrics port, refused at every restart).
    """
    probes = {name: socket.socket(socket.AF_INET, socket.SOCK_STREAM) for name in names}
    try:
        for probe in probes.values():
            probe.bind(("127.0.0.1", 0))
        return {name: probe.getsockname()[1] for name, probe in probes.items()}
    finally:
        for probe in probes.values():
            probe.close()


def free_port() -> int:
    """A loopback port the OS reports free now; several ports for one server come from `free_ports`."""
    return free_ports("port")["port"]


def require_free_ports(owner: str, ports: dict[str, int]) -> None:
    taken = {name: port for name, port in ports.items() if not port_is_free(port)}
    if taken:
        listed = ", ".join(f"{name} {port}" for name, port in taken.items())
        raise PortInUseError(
            f"cannot start {owner}: port(s) already in use on 127.0.0.1: {listed}. Stop the process holding "
            "them (e.g. `ss -ltnp`) or choose other ports with --set"
        )


def read_pid(pid_file: Path) -> int | None:
    """The PID recorded in `pid_file` if that process is still alive."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return None if _is_zombie(pid) else pid


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return False


def start_detached(cmd: list[str], *, pid_file: Path, log_file: Path, env: dict[str, str], cwd: Path) -> int:
    """Start `cmd` in its own session (it outlives the caller) and record its PID."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    pid_file.write_text(f"{process.pid}\n")
    return process.pid


def stop_pid(pid_file: Path, *, timeout: float) -> bool:
    """SIGTERM the recorded process, SIGKILL its whole session if it outlives `timeout`. True if one ran."""
    pid = read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and read_pid(pid_file) is not None:
        time.sleep(0.1)
    # The session holds every child the server started, also those in process groups of their own
    # (Ray puts each worker in one): nothing of it may stay behind.
    kill_session(pid)
    pid_file.unlink(missing_ok=True)
    return True


def session_pids(leader: int) -> list[int]:
    """Every live process in the session led by `leader` (the server and the children it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == leader and not _is_zombie(int(entry.name)):
                pids.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return sorted(pids)


def kill_session(leader: int) -> list[int]:
    """SIGKILL every process of the session led by `leader` at once (a server and all it started)."""
    victims = session_pids(leader)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while session_pids(leader) and time.monotonic() < deadline:
        time.sleep(0.1)
    return victims
