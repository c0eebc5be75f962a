from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np

from services.cache.manifest import UnitProgress, write_plan, write_progress
from services.cache.schema import CacheSample
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
