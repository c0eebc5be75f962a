"""The embedded local stack: a SeaweedFS S3 gateway, a Ray head and N Ray worker nodes on 127.0.0.1, under `.stack/`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import Field

from infra.local.credentials import S3Credentials, make_private_dir, write_private_text
from infra.local.netns import only_loopback
from infra.local.prometheus import INSTALL_HINT, PrometheusServer, PrometheusSettings, prometheus_binary
from infra.local.ray_head import RayHead, RaySettings
from infra.local.ray_workers import RayWorkerNode, RayWorkerSettings, worker_nodes
from infra.local.seaweedfs import SeaweedInternalPorts, SeaweedS3
from services.config import StrictModel
from services.third_party_notices import QUIET_TORCHAO_ENV

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR_ENV = "HYBRIDDIT_STACK_DIR"


class StackSettings(StrictModel):
    """Where the local stack keeps its state and which ports it uses."""

    state_dir: Path = Field(default_factory=lambda: Path(os.environ.get(STATE_DIR_ENV, REPO_ROOT / ".stack")))
    bucket: str = "hybriddit"
    s3_port: int = 8333
    s3_internal_ports: SeaweedInternalPorts = Field(default_factory=SeaweedInternalPorts)
    ray: RaySettings = Field(default_factory=RaySettings)
    workers: RayWorkerSettings = Field(default_factory=RayWorkerSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)


class LocalStack:
    """Start, find and stop the S3 server, the Ray head and its worker nodes; each is idempotent."""

    def __init__(self, settings: StackSettings):
        self.settings = settings
        state = settings.state_dir
        self.credentials_file = state / "credentials"
        self.env_file = state / "env"
        self.s3 = SeaweedS3(
            state / "seaweedfs",
            port=settings.s3_port,
            credentials=self._credentials,
            internal_ports=settings.s3_internal_ports,
        )
        head_settings = settings.ray
        if settings.workers.count and head_settings.num_cpus is None:
            # With worker nodes the head only coordinates: tasks, actors and training ranks go to the workers.
            head_settings = head_settings.model_copy(update={"num_cpus": 0})
        self.ray = RayHead(state / "ray", head_settings, workdir=REPO_ROOT)
        self.ray_workers = worker_nodes(state / "ray", settings.workers, head=self.ray, workdir=REPO_ROOT)
        self.prometheus = PrometheusServer(
            state / "prometheus", settings.prometheus, discovery_file=self.ray.metrics_discovery_file
        )

    @classmethod
    def from_env(cls) -> LocalStack:
        return cls(StackSettings())

    @property
    def _credentials(self) -> S3Credentials:
        return S3Credentials.load_or_create(self.credentials_file)

    def up(self) -> dict:
        make_private_dir(self.settings.state_dir)
        (self.settings.state_dir / ".gitignore").write_text("*\n")
        if not self.s3.is_running():
            self.s3.start()
        self.s3.ensure_bucket(self.settings.bucket)
        env_file_lines = [f"export {key}={value}" for key, value in self.client_env().items()]
        write_private_text(self.env_file, "\n".join(env_file_lines) + "\n")
        # Jobs inherit the head's environment: that is how they find the S3 endpoint and keys.
        node_env = {**os.environ, **self.job_env()}
        self.ray.start(node_env)
        for node in self.ray_workers:
            node.start(node_env)
        # Optional: without Prometheus the jobs still run, only the dashboards' metric views stay empty.
        if prometheus_binary() is None:
            log.warning(INSTALL_HINT)
        else:
            self.prometheus.start()
        return self.status()

    def down(self) -> dict:
        # Worker nodes found by their PID files, also those of an earlier `up` with more of them.
        workers = self._started_workers()
        stopped = {
            "prometheus": self.prometheus.stop(),
            **{f"ray_{node.label}": node.stop() for node in workers},
            "ray": self.ray.stop(),
            "s3": self.s3.stop(),
        }
        return {"stopped": stopped, **self.status()}

    def _started_workers(self) -> list[RayWorkerNode]:
        pid_files = (self.settings.state_dir / "ray").glob("worker-*.pid")
        count = max([int(path.stem.removeprefix("worker-")) for path in pid_files] + [self.settings.workers.count])
        return worker_nodes(
            self.settings.state_dir / "ray",
            self.settings.workers.model_copy(update={"count": count}),
            head=self.ray,
            workdir=REPO_ROOT,
        )

    def job_env(self) -> dict[str, str]:
        """What every job on this stack needs: storage endpoint and keys, loopback-only collectives."""
        env = {
            **self.client_env(),
            "TORCHINDUCTOR_CACHE_DIR": str(self.settings.state_dir / "inductor-cache"),
        }
        env.pop("RAY_ADDRESS")
        return env

    def client_env(self, *, missing_ok: bool = False) -> dict[str, str]:
        """Environment that points clients (jobs, `ray job submit`, s3fs, boto3) at this stack."""
        if missing_ok and not self.credentials_file.exists():
            return {}
        env = {
            "AWS_ENDPOINT_URL": self.s3.endpoint_url,
            **self._credentials.as_env(),
            "AWS_REGION": "us-east-1",
            "HYBRIDDIT_BUCKET": self.settings.bucket,
            "RAY_ADDRESS": self.ray.gcs_address,
            "RAY_API_SERVER_ADDRESS": self.ray.dashboard_url,
            **self.ray.auth_env(),
            **QUIET_TORCHAO_ENV,
        }
        if only_loopback():
            env["GLOO_SOCKET_IFNAME"] = "lo"
        return env

    def status(self) -> dict:
        return {
            "state_dir": str(self.settings.state_dir),
            "s3": {
                "running": self.s3.is_running(),
                "endpoint": self.s3.endpoint_url,
                "bucket": self.settings.bucket,
            },
            "ray": {
                "running": self.ray.pid() is not None,
                "address": self.ray.gcs_address,
                "dashboard": self.ray.dashboard_url,
                "workers": [
                    {"label": node.label, "pid": node.pid(), "node_id": node.node_id() if node.pid() else None}
                    for node in self._started_workers()
                ],
            },
            "prometheus": {
                "running": self.prometheus.pid() is not None,
                "pid": self.prometheus.pid(),
                "url": self.prometheus.url,
                "installed": prometheus_binary() is not None,
            },
            "env_file": str(self.env_file),
        }
