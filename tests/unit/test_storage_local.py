"""services.storage on local paths (bare and file://), and its error classification and retries."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from pydantic import ValidationError

from services import storage


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def test_bare_and_file_uris_round_trip_and_list_in_the_style_they_were_given(tmp_path):
    bare = str(tmp_path / "data")
    storage.write_bytes(storage.join(bare, "b.bin"), b"bee")
    storage.write_json(f"file://{bare}/a.json", {"k": [1, 2]})

    assert storage.read_bytes(f"file://{bare}/b.bin") == b"bee"
    assert storage.read_json(storage.join(bare, "a.json")) == {"k": [1, 2]}
    assert storage.list_uris(bare) == [f"{bare}/a.json", f"{bare}/b.bin"]
    assert storage.list_uris(f"file://{bare}") == [f"file://{bare}/a.json", f"file://{bare}/b.bin"]


def test_recursive_listing_returns_only_files_below_the_prefix(tmp_path):
    for name in ("x/1.bin", "x/deep/2.bin", "y.bin"):
        storage.write_bytes(storage.join(str(tmp_path), name), b"1")
    assert storage.list_uris(str(tmp_path / "x"), recursive=True) == [
        str(tmp_path / "x" / "1.bin"), str(tmp_path / "x" / "deep" / "2.bin")
    ]


def test_listing_a_missing_prefix_is_empty_and_deleting_a_missing_object_is_a_no_op(tmp_path):
    assert storage.list_uris(str(tmp_path / "nothing")) == []
    storage.delete(str(tmp_path / "nothing" / "x.bin"))
    assert not storage.exists(str(tmp_path / "nothing"))


def test_reading_a_missing_file_raises_a_not_found_storage_error_naming_it(tmp_path):
    missing = str(tmp_path / "missing.bin")
    with pytest.raises(storage.StorageNotFoundError, match=f"{missing}: it does not exist"):
        storage.read_bytes(missing)


def test_join_adds_parts_with_single_slashes():
    assert storage.join("s3://bucket/run/", "/ckpt/", "model.safetensors") == "s3://bucket/run/ckpt/model.safetensors"
    assert storage.join("/tmp/run", "a", "b.json") == "/tmp/run/a/b.json"


def test_local_write_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "obj.bin"
    storage.write_bytes(str(target), b"old")
    with pytest.raises(RuntimeError), storage.open_uri(str(target), "wb") as handle:
        handle.write(b"new but unfinished")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["obj.bin"]


def test_publish_writes_a_marker_listing_sizes_and_sha256_of_every_file(tmp_path):
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"\x00" * 10)
    (source / "step.json").write_text("{}")
    target = str(tmp_path / "published")
    assert not storage.is_complete(target)

    storage.publish_dir(source, target)
    assert storage.is_complete(target)
    marker = json.loads((tmp_path / "published" / storage.COMPLETE_MARKER).read_text())
    assert [(f["path"], f["size"]) for f in marker["files"]] == [("model.safetensors", 10), ("step.json", 2)]
    assert marker["files"][0]["sha256"] == "01d448afd928065458cf670b60f5a594d735af0172c8d67f22a81680132681ca"


def test_republishing_hides_the_old_marker_until_the_new_files_are_in(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "w.bin").write_bytes(b"v1")
    target = str(tmp_path / "pub")
    storage.publish_dir(source, target)
    (source / "w.bin").write_bytes(b"v2")
    seen_complete_during_upload = []
    real_upload = storage.upload_file

    def observing_upload(local, uri, config=None):
        seen_complete_during_upload.append(storage.is_complete(target))
        real_upload(local, uri, config)

    monkeypatch.setattr(storage, "upload_file", observing_upload)
    storage.publish_dir(source, target)
    assert seen_complete_during_upload == [False]
    assert storage.is_complete(target)


def test_download_published_dir_rejects_a_file_changed_after_publishing(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "w.bin").write_bytes(b"original")
    storage.publish_dir(source, str(tmp_path / "pub"))
    (tmp_path / "pub" / "w.bin").write_bytes(b"tampered")
    with pytest.raises(storage.StorageError, match="does not match _COMPLETE.json"):
        storage.download_published_dir(str(tmp_path / "pub"), tmp_path / "out")


def test_reading_the_marker_of_an_unpublished_dir_raises_incomplete(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(storage.IncompleteDirectoryError, match="still being uploaded or its upload failed"):
        storage.read_complete_marker(str(tmp_path / "half"))


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (client_error("SlowDown", 503), True),
        (client_error("InternalError", 500), True),
        (client_error("RequestTimeout", 400), True),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ConnectionResetError(), True),
        (client_error("NoSuchBucket", 404), False),
        (client_error("AccessDenied", 403), False),
        (client_error("InvalidAccessKeyId", 403), False),
        (ValueError("bad argument"), False),
    ],
)
def test_only_connection_errors_timeouts_5xx_and_throttling_are_transient(error, transient):
    assert storage.is_transient(error) is transient


def test_a_transient_failure_is_retried_until_the_call_succeeds(caplog):
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    caplog.set_level(logging.WARNING, logger="services.storage")
    config = storage.StorageConfig(retry_deadline_seconds=10, backoff_seconds=0.01)
    assert storage.retry_transient(flaky, "s3://b/k", "read", config) == "ok"
    assert len(calls) == 3 and caplog.text.count("retrying read s3://b/k") == 2


def test_a_client_error_is_not_retried_and_becomes_a_storage_error():
    calls = []

    def denied() -> None:
        calls.append(1)
        raise client_error("AccessDenied", 403)

    with pytest.raises(storage.StorageError, match="access denied"):
        storage.retry_transient(denied, "s3://b/k", "read",
                                storage.StorageConfig(retry_deadline_seconds=10, backoff_seconds=0.01))
    assert len(calls) == 1


def test_transient_failures_are_retried_until_the_deadline_then_fail_naming_endpoint_and_setting(caplog):
    calls = []

    def refused() -> None:
        calls.append(time.monotonic())
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k")

    caplog.set_level(logging.WARNING, logger="services.storage")
    config = storage.StorageConfig(endpoint_url="http://127.0.0.1:1", retry_deadline_seconds=1.5,
                                   backoff_seconds=0.1, max_backoff_seconds=0.4)
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailableError) as failure:
        storage.retry_transient(refused, "s3://b/k", "read", config)
    elapsed = time.monotonic() - started
    message = str(failure.value)
    assert 1.5 <= elapsed < 3.0  # waited the whole deadline, and started no attempt after it
    assert calls[-1] - started >= 1.5 - 0.05  # the last attempt ran at the deadline, not before
    assert "http://127.0.0.1:1" in message and "s3://b/k" in message
    assert storage.RETRY_DEADLINE_ENV in message and f"{len(calls)} attempts" in message
    assert caplog.text.count("retrying read s3://b/k") == len(calls) - 1 >= 3


def test_backoff_doubles_up_to_its_cap_with_jitter_in_the_upper_half():
    config = storage.StorageConfig(backoff_seconds=1.0, max_backoff_seconds=6.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 6.0), (9, 6.0)]:
        waits = {storage._backoff(attempt, config) for _ in range(50)}
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits)
        assert len(waits) > 1, "the waits are not jittered"


def test_local_paths_are_never_retried(tmp_path):
    calls = []

    def timed_out() -> None:
        calls.append(1)
        raise TimeoutError("a local file system that hangs")

    with pytest.raises(storage.StorageUnavailableError, match="1 attempt,"):
        storage.retry_transient(timed_out, str(tmp_path / "x"), "read", storage.StorageConfig())
    assert len(calls) == 1


def test_retry_settings_default_from_the_environment_and_are_validated(monkeypatch):
    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", storage.RETRY_DEADLINE_ENV):
        monkeypatch.delenv(name, raising=False)
    default = storage.StorageConfig()
    assert (default.retry_mode, default.request_attempts) == ("standard", 3)
    assert 120 <= default.retry_deadline_seconds <= 300  # rides out a restart of the S3 server

    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    monkeypatch.setenv(storage.RETRY_DEADLINE_ENV, "30")
    from_env = storage.StorageConfig()
    assert (from_env.retry_mode, from_env.request_attempts, from_env.retry_deadline_seconds) == ("adaptive", 5, 30.0)
    assert storage.StorageConfig(retry_deadline_seconds=7).retry_deadline_seconds == 7  # explicit wins
    assert storage.botocore_config_kwargs(from_env)["retries"] == {"mode": "adaptive", "total_max_attempts": 5}

    monkeypatch.setenv("AWS_RETRY_MODE", "legacy")
    with pytest.raises(ValidationError, match="retry_mode"):
        storage.StorageConfig()


def test_s3_clients_get_the_botocore_retry_settings_and_s3fs_retries_stay_off(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    config = storage.StorageConfig(retry_mode="adaptive", request_attempts=4)
    fs, _ = storage.filesystem("s3://bucket/key", config)
    assert fs.config_kwargs["retries"] == {"mode": "adaptive", "total_max_attempts": 4}
    assert fs.retries == 1
    other, _ = storage.filesystem("s3://bucket/key", config.model_copy(update={"request_attempts": 2}))
    assert other is not fs


def test_filesystems_are_reused_per_protocol_and_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    first, path = storage.filesystem("s3://bucket/a/b")
    second, _ = storage.filesystem("s3://bucket/other")
    other, _ = storage.filesystem("s3://bucket/a", storage.StorageConfig(endpoint_url="http://127.0.0.1:10"))
    assert path == "bucket/a/b" and first is second and other is not first
