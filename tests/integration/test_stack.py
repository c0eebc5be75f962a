"""The local stack: idempotent start, a real `ray job submit`, loopback-only sockets, stop by PID."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from infra.local.netns import only_loopback
from infra.local.processes import free_port, session_pids
from infra.local.ray_head import RayHead, RaySettings
from infra.local.seaweedfs import SeaweedInternalPorts, free_port_with_grpc_twin

REPO = Path(__file__).resolve().parents[2]
HYBRIDDIT = [sys.executable, "-m", "services.cli"]


@pytest.fixture(scope="module")
def stack_overrides(tmp_path_factory) -> list[str]:
    state_dir = tmp_path_factory.mktemp("stack")
    internal = SeaweedInternalPorts.free()
    ports = {
        **{f"s3_internal_ports.{name}": port for name, port in internal.model_dump().items()},
        "s3_port": free_port_with_grpc_twin(avoid=internal.model_dump().values()),
        "ray.gcs_port": free_port(),
        "ray.dashboard_port": free_port(),
        "ray.client_port": free_port(),
        "ray.metrics_export_port": free_port(),
        "ray.dashboard_agent_port": free_port(),
    }
    settings = [f"state_dir={state_dir}", "ray.num_cpus=1", f"ray.object_store_memory_bytes={256 << 20}"]
    return [arg for item in settings + [f"{k}={v}" for k, v in ports.items()] for arg in ("--set", item)]


def hybriddit_stack(action: str, overrides: list[str]) -> dict:
    done = subprocess.run(
        [*HYBRIDDIT, "stack", action, *overrides], cwd=REPO, capture_output=True, text=True, timeout=240
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
    modes = {str(path): oct(path.stat().st_mode & 0o777) for path in private}
    assert modes == {str(path): "0o700" for path in private}


def test_stack_up_twice_submit_job_loopback_only_then_down(stack_overrides):
    try:
        first = hybriddit_stack("up", stack_overrides)
        second = hybriddit_stack("up", stack_overrides)
        assert first["s3"]["running"] and first["ray"]["running"]
        s3_pid = pid_of(first, "seaweedfs/seaweedfs.pid")
        ray_pid = pid_of(first, "ray/ray.pid")
        assert (pid_of(second, "seaweedfs/seaweedfs.pid"), pid_of(second, "ray/ray.pid")) == (s3_pid, ray_pid)
        weed_processes = [
            p
            for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "weed" and first["state_dir"] in " ".join(p.info["cmdline"] or [])
        ]
        assert len(weed_processes) == 1
        assert_state_is_private(Path(first["state_dir"]))

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
                "import ray; ray.init(); print('cpus', ray.cluster_resources()['CPU'])",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO,
            env={**os.environ, **stack_client_env(stack_overrides)},
        )
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        assert "cpus 1.0" in job.stdout

        stack_pids = session_pids(s3_pid) + session_pids(ray_pid)
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
    assert down["stopped"] == {"ray": True, "s3": True}
    assert not down["s3"]["running"] and not down["ray"]["running"]
    for pid in (s3_pid, ray_pid):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
