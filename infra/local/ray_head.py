"""A Ray head node on 127.0.0.1 (`ray start --head --block`), owned by PID file, ready for `ray job submit`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from infra.local.credentials import make_private_dir, write_private_text
from infra.local.processes import (
    free_ports,
    kill_session,
    read_pid,
    require_free_ports,
    start_detached,
    stop_pid,
)
from services.config import StrictModel

log = logging.getLogger(__name__)


class RaySettings(StrictModel):
    """Ports and sizes of the local Ray head."""

    gcs_port: int = 6379
    dashboard_port: int = 8265
    client_port: int = 10001
    metrics_export_port: int = 8080
    dashboard_agent_port: int = 52365
    num_cpus: int | None = None
    # Ray's default takes 30% of RAM in /dev/shm; the local stack shares a small machine with its jobs.
    object_store_memory_bytes: int = 1 << 30

    @classmethod
    def on_free_ports(cls, **sizes) -> RaySettings:
        """Settings whose every port is free now, e.g. for a head beside a running local stack."""
        ports = ("gcs_port", "dashboard_port", "client_port", "metrics_export_port", "dashboard_agent_port")
        return cls(**free_ports(*ports), **sizes)


def ray_executable() -> Path:
    """The `ray` command of this environment (the one whose Python runs the jobs)."""
    ray_bin = Path(sys.executable).with_name("ray")
    if ray_bin.exists():
        return ray_bin
    found = shutil.which("ray")
    if found is None:
        raise FileNotFoundError("the `ray` command is not installed in this environment: run `make install`")
    return Path(found)


def node_process_env(env: dict[str, str], auth_env: dict[str, str]) -> dict[str, str]:
    """Environment of a `ray start` process: jobs and the workers it starts inherit it.

    `python` in a job's entrypoint is the first one on the node's PATH: make it this environment's.
    """
    venv_bin = str(Path(sys.executable).parent)
    return {**env, **auth_env, "PATH": os.pathsep.join([venv_bin, env.get("PATH", os.defpath)])}


def start_ray_node(name: str, cmd: list[str], *, pid_file: Path, log_file: Path, env: dict[str, str], cwd: Path,
                   ready: Callable[[], bool], timeout: float) -> None:
    """Start a `ray start ... --block` node and wait until `ready()`; start it again if it exits meanwhile.

    `ray start` gives up when its raylet has not registered with the GCS within 30 s (fixed in Ray),
    which a loaded machine can miss: that is waited out until `timeout`, then it fails loudly.
    A node that never became ready must not linger holding ports: it is stopped.
    """
    deadline = time.monotonic() + timeout
    attempt = 0
    try:
        while True:
            attempt += 1
            leader = start_detached(cmd, pid_file=pid_file, log_file=log_file, env=env, cwd=cwd)
            while read_pid(pid_file) is not None:
                if ready():
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not become ready in {timeout:.0f} s; see {log_file}")
                time.sleep(0.5)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} exited while starting ({attempt} attempts in {timeout:.0f} s); see {log_file}")
            log.warning("%s exited while starting (attempt %d): starting it again; see %s", name, attempt, log_file)
            kill_session(leader)  # what it left behind (a GCS, agents) would hold the ports
    except BaseException:
        stop_pid(pid_file, timeout=60)
        raise


class RayHead:
    """The head process of the local cluster; its children (GCS, raylet, dashboard) share its session."""

    def __init__(self, state_dir: Path, settings: RaySettings, *, workdir: Path):
        self.state_dir = state_dir
        self.settings = settings
        self.workdir = workdir
        self.pid_file = state_dir / "ray.pid"
        self.log_file = state_dir / "logs" / "ray-head.log"
        self.token_file = state_dir / "auth_token"

    @property
    def private_temp_root(self) -> Path:
        """This user's own (0700) folder around Ray's temp dir, which Ray makes world-writable on every start."""
        return Path("/tmp") / f"hybriddit-ray-{hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:10]}"

    @property
    def temp_dir(self) -> Path:
        # Unix socket paths must stay under ~107 bytes, so the session lives in a short /tmp path.
        return self.private_temp_root / "r"

    @property
    def metrics_discovery_file(self) -> Path:
        """Prometheus file_sd targets (every node's metrics endpoint) that the head keeps current."""
        return self.temp_dir / "session_latest" / "prom_metrics_service_discovery.json"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.settings.gcs_port}"

    def auth_env(self) -> dict[str, str]:
        """Token auth for the head and every client: the cluster runs code for whoever reaches it."""
        if not self.token_file.exists():
            make_private_dir(self.state_dir)
            write_private_text(self.token_file, secrets.token_hex(32))
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def start(self, env: dict[str, str], *, timeout: float = 300.0) -> None:
        if self.pid() is not None:
            return
        s = self.settings
        require_free_ports(
            "the Ray head",
            {
                "GCS": s.gcs_port,
                "dashboard": s.dashboard_port,
                "client": s.client_port,
                "metrics export": s.metrics_export_port,
                "dashboard agent": s.dashboard_agent_port,
            },
        )
        cmd = [
            str(ray_executable()),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={s.gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={s.dashboard_port}",
            f"--ray-client-server-port={s.client_port}",
            f"--metrics-export-port={s.metrics_export_port}",
            f"--dashboard-agent-listen-port={s.dashboard_agent_port}",
            f"--object-store-memory={s.object_store_memory_bytes}",
            f"--temp-dir={self.temp_dir}",
        ]
        if s.num_cpus is not None:
            cmd.append(f"--num-cpus={s.num_cpus}")
        # Jobs run with this process's environment and working directory: the project root, so that
        # `ray job submit -- python pipelines/encode_latents.py` finds its files.
        # Sessions, logs, spilled objects and sockets are this user's alone.
        for directory in (self.state_dir, self.private_temp_root):
            make_private_dir(directory)
        start_ray_node(
            "the Ray head",
            cmd,
            pid_file=self.pid_file,
            log_file=self.log_file,
            env=node_process_env(env, self.auth_env()),
            cwd=self.workdir,
            # The dashboard answers before the head's raylet has registered: ready means the head node is alive.
            ready=lambda: self.dashboard_ready() and self.head_node_alive(),
            timeout=timeout,
        )

    def _get(self, path: str, *, timeout: float) -> dict:
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}",
            headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def dashboard_ready(self) -> bool:
        try:
            return "ray_version" in self._get("/api/version", timeout=2)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def head_node_alive(self) -> bool:
        try:
            return any(node["is_head_node"] for node in self.list_state("nodes", state="ALIVE", timeout=5))
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False

    def list_state(self, resource: str, *, timeout: float = 30.0, **equal_to: str) -> list[dict]:
        """Ray's state API (`ray list <resource>`) through the dashboard, e.g. `list_state("nodes")`."""
        query = [("limit", "10000"), ("detail", "1")]
        for key, value in equal_to.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        answer = self._get(f"/api/v0/{resource}?{urllib.parse.urlencode(query)}", timeout=timeout)
        return answer["data"]["result"]["result"]

    def stop(self, *, timeout: float = 60.0) -> bool:
        return stop_pid(self.pid_file, timeout=timeout)
