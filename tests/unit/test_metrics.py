"""The jobs' metric names, tags and recorders (services.metrics)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infra.local.netns import only_loopback
from infra.local.processes import free_port
from services.metrics import EXPORTED_SERIES, METRIC_NAMES, METRICS, EncodeMetrics, TrainMetrics

PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
REPO = Path(__file__).resolve().parents[2]


def test_metric_names_are_exactly_the_ones_jobs_and_dashboards_agree_on():
    assert set(METRIC_NAMES) == {
        "hybriddit_encode_images_total",
        "hybriddit_encode_bytes_written_total",
        "hybriddit_encode_shards_written_total",
        "hybriddit_encode_failures_total",
        "hybriddit_encode_stage_seconds",
        "hybriddit_encode_images_per_second",
        "hybriddit_train_loss",
        "hybriddit_train_grad_norm",
        "hybriddit_train_lr",
        "hybriddit_train_steps_per_second",
        "hybriddit_train_samples_per_second",
        "hybriddit_train_data_wait_fraction",
        "hybriddit_train_checkpoint_seconds",
        "hybriddit_train_step",
        "hybriddit_train_samples_skipped_total",
    }
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES))


def test_every_metric_name_is_a_valid_prometheus_name():
    invalid = [name for name in EXPORTED_SERIES | set(METRIC_NAMES) if not PROMETHEUS_NAME.match(name)]
    assert invalid == []


def test_counters_and_only_counters_end_in_total():
    for spec in METRICS.values():
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name


def test_exported_names_carry_rays_prefix():
    assert METRICS["hybriddit_train_loss"].exported_series == ("ray_hybriddit_train_loss",)
    assert METRICS["hybriddit_encode_stage_seconds"].exported_series == (
        "ray_hybriddit_encode_stage_seconds_bucket",
        "ray_hybriddit_encode_stage_seconds_sum",
        "ray_hybriddit_encode_stage_seconds_count",
    )


def test_tags_are_the_ones_dashboards_group_by():
    assert METRICS["hybriddit_encode_failures_total"].tag_keys == ("reason",)
    assert METRICS["hybriddit_encode_stage_seconds"].tag_keys == ("stage",)
    assert METRICS["hybriddit_train_samples_skipped_total"].tag_keys == ("reason",)
    assert METRICS["hybriddit_train_loss"].tag_keys == ("rank",)
    assert METRICS["hybriddit_train_data_wait_fraction"].tag_keys == ("rank",)


def test_histogram_boundaries_are_positive_and_increasing():
    boundaries = METRICS["hybriddit_encode_stage_seconds"].boundaries
    assert boundaries[0] > 0
    assert list(boundaries) == sorted(set(boundaries))


def test_recorders_refuse_to_start_outside_a_connected_ray_process(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="ray.init"):
        EncodeMetrics()
    with pytest.raises(RuntimeError, match="ray.init"):
        TrainMetrics(rank=0)


@pytest.fixture
def as_if_connected(monkeypatch):
    """Ray metric objects accept records without a cluster (they go nowhere): enough to test validation."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)


def test_unknown_encode_stage_is_rejected_with_the_allowed_ones(as_if_connected):
    with pytest.raises(ValueError, match="'resize' is not one of read, decode, vae, text, write"):
        EncodeMetrics().stage_seconds("resize", 0.1)


def test_negative_counter_increment_is_rejected(as_if_connected):
    with pytest.raises(ValueError, match="only grows"):
        EncodeMetrics().failures("http_404", -1)


def test_zero_increment_is_accepted(as_if_connected):
    recorder = EncodeMetrics()
    recorder.images_encoded(0)
    recorder.failures("decode_error", 0)


def test_data_wait_fraction_outside_unit_interval_is_rejected(as_if_connected):
    with pytest.raises(ValueError, match="data_wait_fraction"):
        TrainMetrics(rank=0).step(1, 0.5, 1.0, 1e-4, 2.0, 64.0, data_wait_fraction=1.5)


def test_negative_rank_is_rejected(as_if_connected):
    with pytest.raises(ValueError, match="rank must be >= 0"):
        TrainMetrics(rank=-1)


RECORD_AND_SCRAPE = textwrap.dedent(
    """
    import json, sys, time, urllib.request
    import ray
    from services.metrics import EXPORTED_SERIES, EncodeMetrics, TrainMetrics

    port = int(sys.argv[1])
    ray.init(address="local", num_cpus=1, object_store_memory=80 * 2**20, include_dashboard=False,
             _metrics_export_port=port)
    encode = EncodeMetrics()
    encode.images_encoded(8)
    encode.bytes_written(4096)
    encode.shards_written()
    encode.failures("decode_error")
    encode.stage_seconds("vae", 0.2)
    encode.images_per_second(12.5)
    train = TrainMetrics(rank=0)
    train.step(10, 0.25, 1.5, 4e-4, 2.0, 64.0, 0.1)
    train.checkpoint_seconds(3.0)
    train.samples_skipped("bad_latent_shape")
    found = set()
    deadline = time.time() + 60
    while time.time() < deadline and not EXPORTED_SERIES <= found:
        time.sleep(1)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        found = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line.startswith("ray_hybriddit")}
    print(json.dumps(sorted(found)))
    ray.shutdown()
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not only_loopback(), reason="starts Ray: run on loopback only (make test-slow)")
def test_recorded_metrics_appear_on_rays_prometheus_endpoint_under_the_exported_names():
    result = subprocess.run(
        [sys.executable, "-c", RECORD_AND_SCRAPE, str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert sorted(EXPORTED_SERIES - found) == []
