from __future__ import annotations

import io
import json
import re
import threading
import time
from datetime import datetime, timedelta, timezone

import numpy as np
from rich.console import Console

from pipelines.config import LeaseConfig
from pipelines.lease import WriterLease
from services.cache.manifest import (
    UnitProgress,
    build_manifest,
    list_progress,
    write_manifest,
    write_plan,
    write_progress,
)
from services.cache.schema import CacheSample
from services.cache.status import job_state, summarize, watch
from services.cache.writer import UnitShardWriter
from services.cli import main


def encode_unit(out: str, unit: str, samples: int, finished_at: datetime, failures: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    with UnitShardWriter(out, unit, latent_dtype="fp16", text_dtype="int8") as writer:
        for i in range(samples):
            text = rng.standard_normal((4, 8)).astype(np.float32)
            writer.write(CacheSample(f"{unit}-{i}", np.zeros((4, 2, 2), np.float32), text, "a caption", {}))
    write_progress(
        out,
        UnitProgress(
            unit=unit,
            input_uri=f"/data/{unit}.tar",
            shards=writer.close(),
            samples_written=samples,
            failures=failures,
            seconds=2.0,
            finished_at=finished_at,
        ),
    )


def test_status_json_reports_units_samples_failures_and_throughput(tmp_path, capsys):
    out = str(tmp_path)
    start = datetime(2026, 11, 21, 12, 0, 0, tzinfo=timezone.utc)
    write_plan(out, ["u1", "u2", "u3"])
    encode_unit(out, "u1", 6, start + timedelta(seconds=2), {"decode_error": 1})
    encode_unit(out, "u2", 4, start + timedelta(seconds=4), {"decode_error": 2, "too_small": 1})
    assert main(["status", out, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["units_done"], status["units_total"], status["units_remaining"]) == (2, 3, ["u3"])
    assert status["samples"] == 10 and status["shards"] == 2 and status["buckets"] == {"2x2": 10}
    assert status["bytes"] == sum(p.stat().st_size for p in (tmp_path / "shards").rglob("*.tar"))
    assert status["failures"] == {"decode_error": 3, "too_small": 1}
    assert status["samples_per_second_per_unit"] == 10 / 4.0
    assert status["samples_per_second_wall"] == 10 / 4.0  # u1 ran 0-2 s, u2 2-4 s
    assert status["eta_seconds"] == 5 / 2.5


def test_status_table_shows_units_done_of_total(tmp_path, capsys):
    write_plan(str(tmp_path), ["u1", "u2"])
    encode_unit(str(tmp_path), "u1", 3, datetime.now(timezone.utc), {})
    assert main(["status", str(tmp_path)]) == 0
    assert "1 / 2" in capsys.readouterr().out


def test_status_of_a_prefix_without_a_cache_fails_with_a_message(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nothing")]) == 1
    assert "no _plan.json" in capsys.readouterr().out


def publish(out: str) -> None:
    """The manifest over every finished unit, as the encode job publishes it at its end."""
    card = build_manifest(out, codec={"name": "pixel"}, latent_channels=4, latent_scale=1.0, latent_shift=0.0,
                          latent_dtype="fp16", text_encoder={"name": "tiny-test"}, text_dim=8, text_max_len=4,
                          text_dtype="int8", job_config={}, progresses=list_progress(out))  # fmt: skip
    write_manifest(out, card)


def run_like_an_encode_job(out: str, units: list[str], *, publish_at_end: bool, pause: float) -> None:
    """What the encode job writes, in its order: lease, plan, one progress record per unit, manifest, release."""
    with WriterLease(out, None, LeaseConfig()):
        write_plan(out, units)
        for index, unit in enumerate(units):
            time.sleep(pause)
            encode_unit(out, unit, 2 + index, datetime.now(timezone.utc), {"decode_error": 1} if index == 1 else {})
        time.sleep(pause)
        if publish_at_end:
            publish(out)


def watched_frames(out: str, job: threading.Thread) -> tuple[str, str]:
    # A terminal without colours: Live redraws each frame in place (it only prints the last one to a pipe).
    console = Console(file=io.StringIO(), width=150, force_terminal=True, color_system=None)
    job.start()
    try:
        state = watch(out, interval=0.1, console=console)
    finally:
        job.join(timeout=60)
    return state, console.file.getvalue()


def test_watch_redraws_the_progress_of_a_running_job_and_ends_when_it_publishes_its_manifest(tmp_path):
    out = str(tmp_path / "cache")
    units = ["u1", "u2", "u3", "u4"]
    job = threading.Thread(target=run_like_an_encode_job, args=(out, units), kwargs={"publish_at_end": True,
                                                                                      "pause": 1.0})  # fmt: skip
    state, frames = watched_frames(out, job)
    assert state == "finished"
    # The units were seen arriving while the job ran (frame by frame, never going back); the last frame is
    # the published cache.
    done = [int(count) for count in re.findall(r"│ units +│ (\d) / 4", frames)]
    assert done == sorted(done) and len(set(done)) >= 3 and done[-1] == 4, done
    states = re.findall(r"│ encode job +│ (\w+)", frames)
    assert "running" in states and states[-1] == "finished"
    last = frames[frames.rindex("│ encode job"):]
    assert "4 / 4" in last and "decode_error: 1" in last and "samples/s" in last
    assert "not written yet" not in last


def test_watch_ends_when_the_job_stops_before_its_manifest_and_the_command_says_so(tmp_path, capsys):
    out = str(tmp_path / "cache")
    job = threading.Thread(target=run_like_an_encode_job, args=(out, ["u1", "u2"]), kwargs={"publish_at_end": False,
                                                                                             "pause": 0.3})  # fmt: skip
    job.start()
    try:
        code = main(["status", out, "--watch", "--interval", "0.1"])
    finally:
        job.join(timeout=60)
    assert code == 1
    assert "stopped before publishing its manifest" in capsys.readouterr().out


def test_a_manifest_of_an_earlier_run_does_not_end_the_watch_of_a_new_run(tmp_path):
    out = str(tmp_path / "cache")
    write_plan(out, ["u1"])
    encode_unit(out, "u1", 2, datetime.now(timezone.utc), {})
    publish(out)
    assert job_state(out) == "finished"
    time.sleep(0.01)
    write_plan(out, ["u1", "u2"])  # a second run starts on the same cache
    assert job_state(out) == "stopped"  # no lease: nothing writes it
    with WriterLease(out, None, LeaseConfig()):
        assert job_state(out) == "running"


def test_throughput_over_the_last_minute_counts_only_units_finished_in_it(tmp_path):
    out = str(tmp_path)
    now = datetime(2026, 11, 21, 12, 10, 0, tzinfo=timezone.utc)
    write_plan(out, ["u1", "u2", "u3", "u4"])
    encode_unit(out, "u1", 50, now - timedelta(minutes=5), {})  # long ago: not in the last minute's pace
    encode_unit(out, "u2", 6, now - timedelta(seconds=30), {})
    encode_unit(out, "u3", 6, now - timedelta(seconds=10), {})
    status = summarize(out, now=now)
    assert status["samples_per_second_last_minute"] == 12 / 60
    assert status["eta_seconds"] == 1 * (62 / 3) / (12 / 60)
