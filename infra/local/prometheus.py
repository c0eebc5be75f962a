"""A Prometheus server on 127.0.0.1 scraping the local Ray cluster, with the scrape config compose ships.

`infra/prometheus/prometheus.yml` is the one source of the scrape configuration: the local server runs
that file with only the addresses substituted (Ray's service discovery file in this head's session
folder instead of the container's mount, its own listen address) and, when asked, a shorter interval.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from infra.local.credentials import make_private_dir, write_private_text
from infra.local.processes import read_pid, require_free_ports, start_detached, stop_pid
from services.config import StrictModel

log = logging.getLogger(__name__)

SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "prometheus" / "prometheus.yml"
RAY_JOB = "ray"
SELF_JOB = "prometheus"
INSTALL_HINT = (
    "Prometheus is not installed, so the stack runs without it (the Ray dashboard's metrics views stay empty). "
    "Get it with `apt-get install prometheus` (Debian/Ubuntu; scripts/bootstrap.sh does this when run as root "
    "on Debian) or put the `prometheus` binary from https://prometheus.io/download/ on the PATH, then run "
    "`hybriddit stack up` again"
)


class PrometheusSettings(StrictModel):
    """Where the local Prometheus listens and how often it scrapes."""

    port: int = Field(9090, gt=0, lt=65536)
    scrape_interval: str | None = Field(
        None, pattern=r"^[0-9]+(ms|s|m)$", description="e.g. 1s for tests; default: the shipped file's interval"
    )
    retention: str = Field("7d", pattern=r"^[0-9]+[smhdwy]$")


def prometheus_binary() -> Path | None:
    found = shutil.which("prometheus")
    return Path(found) if found else None


def render_config(discovery_file: Path, listen_address: str, scrape_interval: str | None = None) -> dict[str, Any]:
    """The shipped scrape config with this host's addresses: Ray's service discovery file, our own endpoint."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (ray_discovery,) = jobs[RAY_JOB]["file_sd_configs"]
    ray_discovery["files"] = [str(discovery_file)]
    (own,) = jobs[SELF_JOB]["static_configs"]
    own["targets"] = [listen_address]
    if scrape_interval is not None:
        config["global"]["scrape_interval"] = scrape_interval
        config["global"]["evaluation_interval"] = scrape_interval
        ray_discovery["refresh_interval"] = scrape_interval
    return config


class PrometheusServer:
    """A Prometheus whose config, data, log and PID file live in `state_dir`; found again and stopped by PID."""

    def __init__(self, state_dir: Path, settings: PrometheusSettings, *, discovery_file: Path):
        self.state_dir = state_dir
        self.settings = settings
        self.discovery_file = discovery_file
        self.pid_file = state_dir / "prometheus.pid"
        self.config_file = state_dir / "prometheus.yml"
        self.data_dir = state_dir / "data"
        self.log_file = state_dir / "logs" / "prometheus.log"

    @property
    def listen_address(self) -> str:
        return f"127.0.0.1:{self.settings.port}"

    @property
    def url(self) -> str:
        return f"http://{self.listen_address}"

    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def start(self, *, timeout: float = 60.0) -> None:
        if self.pid() is not None:
            return
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError(INSTALL_HINT)
        require_free_ports("Prometheus", {"web": self.settings.port})
        for directory in (self.state_dir, self.data_dir, self.log_file.parent):
            make_private_dir(directory)
        config = render_config(self.discovery_file, self.listen_address, self.settings.scrape_interval)
        header = f"# Rendered from {SHIPPED_CONFIG} at every start (edit that file): only the addresses differ.\n"
        write_private_text(self.config_file, header + yaml.safe_dump(config, sort_keys=False))
        cmd = [
            str(binary),
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--storage.tsdb.retention.time={self.settings.retention}",
            f"--web.listen-address={self.listen_address}",
        ]
        # It needs no environment of ours: no storage keys or Ray token reach it.
        start_detached(cmd, pid_file=self.pid_file, log_file=self.log_file, env={}, cwd=self.state_dir)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.pid() is None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Prometheus did not become ready in {timeout:.0f} s; see {self.log_file}")
            time.sleep(0.3)
        log.info("started Prometheus (pid %s) at %s, scraping the nodes listed in %s", self.pid(), self.url,
                 self.discovery_file)  # fmt: skip

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """One call of Prometheus's HTTP API (`/api/v1/<path>`); returns its `data`, raises on an error answer."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            answer = json.loads(error.read() or b"{}")
            raise RuntimeError(f"Prometheus refused {path} {params}: {answer.get('error', error)}") from error
        return answer["data"]

    def stop(self, *, timeout: float = 30.0) -> bool:
        return stop_pid(self.pid_file, timeout=timeout)
