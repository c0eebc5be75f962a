"""storage.upload_file / download_file on s3:// (boto3 managed transfers) against a real SeaweedFS server."""

from __future__ import annotations

import hashlib
import logging
import threading

import pytest

from services import s3_transfer, storage

PART = 5 * 2**20  # S3's smallest part: many parts from a small file


def payload(name: str, size: int) -> bytes:
    """Deterministic bytes that differ per name and per 32-byte block, so a shifted or mixed part cannot pass."""
    blocks = (hashlib.sha256(f"{name}/{index}".encode()).digest() for index in range(size // 32 + 1))
    return b"".join(blocks)[:size]


@pytest.fixture
def in_parts(s3_server) -> storage.StorageConfig:
    """The session server's settings with 5 MiB parts and two in flight."""
    return s3_server.config(transfer_threshold_bytes=PART, transfer_chunk_bytes=PART, transfer_max_concurrency=2)


def changed(config: storage.StorageConfig, changes: dict) -> storage.StorageConfig:
    return storage.StorageConfig.model_validate({**config.model_dump(), **changes})


def head(uri: str, config: storage.StorageConfig) -> dict:
    bucket, key = storage.split_uri(uri)[1].split("/", 1)
    return s3_transfer.client(config).head_object(Bucket=bucket, Key=key)


def test_multipart_round_trip_keeps_every_byte_and_the_sha256(prefix, in_parts, tmp_path):
    data = payload("round-trip", 4 * PART + 123_457)  # 5 parts, the last one short
    source = tmp_path / "up.bin"
    source.write_bytes(data)
    uri = storage.join(prefix, "checkpoint", "model.safetensors")

    storage.upload_file(source, uri, in_parts)
    assert head(uri, in_parts)["ETag"].strip('"').endswith("-5")  # S3 marks multipart ETags with the part count
    target = tmp_path / "down" / "model.safetensors"
    storage.download_file(uri, target, in_parts)

    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert target.read_bytes() == data
    assert sorted(path.name for path in target.parent.iterdir()) == ["model.safetensors"]  # no temp file left


def test_a_file_below_the_threshold_goes_up_in_one_put_and_comes_back_whole(prefix, in_parts, tmp_path):
    data = payload("small", PART - 1)
    (tmp_path / "small.bin").write_bytes(data)
    uri = storage.join(prefix, "small.bin")
    storage.upload_file(tmp_path / "small.bin", uri, in_parts)
    assert "-" not in head(uri, in_parts)["ETag"]
    storage.download_file(uri, tmp_path / "back.bin", in_parts)
    assert (tmp_path / "back.bin").read_bytes() == data


def version(uri: str, config: storage.StorageConfig) -> tuple[int, str] | None:
    """(size, ETag) of the object a reader would get now, or None if there is none."""
    from botocore.exceptions import ClientError

    try:
        answer = head(uri, config)
    except ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return None
        raise
    return answer["ContentLength"], answer["ETag"]


def _poll_while_uploading(uri: str, source, config: storage.StorageConfig) -> list[tuple[bool, tuple | None]]:
    """HEAD `uri` over and over while `source` is uploaded to it: (upload still running, version or None)."""
    writer = threading.Thread(target=storage.upload_file, args=(source, uri, config))
    writer.start()
    seen = []
    while True:
        running = writer.is_alive()
        seen.append((running, version(uri, config)))
        if not running:
            break
    writer.join()
    return seen


def test_a_new_object_is_absent_until_its_multipart_upload_completes_then_whole(prefix, in_parts, tmp_path):
    data = payload("new", 5 * PART)
    (tmp_path / "new.bin").write_bytes(data)
    uri = storage.join(prefix, "new.bin")
    config = changed(in_parts, {"transfer_max_concurrency": 1})  # parts one by one: a long window

    seen = _poll_while_uploading(uri, tmp_path / "new.bin", config)

    final = version(uri, config)
    assert final[0] == len(data) and final[1].strip('"').endswith("-5")
    assert seen[0] == (True, None)  # polled while parts were going up
    assert all(found in (None, final) for _, found in seen), "a partial object was visible"
    assert seen[-1] == (False, final) and storage.read_bytes(uri, config) == data


def test_an_overwritten_object_reads_old_or_new_but_never_a_mix(prefix, in_parts, tmp_path):
    old, new = payload("old", 3 * PART + 7), payload("new", 5 * PART)
    uri = storage.join(prefix, "replaced.bin")
    storage.write_bytes(uri, old, in_parts)
    before = version(uri, in_parts)
    (tmp_path / "new.bin").write_bytes(new)
    config = changed(in_parts, {"transfer_max_concurrency": 1})

    seen = _poll_while_uploading(uri, tmp_path / "new.bin", config)

    final = version(uri, config)
    assert final[0] == len(new) and final != before
    assert seen[0] == (True, before)
    assert all(found in (before, final) for _, found in seen), "a partial or mixed object was visible"
    assert seen[-1] == (False, final) and storage.read_bytes(uri, config) == new


def test_a_missing_bucket_is_named_with_the_uri_and_the_fix_on_upload_and_not_found_on_download(
        s3_server, in_parts, tmp_path):
    (tmp_path / "big.bin").write_bytes(payload("big", 2 * PART))
    uri = "s3://no-such-bucket-for-transfers/run/model.safetensors"
    with pytest.raises(storage.StorageError) as failure:
        storage.upload_file(tmp_path / "big.bin", uri, in_parts)
    message = str(failure.value)
    assert message.startswith(f"cannot upload to {uri}: bucket 'no-such-bucket-for-transfers' does not exist")
    assert s3_server.endpoint_url in message and "s3 mb s3://no-such-bucket-for-transfers" in message
    # A download starts with a HEAD, whose 404 has no body to tell a missing bucket from a missing key.
    with pytest.raises(storage.StorageNotFoundError, match=f"cannot download {uri}: it does not exist"):
        storage.download_file(uri, tmp_path / "out.bin", in_parts)


def test_download_of_a_missing_key_is_a_not_found_error_naming_the_uri(prefix, in_parts, tmp_path):
    uri = storage.join(prefix, "never-written.safetensors")
    with pytest.raises(storage.StorageNotFoundError, match=f"cannot download {uri}: it does not exist"):
        storage.download_file(uri, tmp_path / "out.bin", in_parts)
    assert list(tmp_path.iterdir()) == []  # no empty or partial local file


def test_wrong_keys_fail_at_once_naming_the_uri_and_the_variable_never_the_secret(s3_server, prefix, in_parts,
                                                                                   tmp_path, caplog):
    (tmp_path / "w.bin").write_bytes(payload("w", 2 * PART))
    uri = storage.join(prefix, "w.bin")
    storage.upload_file(tmp_path / "w.bin", uri, in_parts)
    wrong_secret = changed(in_parts, {"secret_access_key": "not-the-secret-5678", "request_attempts": 3,
                                       "retry_deadline_seconds": 60})
    unknown_key = changed(in_parts, {"access_key_id": "HDNOSUCHKEY", "request_attempts": 3,
                                      "retry_deadline_seconds": 60})
    cases = [
        (lambda: storage.upload_file(tmp_path / "w.bin", uri, wrong_secret), f"cannot upload to {uri}",
         "AWS_SECRET_ACCESS_KEY"),
        (lambda: storage.upload_file(tmp_path / "w.bin", uri, unknown_key), f"cannot upload to {uri}",
         "AWS_ACCESS_KEY_ID"),
        # A HEAD answer has no body, so S3 can only say 403 here: the message names both keys.
        (lambda: storage.download_file(uri, tmp_path / "x.bin", wrong_secret), f"cannot download {uri}",
         "AWS_SECRET_ACCESS_KEY"),
    ]
    caplog.set_level(logging.WARNING, logger="services.storage")
    for transfer, names_uri, names_variable in cases:
        with pytest.raises(storage.StorageError) as failure:
            transfer()
        assert "retrying" not in caplog.text  # a 4xx is not transient
        message = str(failure.value)
        assert names_uri in message and names_variable in message
        assert "not-the-secret-5678" not in message
        assert s3_server.credentials.secret_access_key.get_secret_value() not in message
    assert not (tmp_path / "x.bin").exists()


def test_unreachable_endpoint_is_retried_by_retry_transient_then_fails_naming_the_uri(closed_port, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 1000)
    config = storage.StorageConfig(endpoint_url=f"http://127.0.0.1:{closed_port}", access_key_id="HDANY",
                                   secret_access_key="any-secret", request_attempts=1, retry_deadline_seconds=1.0,
                                   backoff_seconds=0.05, max_backoff_seconds=0.1)
    for transfer, action in ((lambda: storage.upload_file(tmp_path / "f.bin", "s3://b/k", config), "upload to"),
                             (lambda: storage.download_file("s3://b/k", tmp_path / "g.bin", config), "download")):
        with pytest.raises(storage.StorageUnavailableError,
                           match=rf"cannot {action} s3://b/k: the server at http://127.0.0.1:{closed_port} kept failing "
                                 r"for \d+\.\d s \((\d+) attempts, retry deadline 1 s"):
            transfer()


def test_clients_are_shared_per_settings_and_separate_per_keys(s3_server, in_parts):
    assert s3_transfer.client(in_parts) is s3_transfer.client(changed(in_parts, {}))
    assert s3_transfer.client(in_parts) is not s3_transfer.client(s3_server.config())  # another pool size
    other_keys = changed(in_parts, {"access_key_id": "HDOTHER"})
    assert s3_transfer.client(other_keys) is not s3_transfer.client(in_parts)
