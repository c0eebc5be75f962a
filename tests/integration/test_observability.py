"""Watched for real: a real Prometheus scrapes a cluster running a real encode and train job and answers every
query of every shipped Grafana dashboard; a real headless Chromium shows the job on the Ray dashboard."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.local.processes import free_port
from infra.local.prometheus import PrometheusServer, PrometheusSettings, prometheus_binary
from pipelines.demo.photos import PHOTOS, write_photo_folder
from pipelines.demo.synthetic_cache import write_tiny_cache
from services import storage
from services.cache.manifest import shard_uris
from tests.fixtures.browser import Chromium, needs_chromium
from tests.fixtures.corpora import make_bad_input_corpus
from tests.fixtures.dashboards import DASHBOARDS, queries, substitute, template_values
from tests.fixtures.ray_cluster import REPO, RayCluster, new_submission_id, running_cluster
from tests.pipelines.test_encode_job import deprecation_notices, encode_args, summary_of
from tests.trainer.test_train_job import summary_of as train_summary_of
from tests.trainer.test_train_job import train_argv

SCRAPE_SECONDS = 1
# Ray's processes hand what they record to their node's exporter every second (default 10 s): a scrape
# then sees a short test job's counters rise and its gauges while it runs.
REPORT_ENV = {"RAY_metrics_report_interval_ms": "1000"}
JOB_TIMEOUT_S = 420
PAGE_RELOAD_S = 20
PHOTO_COPIES = 6
# The encode graph's stages (pipelines/graph.py) as the Ray dashboard names its Ray Data operators.
ENCODE_OPERATORS = ("read_unit", "ImageEncoderActor", "TextEncoderActor", "ShardFragmentWriter")
RAY_AUTH_COOKIE = "ray-authentication-token"  # ray._private.authentication.authentication_constants
# The job page shows its datasets in a collapsed "Ray Data Overview" section, each dataset's operators behind an
# arrow: open both as a user would (a click each), then read what the page shows.
REVEAL_RAY_DATA = """(() => {
  const click = element => element.dispatchEvent(new MouseEvent("click", {bubbles: true}));
  const text = () => document.body ? document.body.innerText : "";
  if (!text().includes("Dataset / Operator Name")) {
    for (const header of document.querySelectorAll("h4")) {
      if (header.innerText.trim() === "Ray Data Overview") click(header);
    }
  }
  for (const title of document.querySelectorAll("svg title")) {
    if (title.textContent.startsWith("Expand Dataset ")) click(title.parentElement);
  }
  return text();
})()"""


def needs_prometheus() -> pytest.MarkDecorator:
    """Skip without Prometheus, except where scripts/bootstrap.sh installs it (root on Debian): there, fail."""
    installs_it = os.geteuid() == 0 and Path("/etc/debian_version").exists()
    return pytest.mark.skipif(prometheus_binary() is None and not installs_it, reason="no prometheus on the PATH")


pytestmark = [needs_prometheus(), needs_chromium()]


@dataclass
class Watched:
    cluster: RayCluster
    prometheus: PrometheusServer
    state: Path


@dataclass
class JobRun:
    summary: dict
    started: float
    ended: float
    log: str


@pytest.fixture(scope="module")
def watched(s3_server, tmp_path_factory) -> Iterator[Watched]:
    state = tmp_path_factory.mktemp("watched")
    with running_cluster(state / "ray", node_env=REPORT_ENV) as cluster:
        prometheus = PrometheusServer(
            state / "prometheus",
            PrometheusSettings(port=free_port(), scrape_interval=f"{SCRAPE_SECONDS}s"),
            discovery_file=cluster.head.metrics_discovery_file,
        )
        prometheus.start()
        try:
            yield Watched(cluster, prometheus, state)
        finally:
            prometheus.stop()


def submit_in_background(cluster: RayCluster, argv: list[str], log_path: Path, submission_id: str):
    log = open(log_path, "w")  # noqa: SIM115 - closed by finish()
    job = subprocess.Popen(cluster.submit_command(argv, submission_id=submission_id), cwd=REPO, env=cluster.env,
                           stdout=log, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return job, log


def finish(job: subprocess.Popen, log, log_path: Path) -> str:
    try:
        job.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        log.close()
    return log_path.read_text()


@pytest.fixture(scope="module")
def encode_run(watched, s3_server) -> Iterator[tuple[JobRun, dict, dict[str, str]]]:
    """An encode job of good and broken inputs, watched in Chromium on the Ray dashboard while it runs.

    One image per encoder call and per writer call: the counters rise image by image over many scrapes,
    as a large job's do, instead of in one step at the end.
    """
    cluster = watched.cluster
    corpus = watched.state / "corpus"
    expected = {**make_bad_input_corpus(corpus), **dict.fromkeys(write_photo_folder(corpus))}
    # Enough images that on an idle machine, too, the writes span several scrapes.
    for copy in range(1, PHOTO_COPIES):
        for photo in PHOTOS:
            for suffix in (".jpg", ".txt"):
                (corpus / f"{photo.name}_{copy}{suffix}").write_bytes((corpus / f"{photo.name}{suffix}").read_bytes())
            expected[f"{photo.name}_{copy}"] = None
    out = s3_server.uri("watched", "cache")
    submission_id = new_submission_id("encode-watched")
    log_path = watched.state / "encode.log"
    started = time.time()
    source = {"kind": "folder", "root": str(corpus), "files_per_unit": 8}
    one_by_one = ["--set", "codec.batch_size=1", "--set", "text.batch_size=1", "--set", "output.fragment_samples=1"]
    job, log = submit_in_background(cluster, encode_args(source, out, *one_by_one), log_path, submission_id)
    try:
        page = watch_in_browser(cluster, submission_id, job, watched.state / "browser")
    finally:
        output = finish(job, log, log_path)
    ended = time.time()
    summary = summary_of(subprocess.CompletedProcess(job.args, job.returncode, output, ""))
    assert job.returncode == 0, output[-4000:]
    assert deprecation_notices(output) == []
    yield JobRun(summary, started, ended, output), page, expected


def watch_in_browser(cluster: RayCluster, submission_id: str, job: subprocess.Popen, folder: Path) -> dict:
    """Open the job's page on the Ray dashboard (logged in with the token cookie the dashboard's own login sets)
    and wait until it shows the job and every encode operator, or the job has ended and the page settled."""
    folder.mkdir(parents=True, exist_ok=True)
    token = Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    url = f"{cluster.dashboard_url}/#/jobs/{submission_id}"
    # The job's own details (its entrypoint, not only the id from the URL) and its operators.
    wanted = (submission_id, "pipelines/encode_latents.py", *ENCODE_OPERATORS)
    while not any(entry.get("submission_id") == submission_id and entry["status"] == "RUNNING"
                  for entry in cluster.head.list_state("jobs")):  # fmt: skip
        assert job.poll() is None, "the encode job ended before it was seen running"
        time.sleep(1)
    with Chromium(folder / "profile") as browser:
        browser.set_cookie(cluster.dashboard_url, RAY_AUTH_COOKIE, token)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        settle_until = None
        opened = 0.0
        while True:
            if time.monotonic() - opened > PAGE_RELOAD_S:
                # Loaded again now and then: a page that asked before the job's datasets existed keeps its answer.
                if opened:
                    browser.reload()
                else:
                    browser.open(url)
                opened = time.monotonic()
                time.sleep(2)
            text = browser.evaluate(REVEAL_RAY_DATA) or ""
            missing = [name for name in wanted if name not in text]
            if not missing or time.monotonic() > deadline or (settle_until and time.monotonic() > settle_until):
                break
            if job.poll() is not None and settle_until is None:
                settle_until = time.monotonic() + 2 * PAGE_RELOAD_S  # the job's end, seen on the page
            time.sleep(1)
        running = job.poll() is None
        # The Ray Data Overview (the dataset and its operators) at the top of the picture.
        browser.evaluate("[...document.querySelectorAll('h4')].find(h => h.innerText.trim() === 'Ray Data Overview')"
                         "?.scrollIntoView({block: 'start'})")  # fmt: skip
        time.sleep(1)  # the last click's rows drawn
        screenshot = browser.screenshot(folder / "ray-dashboard-encode-job.png")
    return {"text": text, "missing": missing, "job_running_when_seen": running, "screenshot": screenshot, "url": url}


@pytest.fixture(scope="module")
def train_run(watched, s3_server, encode_run) -> JobRun:
    """A short one-rank train job on a tiny cache with one damaged shard (counted as skipped samples)."""
    cache = s3_server.uri("watched", "train-cache")
    write_tiny_cache(cache, shard_sizes=[16, 16, 16, 16])
    damaged = shard_uris(cache)[1]
    data = bytearray(storage.read_bytes(damaged))
    data[700:4700] = b"\xff" * 4000  # the size stays, the sha256 the manifest recorded no longer matches
    storage.write_bytes(damaged, bytes(data))
    argv = train_argv(cache, s3_server.uri("watched", "train", "checkpoints"))
    argv += ["--set", "max_steps=20", "--set", "report_every=5", "--set", "checkpoint.every_steps=10",
             "--set", "scaling.num_workers=1"]
    log_path = watched.state / "train.log"
    started = time.time()
    job, log = submit_in_background(watched.cluster, argv, log_path, new_submission_id("train-watched"))
    output = finish(job, log, log_path)
    assert job.returncode == 0, output[-4000:]
    return JobRun(train_summary_of(output), started, time.time(), output)


def points_of(series: dict) -> list[tuple[float, float]]:
    """(time, value) of one series of a range query, without the NaN points (no data there)."""
    return [(float(at), float(value)) for at, value in series["values"] if not math.isnan(float(value))]


@pytest.fixture(scope="module")
def panel_answers(watched, encode_run, train_run, tmp_path_factory) -> dict:
    """Each query of each dashboard, asked over the time range of both jobs as Grafana's panels ask it."""
    time.sleep(3 * SCRAPE_SECONDS)  # the jobs' last values reach a scrape
    start, end = math.floor(encode_run[0].started) - 5, math.ceil(time.time())
    answers = {}
    for path in DASHBOARDS:
        values = template_values(path, watched.prometheus, start, end, SCRAPE_SECONDS, SCRAPE_SECONDS)
        for query in queries(path):
            expr = substitute(query.expr, values)
            result = watched.prometheus.api("query_range", query=expr, start=str(start), end=str(end),
                                            step=f"{SCRAPE_SECONDS}s")["result"]  # fmt: skip
            answers[(query.dashboard, query.panel, query.ref_id)] = {
                "expr": expr,
                "series": {json.dumps(series["metric"], sort_keys=True): points_of(series) for series in result},
            }
    report = {
        f"{dashboard} / {panel} / {ref_id}": {
            series: {"last": points[-1][1] if points else None, "max": max((v for _, v in points), default=None)}
            for series, points in answer["series"].items()
        }
        for (dashboard, panel, ref_id), answer in answers.items()
    }
    report_path = tmp_path_factory.mktemp("panels") / "panel_values.json"
    report_path.write_text(json.dumps(report, indent=2))
    print(f"\npanel values ({report_path}):\n{json.dumps(report, indent=2)}")
    return answers


def panel(answers: dict, dashboard: str, title: str, ref_id: str = "A") -> dict[str, list[tuple[float, float]]]:
    return answers[(dashboard, title, ref_id)]["series"]


def during(run: JobRun, points: list[tuple[float, float]]) -> list[float]:
    return [value for at, value in points if run.started <= at <= run.ended]


def test_prometheus_scrapes_every_ray_node_through_rays_service_discovery_file(watched, encode_run):
    # Scraped successfully during the job (a single scrape may time out on a loaded machine): Prometheus's own
    # `up` series of each target found in the head's discovery file.
    since = math.ceil(time.time() - encode_run[0].started) + 5
    answer = watched.prometheus.api("query", query=f'max by (instance) (max_over_time(up{{job="ray"}}[{since}s]))')
    scraped = {series["metric"]["instance"] for series in answer["result"] if float(series["value"][1]) == 1}
    assert {f"127.0.0.1:{port}" for port in watched.cluster.metrics_ports()} <= scraped, answer["result"]


def test_every_panel_of_every_dashboard_returns_series_while_the_jobs_run(panel_answers, encode_run, train_run):
    runs = {"hybriddit-encode.json": encode_run[0], "hybriddit-train.json": train_run}
    assert {dashboard for dashboard, _, _ in panel_answers} == set(runs) == {path.name for path in DASHBOARDS}
    empty = [key for key, answer in panel_answers.items()
             if not any(during(runs[key[0]], points) for points in answer["series"].values())]  # fmt: skip
    assert empty == [], [panel_answers[key]["expr"] for key in empty]


def test_encode_throughput_panels_show_images_and_bytes_per_second_while_the_job_runs(panel_answers, encode_run):
    run = encode_run[0]
    assert run.summary["samples_written"] > 0
    (images_rate,) = panel(panel_answers, "hybriddit-encode.json", "Images per second").values()
    (images_gauge,) = panel(panel_answers, "hybriddit-encode.json", "Images per second", "B").values()
    (bytes_rate,) = panel(panel_answers, "hybriddit-encode.json", "Cache write throughput").values()
    peaks = {name: max(during(run, points), default=0.0)
             for name, points in (("images/s", images_rate), ("images/s (job's gauge)", images_gauge),
                                  ("bytes/s", bytes_rate))}  # fmt: skip
    print(f"encode: peaks while the job ran {peaks} ({run.summary['samples_written']} samples in "
          f"{run.ended - run.started:.0f} s)")  # fmt: skip
    assert all(peak > 0 for peak in peaks.values()), peaks


def test_the_dropped_samples_panel_shows_the_counts_of_the_jobs_summary(panel_answers, encode_run):
    run, _, expected = encode_run
    assert run.summary["failures"] == dict(sorted(Counter(reason for reason in expected.values() if reason).items()))
    shown = {json.loads(series)["reason"]: points[-1][1]
             for series, points in panel(panel_answers, "hybriddit-encode.json", "Samples dropped by reason").items()}
    assert shown == run.summary["failures"]
    per_minute = panel(panel_answers, "hybriddit-encode.json", "Failures by reason (per minute)")
    assert {json.loads(series)["reason"] for series in per_minute} == set(run.summary["failures"])


def test_the_skipped_samples_panel_shows_the_train_jobs_skips(panel_answers, train_run):
    skipped = train_run.summary["samples_skipped"]
    assert skipped and set(skipped) == {"checksum_mismatch"}
    (total,) = panel(panel_answers, "hybriddit-train.json", "Samples skipped").values()
    assert total[-1][1] == sum(skipped.values())


def test_the_ray_dashboard_shows_the_encode_job_and_its_ray_data_operators_in_chromium(encode_run):
    page = encode_run[1]
    assert page["missing"] == [], page["text"][-3000:]
    assert page["screenshot"].stat().st_size > 20_000
    print(f"\nRay dashboard {page['url']} (job running when seen: {page['job_running_when_seen']}): "
          f"{page['screenshot']}")

