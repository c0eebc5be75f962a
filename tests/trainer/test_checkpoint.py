"""Checkpoints: safetensors + JSON round trip, atomic publish with the completion marker last, keep-last-K, no stall."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from services import storage
from trainer import checkpoint as ckpt


def contents(step: int, value: float):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        model.weight.fill_(value)

    def write_export(directory):
        directory.mkdir()
        from safetensors.torch import save_file

        save_file({"weight": torch.full((2, 3), value)}, directory / "model.safetensors")

    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                rng={"rank0.generator": torch.Generator().manual_seed(step).get_state()},
                state={"step": step, "data_position": {"epoch": 0, "batches": step}}, write_export=write_export)


def test_optimizer_state_round_trips_through_tensors_and_json():
    state = contents(1, 0.5)["optimizer"]
    tensors, rest = ckpt.flatten_optimizer_state(state)
    restored = ckpt.unflatten_optimizer_state(tensors, json.loads(json.dumps(rest)))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(restored)
    assert optimizer.param_groups[0]["betas"] == [0.8, 0.9]
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


def test_published_checkpoint_loads_back_and_is_the_newest_complete_one(tmp_path):
    publisher = ckpt.CheckpointPublisher(str(tmp_path / "ckpts"), keep_last=2)
    publisher.save(5, **contents(5, 0.25))
    publisher.wait()
    loaded = ckpt.load_latest(str(tmp_path / "ckpts"))
    assert loaded.step == 5
    assert torch.all(loaded.model["weight"] == 0.25) and torch.all(loaded.ema["weight"] == 0.25)
    assert loaded.state["data_position"] == {"epoch": 0, "batches": 5}
    assert ckpt.complete_steps(str(tmp_path / "ckpts")) == [5]


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    publisher = ckpt.CheckpointPublisher(str(tmp_path / "ckpts"), keep_last=2)
    for step in (1, 2, 3, 4):
        publisher.save(step, **contents(step, float(step)))
    publisher.wait()
    assert ckpt.complete_steps(str(tmp_path / "ckpts")) == [3, 4]


def test_a_failed_upload_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    root = str(tmp_path / "ckpts")
    publisher = ckpt.CheckpointPublisher(root, keep_last=3)
    publisher.save(1, **contents(1, 1.0))
    publisher.wait()
    uploads = []
    real_upload = storage.upload_file

    def dying_upload(local, uri, config=None):  # the job is killed after the first file of step 2
        uploads.append(uri)
        if len(uploads) > 1:
            raise KeyboardInterrupt("killed")
        real_upload(local, uri, config)

    monkeypatch.setattr(storage, "upload_file", dying_upload)
    publisher.save(2, **contents(2, 2.0))
    with pytest.raises(RuntimeError, match="uploading a checkpoint"):
        publisher.wait()
    assert storage.exists(storage.join(root, "step_0000002", "export"))  # partly uploaded
    assert ckpt.complete_steps(root) == [1]
    assert ckpt.load_latest(root).step == 1


def test_saving_stalls_training_only_for_the_local_write(tmp_path, monkeypatch):
    real_publish = storage.publish_dir

    def slow_publish(local_dir, uri, config=None):
        time.sleep(1.0)
        return real_publish(local_dir, uri, config)

    monkeypatch.setattr(storage, "publish_dir", slow_publish)
    publisher = ckpt.CheckpointPublisher(str(tmp_path / "ckpts"), keep_last=2)
    stall = publisher.save(1, **contents(1, 1.0))
    publisher.wait()
    assert stall < 0.5 <= publisher.last_upload_seconds


def big_contents(step: int, seed: int):
    """About 130 MB to upload (weights, AdamW moments, EMA export): long enough for an outage to land mid-upload."""
    generator = torch.Generator().manual_seed(seed)
    weights = {f"block{i}.weight": torch.randn(1024, 2048, generator=generator) for i in range(4)}
    optimizer = {"state": {i: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(1024, 2048, generator=generator),
                               "exp_avg_sq": torch.rand(1024, 2048, generator=generator)} for i in range(4)},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0, 1, 2, 3]}]}

    def write_export(directory):
        directory.mkdir()
        from safetensors.torch import save_file

        save_file({name: value * 0.5 for name, value in weights.items()}, directory / "model.safetensors")

    return dict(model=weights, optimizer=optimizer, rng={"rank0.generator": generator.get_state()},
                state={"step": step, "data_position": {"epoch": 0, "batches": step}}, write_export=write_export)


@pytest.mark.slow
def test_a_30_s_s3_outage_during_a_checkpoint_upload_is_waited_out_and_the_checkpoint_resumes(s3_server, caplog):
    root = s3_server.uri("checkpoint-tests", f"outage-{time.monotonic_ns()}")
    publisher = ckpt.CheckpointPublisher(root, keep_last=2)
    publisher.save(1, **contents(1, 1.0))
    publisher.wait()
    saved = big_contents(2, seed=7)
    caplog.set_level(logging.WARNING, logger="services.storage")
    started = time.monotonic()
    publisher.save(2, **saved)
    step_dir = storage.join(root, ckpt.step_dir_name(2))
    while not storage.list_uris(step_dir, recursive=True):  # the upload has begun: its first file is there
        assert time.monotonic() - started < 60, "the upload never began"
        time.sleep(0.02)
    with s3_server.stopped(restart_after=30) as outage:
        pass  # the block ends when the server is back, 30 s after it stopped
    publisher.wait()  # raises if the upload failed
    seconds = time.monotonic() - started
    assert "retrying upload to" in caplog.text, "the outage missed the upload"
    assert outage.seconds >= 30
    assert ckpt.complete_steps(root)[-1] == 2
    resumed = ckpt.load_latest(root)  # checks every file against the completion marker's sha256
    assert resumed.step == 2 and resumed.state == saved["state"]
    assert all(torch.equal(resumed.model[name], value) for name, value in saved["model"].items())
    assert torch.equal(resumed.optimizer["state"][3]["exp_avg_sq"], saved["optimizer"]["state"][3]["exp_avg_sq"])
    print(f"checkpoint upload with a {outage.seconds:.1f} s outage took {seconds:.1f} s")


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies_on_s3(s3_server, request, caplog):
    root = s3_server.uri("checkpoints", f"{request.node.name}-{time.monotonic_ns()}")
    publisher = ckpt.CheckpointPublisher(root, keep_last=3)
    for step in (1, 2, 3):
        publisher.save(step, **contents(step, float(step)))
    publisher.wait()
    damaged = storage.join(root, ckpt.step_dir_name(3), "optimizer.safetensors")
    data = bytearray(storage.read_bytes(damaged))
    data[-1] ^= 0xFF  # one flipped bit of optimizer state: safetensors would load it without complaint
    storage.write_bytes(damaged, bytes(data))

    with caplog.at_level("WARNING", logger="trainer.checkpoint"):
        loaded = ckpt.load_latest(root)
    assert loaded.step == 2 and loaded.uri == storage.join(root, ckpt.step_dir_name(2))
    assert torch.all(loaded.model["weight"] == 2.0)
    skipped = [record.message for record in caplog.records if "skipping checkpoint" in record.message]
    assert len(skipped) == 1
    assert skipped[0].startswith(f"skipping checkpoint {storage.join(root, ckpt.step_dir_name(3))}: it does not verify")
    assert "optimizer.safetensors does not match _COMPLETE.json" in skipped[0]


def test_resume_refuses_to_start_over_when_no_checkpoint_verifies(tmp_path):
    root = str(tmp_path / "ckpts")
    publisher = ckpt.CheckpointPublisher(root, keep_last=2)
    for step in (1, 2):
        publisher.save(step, **contents(step, float(step)))
    publisher.wait()
    for step in (1, 2):
        (tmp_path / "ckpts" / ckpt.step_dir_name(step) / "state.json").write_text("{}")
    with pytest.raises(storage.VerificationError, match="none of the 2 complete checkpoints under .* verifies"):
        ckpt.load_latest(root)


def test_the_export_inside_a_checkpoint_carries_its_own_marker_uploaded_after_its_files(tmp_path, monkeypatch):
    from trainer.export import save_exported_model
    from trainer.models import build_model

    uploaded = []
    real_upload = storage.upload_file
    monkeypatch.setattr(storage, "upload_file", lambda local, uri, config=None: (uploaded.append(uri.rsplit(
        "/step_0000001/", 1)[1]), real_upload(local, uri, config)))
    publisher = ckpt.CheckpointPublisher(str(tmp_path / "ckpts"), keep_last=1)
    step = contents(1, 1.0) | {"write_export": lambda directory: save_exported_model(
        directory, build_model("HybridDiT-tiny"), codec={}, text_encoder={})}
    publisher.save(1, **step)
    publisher.wait()
    export_files = [name for name in uploaded if name.startswith("export/")]
    assert export_files == ["export/model.safetensors", "export/model_config.json", "export/_COMPLETE.json"]
    storage.verify_published_dir(str(tmp_path / "ckpts" / ckpt.step_dir_name(1) / "export"))
