"""A private SeaweedFS and Ray head on free loopback ports, for the benchmarks that submit real jobs."""

from __future__ import annotations

import os
from pathlib import Path

from services.third_party_notices import QUIET_TORCHAO_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_services(scratch: Path, *, bucket: str = "bench", num_cpus: int = 2,
                   object_store_bytes: int = 1 << 30) -> tuple[object, object, dict[str, str]]:  # fmt: skip
    """Start both; returns them and the environment jobs and clients need (this process's too)."""
    from infra.local.credentials import S3Credentials
    from infra.local.ray_head import RayHead, RaySettings
    from infra.local.seaweedfs import SeaweedS3

    credentials = S3Credentials.generate()
    s3 = SeaweedS3.on_free_ports(scratch / "seaweedfs", credentials)
    s3.start(timeout=60)
    s3.ensure_bucket(bucket)
    env = {**os.environ, **credentials.as_env(), "AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_REGION": "us-east-1",
           **QUIET_TORCHAO_ENV}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    os.environ.update({key: env[key] for key in ("AWS_ENDPOINT_URL", "AWS_REGION", *credentials.as_env())})
    settings = RaySettings.on_free_ports(num_cpus=num_cpus, object_store_memory_bytes=object_store_bytes)
    head = RayHead(scratch / "ray", settings, workdir=REPO_ROOT)
    try:
        head.start(env)
    except BaseException:
        s3.stop()
        raise
    return s3, head, {**env, **head.auth_env()}
