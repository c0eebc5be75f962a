"""Encode-job benchmark: the Ray job vs a bare loop over the same encoders and images, and cache bytes/sample.

    python -m infra.local.netns .venv/bin/python benchmarks/encode_throughput.py [--copies 40] [--runs 3] [--resolution 256]

Starts a private SeaweedFS and Ray head on loopback (2 CPUs). Both arms encode the same folder of
bundled photos with taef2 + MiniLM and write the cache to S3: (a) `pipelines.local_loop.run_local`
in this process, (b) `ray job submit -- python pipelines/encode_latents.py`. The ratio compares
the steady rates: images/s through the middle half of each run (between the writes that pass a
quarter and three quarters of the images), what a corpus of millions of images sees once the
startup is paid and the pipeline is full. The startup (until the first sample is written: on Ray,
workers started and encoders loaded; the bare loop builds its encoders before its clock starts)
and the whole-run rates are printed beside it. Then the cache size per sample: the reference layout (text padded to 384 x 768 fp16 + mask) vs real-token text in fp16 and
int8, for fine-t2i-length prompts with DC-AE's 32 x 16 x 16 latents, and int8's cosine to fp32.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks.private_stack import start_services  # noqa: E402
from services.third_party_notices import QUIET_TORCHAO_ENV  # noqa: E402

os.environ.update(QUIET_TORCHAO_ENV)  # before anything imports torchao
from pipelines.encode_latents import SUMMARY_PREFIX  # noqa: E402

REFERENCE_TEXT_TOKENS = 384
T5_DIM = 768
DCAE_LATENT = (32, 16, 16)
CONFIG = "configs/encode/folder-taef2-minilm.yaml"


def job_overrides(corpus: Path, out_uri: str, resolution: int) -> list[str]:
    settings = {"source": json.dumps({"kind": "folder", "root": str(corpus), "files_per_unit": 16}),
                "output.uri": out_uri, "preprocess.resolution": resolution, "progress_bar": "false"}  # fmt: skip
    return [f"{key}={value}" for key, value in settings.items()]


def bare_loop(corpus: Path, out_uri: str, resolution: int) -> dict:
    from pipelines.config import EncodeJobConfig
    from pipelines.local_loop import run_local
    from services.config import load_config

    job = load_config(EncodeJobConfig, REPO_ROOT / CONFIG, job_overrides(corpus, out_uri, resolution))
    return run_local(job).model_dump()


def ray_job(head, env: dict[str, str], corpus: Path, out_uri: str, resolution: int) -> dict:
    overrides = [arg for item in job_overrides(corpus, out_uri, resolution) for arg in ("--set", item)]
    command = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", head.dashboard_url, "--",
               "python", "pipelines/encode_latents.py", "--config", CONFIG, *overrides]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith(SUMMARY_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the Ray job failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(lines[-1][len(SUMMARY_PREFIX):])


def long_prompt() -> str:
    """A fine-t2i-length enhanced prompt (~1,000 characters) from the hand-written photo prompts."""
    from pipelines.demo.photos import PHOTOS

    return " ".join(photo.enhanced_prompt for photo in PHOTOS)[:1000]


def tar_bytes_per_sample(samples: list[dict], count: int = 100) -> float:
    from webdataset import TarWriter

    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False, mtime=0) as writer:
        for index in range(count):
            writer.write({**samples[index % len(samples)], "__key__": f"sample-{index:06d}"})
    return len(buffer.getvalue()) / count


def cache_layouts() -> dict[str, float]:
    """Bytes/sample of the reference padded layout and of real-token fp16 / int8 text, plus int8 cosine."""
    from services.cache.schema import (
        CacheSample,
        dequantize_text_int8,
        encode_sample,
        npy_bytes,
        quantize_text_int8,
    )
    from services.encoders import build_text_encoder

    prompt = long_prompt()
    minilm = build_text_encoder("minilm", max_length=512)
    tokens = len(minilm.tokenizer(prompt)["input_ids"])  # WordPiece: about the token rate of T5's SentencePiece
    real_states = minilm.encode([prompt])[0].numpy()
    rng = np.random.default_rng(0)
    latent = rng.standard_normal(DCAE_LATENT).astype(np.float32)
    text = rng.standard_normal((tokens, T5_DIM)).astype(np.float32)
    meta = {"source": "finet2i", "original_size": [1024, 1024], "crop_box": [0, 0, 1024, 1024], "bucket": [512, 512],
            "aesthetic_score": 6.1, "codec": "dc-ae-f32c32-sana-1.1", "text_encoder": "t5-base"}  # fmt: skip
    padded = np.zeros((REFERENCE_TEXT_TOKENS, T5_DIM), np.float16)
    padded[:tokens] = text
    reference = {"latents.npy": npy_bytes(latent.astype(np.float16)[None]), "text.npy": npy_bytes(padded),
                 "text_mask.npy": npy_bytes(np.arange(REFERENCE_TEXT_TOKENS) < tokens),
                 "caption.txt": prompt.encode(), "meta.json": json.dumps(meta).encode()}  # fmt: skip
    sample = CacheSample("k", latent, text, prompt, meta)
    quantized, scales = quantize_text_int8(real_states)
    restored = dequantize_text_int8(quantized, scales)
    cosine = np.sum(restored * real_states, 1) / (np.linalg.norm(restored, axis=1) * np.linalg.norm(real_states, axis=1))
    return {
        "prompt_tokens": tokens,
        "reference_padded_fp16": tar_bytes_per_sample([reference]),
        "real_tokens_fp16": tar_bytes_per_sample([encode_sample(sample, latent_dtype="fp16", text_dtype="fp16")]),
        "real_tokens_int8": tar_bytes_per_sample([encode_sample(sample, latent_dtype="fp16", text_dtype="int8")]),
        "int8_min_cosine_minilm": float(cosine.min()),
    }


def spread(values: list[float]) -> str:
    """'median (min-max)' of the runs."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=40, help="copies of the 7 bundled photos")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="bare loop + Ray job pairs; the ratio's median is the figure")
    args = parser.parse_args(argv)
    from pipelines.demo.photos import write_photo_folder

    sizes = cache_layouts()

    pairs: list[tuple[dict, dict]] = []
    with tempfile.TemporaryDirectory(prefix="encode-bench-") as scratch_name:
        scratch = Path(scratch_name)
        for copy in range(args.copies):
            write_photo_folder(scratch / "corpus" / f"copy{copy:03d}")
        s3, head, env = start_services(scratch)
        try:
            for run in range(args.runs):
                local = bare_loop(scratch / "corpus", f"s3://bench/local-{run}", args.resolution)
                distributed = ray_job(head, env, scratch / "corpus", f"s3://bench/ray-{run}", args.resolution)
                pairs.append((local, distributed))
                print(f"run {run + 1}: steady bare loop {local['steady_images_per_second']:.2f}, Ray job "
                      f"{distributed['steady_images_per_second']:.2f} images/s; whole run {local['images_per_second']:.2f}"
                      f" vs {distributed['images_per_second']:.2f}; startup {local['startup_seconds']:.1f} vs "
                      f"{distributed['startup_seconds']:.1f} s", flush=True)  # fmt: skip
        finally:
            head.stop()
            s3.stop()
    print(f"images: {pairs[0][0]['samples_written']} at {args.resolution} px, taef2 + MiniLM, 2 CPUs, {args.runs} runs")
    for label, key in (("steady", "steady_images_per_second"), ("whole run", "images_per_second")):
        local_rates = [local[key] for local, _ in pairs]
        ray_rates = [distributed[key] for _, distributed in pairs]
        ratios = [ray / local for local, ray in zip(local_rates, ray_rates, strict=True)]
        goal = " (goal >= 0.95)" if key == "steady_images_per_second" else ""
        print(f"{label}: bare loop {spread(local_rates)} images/s, Ray job {spread(ray_rates)} images/s, "
              f"ratio {spread(ratios)}{goal}")  # fmt: skip
    startups = [distributed["startup_seconds"] for _, distributed in pairs]
    print(f"Ray job startup (workers started, encoders loaded, first sample written): {spread(startups)} s")
    print(f"this cache    : {pairs[0][1]['cache_bytes_per_sample']:.0f} bytes/sample (taef2 latents, MiniLM int8 text)")
    print(f"fine-t2i-length prompt = {sizes['prompt_tokens']} tokens; bytes/sample with DC-AE latents + T5 text:")
    reference = sizes["reference_padded_fp16"]
    for name in ("reference_padded_fp16", "real_tokens_fp16", "real_tokens_int8"):
        print(f"  {name:22s} {sizes[name]:9.0f}   {reference / sizes[name]:5.2f}x smaller than the reference")
    print(f"int8 text: min per-token cosine to fp32 = {sizes['int8_min_cosine_minilm']:.5f} (goal >= 0.999)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
