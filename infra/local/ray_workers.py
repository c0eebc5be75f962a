"""Ray worker nodes on the same host as the head: each its own `ray start --address ... --block` raylet.

A worker node has its own object store, its own share of the CPUs and a `hybriddit-node` label. Its
`ray start` process leads a session that holds its raylet, agents and every worker process it spawns,
so the node is found again by PID and stopped (or, in fault tests, killed) as one unit.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
from pathlib import Path

from pydantic import Field

from infra.local.processes import free_ports, read_pid, stop_pid
from infra.local.ray_head import RayHead, node_process_env, ray_executable, start_ray_node
from services.config import StrictModel

NODE_LABEL = "hybriddit-node"


class RayWorkerSettings(StrictModel):
    """How many worker nodes join the head, and the size of each."""

    count: int = Field(0, ge=0, description="worker nodes beside the head (`hybriddit stack up --workers N`)")
    num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs of each worker node; default: the host's cores shared out evenly"
    )
    object_store_memory_bytes: int = Field(512 << 20, ge=75 << 20)

    def cpus_per_node(self) -> int:
        return self.num_cpus or max(1, (os.cpu_count() or 1) // max(1, self.count))


class RayWorkerNode:
    """One worker node of the local cluster, joined to `head`; its state lives in `state_dir/<label>.*`."""

    def __init__(self, state_dir: Path, index: int, settings: RayWorkerSettings, *, head: RayHead, workdir: Path):
        self.index = index
        self.settings = settings
        self.head = head
        self.workdir = workdir
        self.label = f"worker-{index}"
        self.pid_file = state_dir / f"{self.label}.pid"
        self.ports_file = state_dir / f"{self.label}.json"
        self.log_file = state_dir / "logs" / f"ray-{self.label}.log"

    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def ports(self) -> dict[str, int]:
        """The ports this node was started with (picked free at start, so that nodes never collide)."""
        return json.loads(self.ports_file.read_text())

    def start(self, env: dict[str, str], *, timeout: float = 300.0) -> None:
        if self.pid() is not None:
            return
        if self.head.pid() is None:
            raise RuntimeError(f"cannot start Ray {self.label}: the Ray head is not running")
        ports = free_ports("node_manager", "object_manager", "metrics_export", "dashboard_agent")
        self.ports_file.parent.mkdir(parents=True, exist_ok=True)
        self.ports_file.write_text(json.dumps(ports) + "\n")
        cmd = [
            str(ray_executable()),
            "start",
            f"--address={self.head.gcs_address}",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.settings.cpus_per_node()}",
            f"--object-store-memory={self.settings.object_store_memory_bytes}",
            f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--metrics-export-port={ports['metrics_export']}",
            f"--dashboard-agent-listen-port={ports['dashboard_agent']}",
            # 0: the OS gives each worker process a free port, so several nodes (and other clusters on
            # this host) never compete for Ray's default 10002-19999 range.
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--labels={NODE_LABEL}={self.label}",
            f"--temp-dir={self.head.temp_dir}",
        ]
        started_ms = time.time() * 1000
        # Tasks and actors placed on this node inherit its environment (storage endpoint and keys).
        start_ray_node(
            f"Ray {self.label}",
            cmd,
            pid_file=self.pid_file,
            log_file=self.log_file,
            env=node_process_env(env, self.head.auth_env()),
            cwd=self.workdir,
            ready=lambda: self._joined(started_ms),
            timeout=timeout,
        )

    def _joined(self, started_ms: float) -> bool:
        if self.head.pid() is None:
            raise RuntimeError(f"the Ray head exited while {self.label} was joining it; see {self.head.log_file}")
        return self.node_id(started_after_ms=started_ms) is not None

    def node_id(self, *, started_after_ms: float = 0.0) -> str | None:
        """Ray's id of this node while it is alive (a restarted node gets a new one), else None."""
        try:
            nodes = self.head.list_state("nodes", state="ALIVE")
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return None
        # Newest first: a node killed moments ago can still be listed alive until the GCS notices.
        for node in sorted(nodes, key=lambda node: node["start_time_ms"], reverse=True):
            if node.get("labels", {}).get(NODE_LABEL) == self.label and node["start_time_ms"] >= started_after_ms:
                return node["node_id"]
        return None

    def stop(self, *, timeout: float = 60.0) -> bool:
        return stop_pid(self.pid_file, timeout=timeout)


def worker_nodes(state_dir: Path, settings: RayWorkerSettings, *, head: RayHead, workdir: Path) -> list[RayWorkerNode]:
    return [RayWorkerNode(state_dir, index, settings, head=head, workdir=workdir) for index in range(1, settings.count + 1)]
