"""Training checkpoints as safetensors + JSON, published atomically under `<uri>/step_NNNNNNN/`.

A checkpoint directory holds
    model.safetensors        the trained weights
    export/                  the EMA weights as `model.safetensors` + `model_config.json` (generate.py reads it)
    optimizer.safetensors    the optimizer's per-parameter state tensors, keyed `state.<param>.<name>`
    optimizer.json           its param groups and any non-tensor state
    rng.safetensors          every rank's RNG states, keyed `rank<r>.<name>`
    state.json               step, data position, LR schedule, skip counts, the effective config
and `_COMPLETE.json` (written last by services.storage.publish_dir). Every reader (resume, the
export that generation, evaluation and `init_from` load) follows one rule, `newest_verified`: the
newest step directory whose files match its `_COMPLETE.json` (sizes and sha256); a newer one that
does not verify is skipped with a logged reason. Uploads run in a background thread: training stalls
only for the local write (and for a previous upload still running when the next checkpoint is due).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from services import storage
from trainer.export import CONFIG_FILE, WEIGHTS_FILE

logger = logging.getLogger(__name__)

EXPORT_DIR = "export"
STEP_DIR = re.compile(r"^step_(\d{7,})$")

T = TypeVar("T")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`optimizer.state_dict()` -> (tensors keyed `state.<param>.<name>`, the JSON-able rest)."""
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value
            else:
                scalars[f"{param}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = tensor
    for key, value in rest["scalars"].items():
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: tensors on the CPU and the JSON state."""

    uri: str
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def write_checkpoint_dir(directory: Path, *, model: dict[str, torch.Tensor], optimizer: dict[str, Any],
                         rng: dict[str, torch.Tensor], state: dict[str, Any],
                         write_export: Callable[[Path], None]) -> None:
    """Write one checkpoint's files into a local directory (the part of a save that stalls training)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(model), directory / "model.safetensors")
    optimizer_tensors, optimizer_rest = flatten_optimizer_state(optimizer)
    save_file(_cpu(optimizer_tensors), directory / "optimizer.safetensors")
    (directory / "optimizer.json").write_text(json.dumps(optimizer_rest, indent=1))
    save_file(_cpu(rng), directory / "rng.safetensors")
    (directory / "state.json").write_text(json.dumps(state, indent=2))
    write_export(directory / EXPORT_DIR)


def read_checkpoint_dir(directory: Path, uri: str) -> LoadedCheckpoint:
    return LoadedCheckpoint(
        uri=uri,
        model=load_file(directory / "model.safetensors"),
        ema=load_file(directory / EXPORT_DIR / WEIGHTS_FILE),
        optimizer=unflatten_optimizer_state(load_file(directory / "optimizer.safetensors"),
                                            json.loads((directory / "optimizer.json").read_text())),
        rng=load_file(directory / "rng.safetensors"),
        state=json.loads((directory / "state.json").read_text()),
    )


def complete_steps(uri: str) -> list[int]:
    """Steps of the complete checkpoints under `uri`, ascending."""
    steps = []
    for child in storage.list_uris(uri):
        match = STEP_DIR.match(child.rstrip("/").rsplit("/", 1)[-1])
        if match and storage.is_complete(child):
            steps.append(int(match.group(1)))
    return sorted(steps)


def newest_verified(uri: str, verify: Callable[[str], T]) -> T | None:
    """`verify(step dir URI)` of the newest complete checkpoint under `uri` that verifies, or None if none does.

    `verify` raises `storage.VerificationError` for a checkpoint whose files do not match its marker;
    that checkpoint is skipped (logged with the reason) for the next older one; if none verifies,
    `VerificationError`. Any other failure, e.g. storage still unreachable after its retries,
    propagates: it says nothing about the data.
    """
    steps = complete_steps(uri)
    for step in reversed(steps):
        step_uri = storage.join(uri, step_dir_name(step))
        try:
            return verify(step_uri)
        except storage.VerificationError as error:
            logger.warning("skipping checkpoint %s: it does not verify (%s); trying the previous one", step_uri, error)
    if steps:
        # Starting over from step 0 would silently throw the run away: a person has to decide.
        raise storage.VerificationError(
            f"none of the {len(steps)} complete checkpoints under {uri} verifies (see the warnings above): restore "
            "one, or delete them (or set checkpoint.resume=false) to start from step 0"
        )
    return None


def load_latest(uri: str, local_dir: str | Path | None = None) -> LoadedCheckpoint | None:
    """The newest checkpoint under `uri` whose files match its completion marker (see `newest_verified`), or None."""

    def download(checkpoint_uri: str) -> LoadedCheckpoint:
        with tempfile.TemporaryDirectory(prefix="hybriddit-resume-", dir=local_dir) as scratch:
            storage.download_published_dir(checkpoint_uri, scratch)
            return read_checkpoint_dir(Path(scratch), checkpoint_uri)

    checkpoint = newest_verified(uri, download)
    if checkpoint is not None:
        logger.info("loaded checkpoint %s (step %d)", checkpoint.uri, checkpoint.step)
    return checkpoint


def resolve_export(uri: str) -> tuple[str, str]:
    """(export URI, the directory it belongs to) for an export dir, a step_NNNNNNN dir or a checkpoint root.

    A checkpoint root resolves like resume does (`newest_verified`): the newest step whose export
    matches its marker.
    """
    if storage.exists(storage.join(uri, CONFIG_FILE)):
        return uri, uri
    if storage.exists(storage.join(uri, EXPORT_DIR, CONFIG_FILE)):
        return storage.join(uri, EXPORT_DIR), uri

    def verified_export(step_dir: str) -> tuple[str, str]:
        storage.verify_published_dir(storage.join(step_dir, EXPORT_DIR))
        return storage.join(step_dir, EXPORT_DIR), step_dir

    resolved = newest_verified(uri, verified_export)
    if resolved is None:
        raise FileNotFoundError(f"{uri} holds neither {CONFIG_FILE}, {EXPORT_DIR}/{CONFIG_FILE} nor a complete "
                                "step_NNNNNNN checkpoint whose export verifies: pass an export dir, a step_NNNNNNN "
                                "dir or a train job's checkpoint.uri")
    return resolved


class CheckpointPublisher:
    """Writes checkpoints locally and uploads them in a background thread, one at a time, keeping the last K."""

    def __init__(self, uri: str, keep_last: int, local_dir: str | Path | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.uri = uri
        self.keep_last = keep_last
        self.local_dir = local_dir
        self._upload: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_upload_seconds: float | None = None

    def save(self, step: int, **contents: Any) -> float:
        """Write checkpoint `step` (see `write_checkpoint_dir`) and start its upload; returns the stall in seconds."""
        started = time.perf_counter()
        self.wait()
        staging = Path(tempfile.mkdtemp(prefix=f"hybriddit-{step_dir_name(step)}-", dir=self.local_dir))
        write_checkpoint_dir(staging, **contents)
        self._upload = threading.Thread(target=self._publish, args=(step, staging), name="checkpoint-upload",
                                        daemon=True)
        self._upload.start()
        return time.perf_counter() - started

    def wait(self) -> None:
        """Block until the running upload ends; re-raise its failure here, in the training thread."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"uploading a checkpoint to {self.uri} failed: {error}") from error

    def _publish(self, step: int, staging: Path) -> None:
        started = time.perf_counter()
        target = storage.join(self.uri, step_dir_name(step))
        try:
            storage.publish_dir(staging, target)
            self.prune()
            self.last_upload_seconds = time.perf_counter() - started
            logger.info("published checkpoint %s in %.2f s", target, self.last_upload_seconds)
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def prune(self) -> None:
        """Delete complete checkpoints older than the newest `keep_last`, and abandoned partial ones before them."""
        complete = complete_steps(self.uri)
        keep = set(complete[-self.keep_last:])
        oldest_kept = min(keep)
        for child in storage.list_uris(self.uri):
            match = STEP_DIR.match(child.rstrip("/").rsplit("/", 1)[-1])
            if match and int(match.group(1)) < oldest_kept and int(match.group(1)) not in keep:
                storage.delete(child, recursive=True)
