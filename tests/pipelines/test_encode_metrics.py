"""The encode job's throughput metrics reach Ray's Prometheus endpoint (what Grafana and the dashboard read)."""

from __future__ import annotations

import time
import urllib.request

from pipelines.demo.photos import PHOTOS_BY_NAME, write_photo_folder
from services.metrics import ENCODE_METRICS
from tests.pipelines.test_encode_job import encode_args, run_job

SCRAPE_DEADLINE_S = 90  # Ray's agents export what workers record every few seconds


def scrape(ports: list[int]) -> str:
    """What Prometheus collects from every node (each exports what its own workers record)."""
    expositions = []
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            expositions.append(response.read().decode())
    return "\n".join(expositions)


def test_an_encode_job_exports_the_projects_metrics_on_rays_metrics_endpoint(ray_cluster, s3_server, tmp_path):
    photos = tuple(PHOTOS_BY_NAME[name] for name in ("astronaut", "coffee", "chelsea"))
    corpus = tmp_path / "corpus"
    write_photo_folder(corpus, photos)
    (corpus / "no_caption.jpg").write_bytes((corpus / "coffee.jpg").read_bytes())
    summary = run_job(ray_cluster, encode_args({"kind": "folder", "root": str(corpus)}, s3_server.uri("metrics-cache")))
    assert summary["samples_written"] == 3

    wanted = {spec.exported_name for spec in ENCODE_METRICS}
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        exposition = scrape(ray_cluster.metrics_ports())
        missing = {name for name in wanted if name not in exposition}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert missing == set()
    assert 'reason="missing_caption"' in exposition
