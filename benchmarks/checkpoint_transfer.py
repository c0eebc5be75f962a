"""Checkpoint transfer benchmark: a HybridDiT-148M checkpoint to and from S3, s3fs vs boto3 managed transfers.

    python -m infra.local.netns .venv/bin/python benchmarks/checkpoint_transfer.py [--rounds 3]

Uses the S3 in AWS_ENDPOINT_URL (e.g. under `hybriddit exec --`) or starts a private SeaweedFS on
loopback. The checkpoint is real: the HybridDiT-148M model, its AdamW state after one training step
and the EMA export, written by the project's checkpoint writer (trainer.checkpoint.write_checkpoint_dir).
Its files are moved up and down by both arms, alternated round by round so that a busy machine
slows both alike:
    s3fs   the path before managed transfers: `fs.put_file(chunksize=8 MiB)` up, `fs.open` + copy into a
           temp file down
    boto3  services.storage.upload_file / download_file (services.s3_transfer)
Every download is checked against the source's sha256. Besides MiB/s it prints the CPU seconds per
GiB each arm costs the client process and the SeaweedFS server (when started here): on a machine
whose cores are busy, CPU rather than concurrency bounds a transfer on loopback. Also measures how
long a checkpoint blocks training (CheckpointPublisher.save: the local write) and how long its
background publish takes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.train_input import s3_bucket  # noqa: E402
from services import storage  # noqa: E402

MiB = 2**20


def trained_state(preset: str) -> dict:
    """The model, AdamW and EMA of `preset` after one real training step, as CheckpointPublisher.save takes them."""
    import torch

    from trainer.config import OptimizerConfig
    from trainer.ema import EMA
    from trainer.export import save_exported_model
    from trainer.flow_matching import flow_matching_loss
    from trainer.models import build_model
    from trainer.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(preset)
    optimizer, schedule = build_optimizer(model, OptimizerConfig(), total_steps=1000)
    ema = EMA(model, decay=0.9999)
    config = model.config
    latents = torch.randn(2, config.latent_channels, config.latent_size, config.latent_size)
    text, mask = torch.randn(2, 16, config.text_dim), torch.ones(2, 16, dtype=torch.bool)
    loss, _, _ = flow_matching_loss(model, latents, text, mask)
    loss.backward()
    optimizer.step()
    schedule.step()
    ema.update(model)
    return dict(
        model=model.state_dict(), optimizer=optimizer.state_dict(), rng={"cpu": torch.get_rng_state()},
        state={"step": 1, "schedule": schedule.state_dict()},
        write_export=lambda directory: save_exported_model(
            directory, ema.module, codec={"name": "dc-ae-f32c32-sana-1.1"}, text_encoder={"name": "t5-base"},
            state_dict=ema.state_dict()),
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 * MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def s3fs_upload(local: Path, uri: str) -> None:
    fs, path = storage.filesystem(uri)
    fs.put_file(str(local), path, chunksize=storage.MULTIPART_CHUNK_BYTES)


def s3fs_download(uri: str, local: Path) -> None:
    fs, path = storage.filesystem(uri)
    with storage._local_staging_file(str(local)) as handle, fs.open(path, "rb") as source:
        shutil.copyfileobj(source, handle, storage.MULTIPART_CHUNK_BYTES)


def seaweedfs_process(scratch: str):
    """The SeaweedFS server that s3_bucket started under `scratch`, or None (an endpoint from the environment)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any(scratch in argument for argument in process.info["cmdline"] or []):
            return process
    return None


def cpu_seconds(process) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


@contextlib.contextmanager
def measured(totals: list[float], client, server) -> Iterator[None]:
    """Add the block's wall seconds and the client's and server's CPU seconds to `totals`."""
    before = (time.perf_counter(), cpu_seconds(client), cpu_seconds(server))
    yield
    after = (time.perf_counter(), cpu_seconds(client), cpu_seconds(server))
    for index, (start, end) in enumerate(zip(before, after, strict=True)):
        totals[index] += end - start


ARMS: dict[str, tuple[Callable[[Path, str], None], Callable[[str, Path], None]]] = {
    "s3fs": (s3fs_upload, s3fs_download),
    "boto3": (storage.upload_file, storage.download_file),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="HybridDiT-148M")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from trainer.checkpoint import CheckpointPublisher, write_checkpoint_dir

    config = storage.StorageConfig()
    with tempfile.TemporaryDirectory(prefix="hybriddit-bench-") as scratch, s3_bucket(Path(scratch), "checkpoint-transfer") as prefix:
        contents = trained_state(args.preset)
        source = Path(scratch, "checkpoint")
        started = time.perf_counter()
        write_checkpoint_dir(source, **contents)
        write_seconds = time.perf_counter() - started
        files = sorted(path.relative_to(source).as_posix() for path in source.rglob("*") if path.is_file())
        sizes = {name: (source / name).stat().st_size for name in files}
        digests = {name: sha256_of(source / name) for name in files}
        total = sum(sizes.values()) / MiB
        print(f"{args.preset} checkpoint: {total:.0f} MiB in {len(files)} files "
              f"({', '.join(f'{name} {size / MiB:.0f} MiB' for name, size in sizes.items() if size >= MiB)}); "
              f"S3 at {storage.endpoint_of(prefix)}; boto3: parts of {config.transfer_chunk_bytes // MiB} MiB, "
              f"{config.transfer_max_concurrency} in flight; s3fs: parts of {storage.MULTIPART_CHUNK_BYTES // MiB} MiB; "
              f"{args.rounds} rounds, arms alternated")

        import psutil

        client, server = psutil.Process(), seaweedfs_process(scratch)
        # (arm, way) -> [wall seconds, client CPU seconds, server CPU seconds]
        spent = {(arm, way): [0.0, 0.0, 0.0] for arm in ARMS for way in ("up", "down")}

        for round_index in range(args.rounds):
            order = list(ARMS) if round_index % 2 == 0 else list(ARMS)[::-1]
            for arm in order:
                upload, download = ARMS[arm]
                remote = storage.join(prefix, f"{arm}-round{round_index}")
                back = Path(scratch, f"back-{arm}")
                with measured(spent[arm, "up"], client, server):
                    for name in files:
                        upload(source / name, storage.join(remote, name))
                with measured(spent[arm, "down"], client, server):
                    for name in files:
                        download(storage.join(remote, name), back / name)
                wrong = [name for name in files if sha256_of(back / name) != digests[name]]
                if wrong:
                    raise SystemExit(f"{arm} round {round_index}: downloaded {wrong} differ from the checkpoint")
                shutil.rmtree(back)
                storage.delete(remote, recursive=True)
            print(f"round {round_index + 1}: " + ", ".join(
                f"{arm} {way} {spent[arm, way][0] / (round_index + 1):.1f} s" for arm in ARMS for way in ("up", "down")),
                flush=True)

        gib = args.rounds * total / 1024
        for way, label in (("up", "upload"), ("down", "download")):
            rate = {arm: args.rounds * total / spent[arm, way][0] for arm in ARMS}
            cost = ", ".join(f"{arm} {spent[arm, way][1] / gib:.1f} + {spent[arm, way][2] / gib:.1f}" for arm in ARMS)
            print(f"{label:8s}: s3fs {rate['s3fs']:6.1f} MiB/s, boto3 {rate['boto3']:6.1f} MiB/s, ratio boto3/s3fs "
                  f"{rate['boto3'] / rate['s3fs']:.2f} (goal >= 2); CPU s/GiB client + server: {cost}")
        print(f"load average during the run: {', '.join(f'{load:.1f}' for load in os.getloadavg())} "
              f"on {os.cpu_count()} cores")

        publisher = CheckpointPublisher(storage.join(prefix, "published"), keep_last=1, local_dir=scratch)
        stall = publisher.save(1, **contents)
        publisher.wait()
        print(f"training blocked by a checkpoint: {stall:.2f} s (CheckpointPublisher.save, the local write; "
              f"write_checkpoint_dir alone took {write_seconds:.2f} s); its background publish through boto3 "
              f"(sha256 of every file + uploads + marker) took {publisher.last_upload_seconds:.2f} s; "
              f"uploading the files through s3fs took {spent['s3fs', 'up'][0] / args.rounds:.2f} s")
        storage.delete(prefix, recursive=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
