"""The local stack: idempotent start, worker nodes, a real `ray job submit`, loopback-only sockets, stop by PID."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from infra.local.netns import only_loopback
from infra.local.processes import free_ports, session_pids
from infra.local.ray_head import RayHead, RaySettings
from infra.local.seaweedfs import SeaweedInternalPorts, free_port_with_grpc_twin

REPO = Path(__file__).resolve().parents[2]
ROOT_ON_DEBIAN = os.geteuid() == 0 and Path("/etc/debian_version").exists()
HYBRIDDIT = [sys.executable, "-m", "services.cli"]


def free_stack_overrides(state_dir: Path) -> list[str]:
    """`--set` arguments for a stack of its own: its state dir, free loopback ports, small sizes."""
    internal = SeaweedInternalPorts.free()
    ports = {
        **{f"s3_internal_ports.{name}": port for name, port in internal.model_dump().items()},
        "s3_port": free_port_with_grpc_twin(avoid=internal.model_dump().values()),
        **free_ports("ray.gcs_port", "ray.dashboard_port", "ray.client_port", "ray.metrics_export_port",
                     "ray.dashboard_agent_port", "prometheus.port"),
    }
    settings = [f"state_dir={state_dir}", f"ray.object_store_memory_bytes={256 << 20}", "workers.num_cpus=1",
                f"workers.object_store_memory_bytes={256 << 20}"]  # fmt: skip
    return [arg for item in settings + [f"{k}={v}" for k, v in ports.items()] for arg in ("--set", item)]


@pytest.fixture(scope="module")
def stack_overrides(tmp_path_factory) -> list[str]:
    return free_stack_overrides(tmp_path_factory.mktemp("stack"))


def hybriddit_stack(action: str, overrides: list[str]) -> dict:
    done = subprocess.run(
        [*HYBRIDDIT, "stack", action, *overrides], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[: done.stdout.rindex("}") + 1])


def stack_client_env(overrides: list[str]) -> dict[str, str]:
    done = subprocess.run(
        [*HYBRIDDIT, "stack", "env", *overrides], cwd=REPO, capture_output=True, text=True, check=True
    )
    pairs = (line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines())
    return dict(pairs)


def pid_of(status: dict, name: str) -> int:
    return int(Path(status["state_dir"], name).read_text())


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def assert_state_is_private(state_dir: Path) -> None:
    """Keys, stored objects, logs and Ray's sessions (sockets included) are readable by their owner only."""
    ray_temp_root = RayHead(state_dir / "ray", RaySettings(), workdir=REPO).private_temp_root
    assert (ray_temp_root / "r" / "session_latest").exists(), "the Ray head did not use its private temp root"
    private = [state_dir, state_dir / "seaweedfs", state_dir / "seaweedfs/data", state_dir / "ray", ray_temp_root]
    if (state_dir / "prometheus").exists():
        private += [state_dir / "prometheus", state_dir / "prometheus/data"]
    modes = {str(path): oct(path.stat().st_mode & 0o777) for path in private}
    assert modes == {str(path): "0o700" for path in private}


def stack_pid_files(status: dict) -> list[str]:
    prometheus = ["prometheus/prometheus.pid"] if status["prometheus"]["running"] else []
    return ["seaweedfs/seaweedfs.pid", "ray/ray.pid", *(f"ray/{node['label']}.pid" for node in status["ray"]["workers"]),
            *prometheus]  # fmt: skip


def scraped_ray_nodes(prometheus_url: str, timeout: float = 120.0) -> int:
    """How many Ray nodes the stack's Prometheus has node metrics from (targets found through Ray's discovery file).

    Counted by a node-level metric, not by targets: the discovery file also lists the head's dashboard and
    autoscaler exporters, which come up on their own schedule.
    """
    query = urllib.parse.quote("count by (instance) (ray_node_mem_total)")
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{prometheus_url}/api/v1/query?query={query}", timeout=10) as response:
            nodes = len(json.loads(response.read())["data"]["result"])
        if nodes >= 3 or time.monotonic() > deadline:
            return nodes
        time.sleep(2)


def test_stack_up_twice_with_two_worker_nodes_submit_job_loopback_only_then_down(stack_overrides):
    up = [*stack_overrides, "--workers", "2"]
    try:
        first = hybriddit_stack("up", up)
        second = hybriddit_stack("up", up)
        assert first["s3"]["running"] and first["ray"]["running"]
        # Where scripts/bootstrap.sh installs Prometheus (root on Debian, as CI), the stack runs it.
        assert first["prometheus"]["running"] == first["prometheus"]["installed"]
        assert first["prometheus"]["installed"] or not ROOT_ON_DEBIAN
        workers = first["ray"]["workers"]
        assert [node["label"] for node in workers] == ["worker-1", "worker-2"]
        assert all(node["pid"] and node["node_id"] for node in workers), workers
        pids = [pid_of(first, name) for name in stack_pid_files(first)]
        assert [pid_of(second, name) for name in stack_pid_files(second)] == pids
        assert hybriddit_stack("status", stack_overrides)["ray"]["workers"] == workers
        s3_pid, ray_pid = pids[:2]
        weed_processes = [
            p
            for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "weed" and first["state_dir"] in " ".join(p.info["cmdline"] or [])
        ]
        assert len(weed_processes) == 1
        assert_state_is_private(Path(first["state_dir"]))
        if first["prometheus"]["running"]:
            assert scraped_ray_nodes(first["prometheus"]["url"]) == 3  # the head and both worker nodes

        job = subprocess.run(
            [
                Path(sys.executable).with_name("ray"),
                "job",
                "submit",
                "--address",
                first["ray"]["dashboard"],
                "--",
                "python",
                "-c",
                "import ray; ray.init(); print('cpus', ray.cluster_resources()['CPU'], 'nodes',"
                " sorted((n['Labels'].get('hybriddit-node', 'head'), n['Resources'].get('CPU', 0)) for n in ray.nodes()"
                " if n['Alive']))",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO,
            env={**os.environ, **stack_client_env(stack_overrides)},
        )
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        # The head only coordinates; each worker node brings its own CPU.
        assert "cpus 2.0 nodes [('head', 0), ('worker-1', 1.0), ('worker-2', 1.0)]" in job.stdout, job.stdout[-2000:]
        # A client that generates in process (the demo, `hybriddit exec -- python ...`) imports torchao too.
        client = subprocess.run([sys.executable, "-c", "import torchao"], capture_output=True, text=True, timeout=300,
                                cwd=REPO, env={**os.environ, **stack_client_env(stack_overrides)})  # fmt: skip
        assert client.returncode == 0 and "Failed to load" not in client.stdout + client.stderr, client.stderr[-2000:]

        stack_pids = [pid for leader in pids for pid in session_pids(leader)]
        wildcard_ok = only_loopback()  # 0.0.0.0 reaches nothing but `lo` inside a loopback-only namespace
        for pid in stack_pids:
            try:
                connections = psutil.Process(pid).net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            for conn in connections:
                local = conn.laddr.ip
                assert is_loopback(local) or (wildcard_ok and local in ("0.0.0.0", "::")), (pid, conn)
                if conn.raddr:
                    assert is_loopback(conn.raddr.ip), (pid, conn)
    finally:
        down = hybriddit_stack("down", stack_overrides)
    assert down["stopped"] == {"prometheus": first["prometheus"]["running"], "ray_worker-1": True,
                               "ray_worker-2": True, "ray": True, "s3": True}  # fmt: skip
    assert not down["s3"]["running"] and not down["ray"]["running"] and not down["prometheus"]["running"]
    assert down["ray"]["workers"] == []  # their PID files are gone with them
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
