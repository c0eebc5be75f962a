"""Prometheus config, Grafana provisioning and dashboards agree with services.metrics and the compose mounts."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from infra.local.prometheus import render_config
from services.metrics import EXPORTED_SERIES, METRICS
from tests.fixtures.dashboards import DASHBOARDS, queries
from tests.infra.conftest import REPO

QUERIED_SERIES = re.compile(r"\bray_hybriddit_[A-Za-z0-9_]+")


def load_yaml(relative: str):
    return yaml.safe_load((REPO / relative).read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    return [(query.dashboard, query.expr) for path in DASHBOARDS for query in queries(path)]


def test_prometheus_discovers_ray_nodes_from_the_heads_session_folder(services):
    config = load_yaml("infra/prometheus/prometheus.yml")
    ray_job = next(job for job in config["scrape_configs"] if job["job_name"] == "ray")
    (discovery_file,) = ray_job["file_sd_configs"][0]["files"]
    assert discovery_file == "/tmp/ray/session_latest/prom_metrics_service_discovery.json"
    mounted = {mount.split(":")[1] for mount in services["prometheus"]["volumes"]}
    assert "/tmp/ray" in mounted


def test_the_local_stacks_prometheus_runs_the_shipped_config_with_only_its_addresses_changed():
    shipped = load_yaml("infra/prometheus/prometheus.yml")
    rendered = render_config(Path("/tmp/r/session_latest/sd.json"), "127.0.0.1:19090")
    jobs = {job["job_name"]: job for job in rendered["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/r/session_latest/sd.json"]
    assert jobs["prometheus"]["static_configs"][0]["targets"] == ["127.0.0.1:19090"]
    restored = copy.deepcopy(rendered)
    restored["scrape_configs"][0]["file_sd_configs"][0]["files"] = shipped["scrape_configs"][0]["file_sd_configs"][0]["files"]
    restored["scrape_configs"][1]["static_configs"] = shipped["scrape_configs"][1]["static_configs"]
    assert restored == shipped


def test_a_shorter_scrape_interval_applies_to_scrapes_rules_and_discovery():
    rendered = render_config(Path("/sd.json"), "127.0.0.1:19090", scrape_interval="1s")
    assert rendered["global"] == {"scrape_interval": "1s", "evaluation_interval": "1s"}
    assert rendered["scrape_configs"][0]["file_sd_configs"][0]["refresh_interval"] == "1s"


def test_prometheus_container_mounts_this_config(services):
    assert (
        "./infra/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in services["prometheus"]["volumes"]
    )


def test_grafana_datasource_is_the_one_the_ray_head_and_dashboards_name(services):
    (datasource,) = load_yaml("infra/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["url"] == services["ray-head"]["environment"]["RAY_PROMETHEUS_HOST"]
    assert datasource["name"] == services["ray-head"]["environment"]["RAY_PROMETHEUS_NAME"]
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] == datasource["uid"], (path.name, panel["title"])


def test_grafana_dashboard_providers_read_the_folders_compose_mounts(services):
    providers = load_yaml("infra/grafana/provisioning/dashboards/dashboards.yml")["providers"]
    mounted = {mount.split(":")[1] for mount in services["grafana"]["volumes"]}
    for provider in providers:
        path = provider["options"]["path"]
        assert any(path == target or path.startswith(target + "/") for target in mounted), path


def test_dashboards_are_valid_json_with_unique_uids():
    assert [path.name for path in DASHBOARDS] == ["hybriddit-encode.json", "hybriddit-train.json"]
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(set(uids)) == len(uids)


def test_every_series_a_dashboard_queries_is_exported_by_services_metrics():
    queried = {
        (name, series) for name, expr in dashboard_queries() for series in QUERIED_SERIES.findall(expr)
    }
    assert queried, "no dashboard queries a ray_hybriddit_* series"
    assert sorted((name, series) for name, series in queried if series not in EXPORTED_SERIES) == []


def test_every_job_metric_appears_on_its_jobs_dashboard():
    for job in ("encode", "train"):
        queried = {
            series
            for name, expr in dashboard_queries()
            if name == f"hybriddit-{job}.json"
            for series in QUERIED_SERIES.findall(expr)
        }
        job_metrics = [spec for spec in METRICS.values() if spec.name.startswith(f"hybriddit_{job}_")]
        assert job_metrics, job
        assert [spec.name for spec in job_metrics if not set(spec.exported_series) & queried] == [], job


def test_dashboard_queries_are_valid_promql():
    promql_parser = pytest.importorskip("promql_parser")
    invalid = []
    for name, expr in dashboard_queries():
        try:
            # Grafana substitutes template variables before Prometheus sees the query.
            promql_parser.parse(expr.replace("$session", ".*"))
        except ValueError as error:
            invalid.append((name, expr, str(error)))
    assert invalid == []
