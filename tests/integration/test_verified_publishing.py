"""Published directories verify against their `_COMPLETE.json` on a real S3 server (SeaweedFS on loopback):
markers may only name files inside their own prefix, and a damaged export is refused."""

from __future__ import annotations

import re

import pytest
import torch

from services import storage
from trainer.export import CONFIG_FILE, WEIGHTS_FILE, load_exported_model, save_exported_model
from trainer.models import build_model

CODEC = {"name": "pixel", "tiny": False, "factor": 4}
TEXT = {"name": "minilm", "tiny": True}


def published(prefix: str, tmp_path) -> dict:
    source = tmp_path / "src"
    (source / "nested").mkdir(parents=True)
    (source / "nested" / "w.bin").write_bytes(b"weights" * 100)
    (source / "config.json").write_text('{"depth": 2}')
    return storage.publish_dir(source, prefix)


@pytest.mark.parametrize("bad_path", ["../outside.bin", "nested/../../outside.bin", "/etc/passwd", "nested\\w.bin",
                                      "C:/x.bin", "nested//w.bin", "./config.json", ""],
                         ids=["parent", "escaping", "absolute", "backslash", "drive", "empty-segment", "dot", "empty"])
def test_a_marker_naming_a_file_outside_its_prefix_is_refused_naming_the_marker(prefix, tmp_path, bad_path):
    marker = published(prefix, tmp_path)
    marker["files"][0]["path"] = bad_path
    storage.write_json(storage.join(prefix, storage.COMPLETE_MARKER), marker)

    with pytest.raises(storage.StorageError, match=rf"{re.escape(prefix)}/_COMPLETE.json is not a valid completion marker .*"
                                                   "may only list files inside its own prefix"):
        storage.read_complete_marker(prefix)
    with pytest.raises(storage.VerificationError):
        storage.download_published_dir(prefix, tmp_path / "dst" / "inner")
    assert not (tmp_path / "dst").exists()  # nothing was written, inside or outside the target


def test_a_marker_entry_without_a_sha256_is_refused(prefix, tmp_path):
    marker = published(prefix, tmp_path)
    del marker["files"][1]["sha256"]
    storage.write_json(storage.join(prefix, storage.COMPLETE_MARKER), marker)
    with pytest.raises(storage.VerificationError, match=r"files\.1\.sha256: Field required"):
        storage.read_complete_marker(prefix)


def test_a_listed_file_deleted_after_publishing_fails_verification_naming_it(prefix, tmp_path):
    published(prefix, tmp_path)
    storage.delete(storage.join(prefix, "nested", "w.bin"))
    with pytest.raises(storage.VerificationError, match=rf"{re.escape(prefix)}/nested/w.bin is listed in .* but does not exist"):
        storage.verify_published_dir(prefix)
    with pytest.raises(storage.VerificationError, match="does not exist"):
        storage.download_published_dir(prefix, tmp_path / "dst")


def test_verify_published_dir_streams_every_file_and_catches_a_same_size_change(prefix, tmp_path):
    marker = published(prefix, tmp_path)
    assert storage.verify_published_dir(prefix) == marker
    storage.write_bytes(storage.join(prefix, "config.json"), b'{"depth": 3}')  # same size, other bytes
    with pytest.raises(storage.VerificationError, match=r"config.json does not match _COMPLETE.json \(size 12, "
                                                        r"expected 12; sha256 .* expected"):
        storage.verify_published_dir(prefix)


@pytest.fixture
def s3_export(prefix, tmp_path):
    model = build_model("HybridDiT-tiny")
    storage.publish_dir(save_exported_model(tmp_path / "export", model, codec=CODEC, text_encoder=TEXT), prefix)
    return prefix, model


def test_an_export_on_s3_loads_after_verifying_against_its_marker(s3_export):
    uri, model = s3_export
    assert [entry["path"] for entry in storage.read_complete_marker(uri)["files"]] == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded, _ = load_exported_model(uri)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in loaded.state_dict().items())


@pytest.mark.parametrize("tampered", [WEIGHTS_FILE, CONFIG_FILE])
def test_a_tampered_export_is_refused_with_a_clear_message(s3_export, tampered):
    uri, _ = s3_export
    data = bytearray(storage.read_bytes(storage.join(uri, tampered)))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(storage.join(uri, tampered), bytes(data))
    with pytest.raises(storage.VerificationError, match=rf"{re.escape(uri)}/{tampered} does not match _COMPLETE.json .*"
                                                        "changed or damaged after publishing"):
        load_exported_model(uri)


def test_an_export_without_its_marker_is_refused_as_incomplete(s3_export):
    uri, _ = s3_export
    storage.delete(storage.join(uri, storage.COMPLETE_MARKER))
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(uri)} is not a complete export: it has no _COMPLETE.json"):
        load_exported_model(uri)
