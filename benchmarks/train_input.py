"""Training input benchmark: steps/s streaming the latent cache from S3 vs the same batches already in memory.

    python -m infra.local.netns .venv/bin/python benchmarks/train_input.py [--preset HybridDiT-tiny] [--batch-size 32]

Uses the S3 in AWS_ENDPOINT_URL (e.g. under `hybriddit exec --`) or starts a private SeaweedFS on
loopback. Same model, batch size and train step (trainer.step.train_step) in both arms,
alternated in rounds so that a busy machine slows both alike. Measured twice: with the step on all
cores but one (as on a GPU node, where the step leaves the CPU cores to the input pipeline) and on
all cores (what decoding costs where it competes with the step). Also measures the checkpoint stall:
how long `CheckpointPublisher.save` blocks training vs how long the background upload takes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from services import storage  # noqa: E402


@contextlib.contextmanager
def s3_bucket(scratch: Path, name: str = "train-input"):
    """An s3:// prefix `name` to write to: in the configured endpoint's bucket, or on a private SeaweedFS started here."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield f"s3://{os.environ.get('HYBRIDDIT_BUCKET', 'hybriddit')}/benchmarks/{name}-{os.getpid()}"
        return
    from infra.local.credentials import S3Credentials
    from infra.local.seaweedfs import SeaweedS3

    credentials = S3Credentials.generate()
    server = SeaweedS3.on_free_ports(scratch / "seaweedfs", credentials)
    server.start(timeout=60)
    try:
        server.ensure_bucket("bench")
        os.environ.update({**credentials.as_env(), "AWS_ENDPOINT_URL": server.endpoint_url, "AWS_REGION": "us-east-1"})
        yield f"s3://bench/{name}"
    finally:
        server.stop()


def timed_steps(run, batches, steps: int) -> tuple[float, float]:
    """(seconds for `steps` train steps pulling from `batches`, seconds of that spent waiting for data)."""
    waited = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        run.train_step(batch)
    return time.perf_counter() - started, waited


def compare_arms(run, streamed, in_memory, *, rounds: int, steps_per_round: int) -> dict[str, tuple[float, float]]:
    """arm -> (steps/s, fraction of the time spent waiting for data), arms alternated round by round."""
    timed_steps(run, in_memory, 3)  # warm-up: allocator, first-call kernels at this thread count
    totals = {"stream": [0.0, 0.0], "memory": [0.0, 0.0]}
    arms = [("stream", streamed), ("memory", in_memory)]
    for round_index in range(rounds):
        for arm, batches in arms if round_index % 2 == 0 else arms[::-1]:
            seconds, waited = timed_steps(run, batches, steps_per_round)
            totals[arm][0] += seconds
            totals[arm][1] += waited
    return {arm: (rounds * steps_per_round / seconds, waited / seconds) for arm, (seconds, waited) in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="HybridDiT-tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--loader-process", action=argparse.BooleanOptionalAction, default=True,
                        help="decode in a DataLoader worker process (data.loader_process)")
    parser.add_argument("--checkpoint-preset", help="model for the checkpoint-stall figure (default: --preset)")
    args = parser.parse_args(argv)

    import itertools

    import torch

    from pipelines.demo.synthetic_cache import CHANNELS, TEXT_DIM, write_tiny_cache
    from trainer.config import TrainJobConfig
    from trainer.inputs import resolve_cache
    from trainer.loop import TrainingRun

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="hybriddit-bench-") as scratch, s3_bucket(Path(scratch)) as prefix:
        cache = storage.join(prefix, "cache")
        write_tiny_cache(cache, shard_sizes=[args.samples_per_shard] * args.shards)
        config = TrainJobConfig.model_validate(dict(
            data=dict(uris=[cache], shuffle_window_shards=2, prefetch_shards=2, loader_process=args.loader_process),
            model=dict(preset=args.preset), batch_size=args.batch_size, epochs=1000,
            checkpoint=dict(uri=storage.join(prefix, "ckpt"), resume=False)))
        run = TrainingRun(config, resolve_cache(config))
        streamed = iter(run.data_stream())
        in_memory = itertools.cycle([next(streamed) for _ in range(args.steps_per_round)])
        print(f"model {args.preset}, global batch {args.batch_size}, {args.rounds * args.steps_per_round} steps per "
              f"arm, {args.shards} shards x {args.samples_per_shard} samples on {prefix.split('/')[2]} ({cache}), "
              f"decoding in {'a loader process' if args.loader_process else 'threads of the training process'}")
        # On a GPU node the step runs on the GPU and the CPU cores are free for the input pipeline; a CPU
        # run leaves one core to it for the same picture. All cores to the step shows what decoding costs.
        settings = [("all cores but one (as beside a GPU)", cores - 1)] if cores > 1 else []
        for label, threads in [*settings, ("all cores", cores)]:
            torch.set_num_threads(threads)
            rate = compare_arms(run, streamed, in_memory, rounds=args.rounds, steps_per_round=args.steps_per_round)
            print(f"train step on {label}, {threads} thread(s):")
            print(f"  in memory : {rate['memory'][0]:.3f} steps/s")
            print(f"  S3 stream : {rate['stream'][0]:.3f} steps/s (data wait {rate['stream'][1]:.1%})")
            print(f"  ratio stream/memory: {rate['stream'][0] / rate['memory'][0]:.3f} (goal >= 0.97)")
        streamed.close()

        if args.checkpoint_preset and args.checkpoint_preset != args.preset:
            # the preset's architecture at the cache's latent channels and text width
            model = {"preset": args.checkpoint_preset, "overrides": {"latent_channels": CHANNELS, "text_dim": TEXT_DIM}}
            config = TrainJobConfig.model_validate({**config.model_dump(), "model": model})
        dataset = resolve_cache(config)
        saver = run if config.model.preset == args.preset else TrainingRun(config, dataset)
        stall = saver.publisher.save(1, model=saver.model.state_dict(), optimizer=saver.optimisation.optimizer.state_dict(),
                                     rng={}, state={"step": 1}, write_export=lambda directory: None)
        saver.publisher.wait()
        size = sum(p.numel() * p.element_size() for p in saver.model.parameters()) / 2**20
        print(f"checkpoint of {config.model.preset} ({size:.0f} MiB of weights + optimizer state): training stalled "
              f"{stall:.2f} s, background upload took {saver.publisher.last_upload_seconds:.2f} s")
        storage.delete(prefix, recursive=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
