"""Linear vs full attention at equal width: forward+backward time and peak memory at growing token counts.

Each measurement runs in its own process so that the peak-RSS increase belongs to that one case;
times are the fastest of several runs (the machine may be shared), with fewer runs above 4,096
tokens. Four levels are compared, each beside the speed-up its FLOPs predict (`trainer/flops.py`):
`mixing` (the token mixing alone: ReLU linear attention vs SDPA on the same q, k, v), `attention`
(the layer: QKV, mixing, output projection), `block` (adaLN + attention + Mix-FFN), where the
projections and FFN that both share dilute the difference, and `model`: the whole HybridDiT-148M
(8 linear blocks, 4 softmax anchors) against the all-softmax JointDiT-B/2 of the same width and depth,
batch 1 with `--text-tokens` text tokens, both with the train job's activation checkpointing on every
block (one more forward for both; without it 16,384 tokens need ~20 GB of activations here).
16,384 tokens is 2048 px with an f8 codec and patch 2 (LiT's high-resolution case).

    python benchmarks/attention_scaling.py [--tokens 256 1024 4096 16384] [--model-tokens 4096 16384]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from trainer.flops import attention_macs, block_macs, linear_mixing_macs, model_flops, softmax_mixing_macs  # noqa: E402
from trainer.models import DiTConfig, resolve_config  # noqa: E402

LAYER_LEVELS = ["mixing", "attention", "block"]
LEVELS = [*LAYER_LEVELS, "model"]
MODELS = {"full": "JointDiT-B/2", "linear": "HybridDiT-148M"}
LARGE_TOKENS = 4096  # above this, one timed run (`--large-repeats`): a 16,384-token case takes minutes on 2 cores


def layer_config(dim: int, heads: int) -> DiTConfig:
    """The layers this benchmark builds: width `dim`, Mix-FFN 4x with a 3x3 conv, conditioning of width `dim`."""
    return DiTConfig(dim=dim, heads=heads, trunk_dim=None)


def predicted_speedup(level: str, tokens: int, dim: int, heads: int, text_tokens: int) -> float:
    """FLOPs of the full-attention case over those of the linear one (forward; backward scales both alike)."""
    if level == "model":
        return (model_flops(resolve_config(MODELS["full"]), tokens, text_tokens).forward
                / model_flops(resolve_config(MODELS["linear"]), tokens, text_tokens).forward)
    if level == "mixing":
        return softmax_mixing_macs(tokens, tokens, dim) / linear_mixing_macs(tokens, dim, heads)
    config = layer_config(dim, heads)
    if level == "attention":
        full, linear = (sum(attention_macs(config, softmax, tokens, tokens).values()) for softmax in (True, False))
    else:
        full, linear = (sum(block_macs(config, softmax, tokens, 0).values()) for softmax in (True, False))
    return full / linear


def anchor_share(tokens: int, text_tokens: int) -> float:
    """Fraction of HybridDiT-148M's forward FLOPs spent in its softmax anchor blocks' token mixing."""
    return model_flops(resolve_config(MODELS["linear"]), tokens, text_tokens).share("softmax_mixing")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_step(kind: str, level: str, tokens: int, dim: int, heads: int, text_tokens: int):
    """(forward+backward closure, its input) for one case, built in the measuring process."""
    import torch
    import torch.nn.functional as F

    from trainer.models import build_model
    from trainer.models.attention import LinearAttention, SoftmaxAttention, relu_linear_attention
    from trainer.models.hybrid_dit import DiTBlock
    from trainer.models.layers import MixFFN
    from trainer.precision import apply_activation_checkpointing

    side = math.isqrt(tokens)
    grid = (side, tokens // side)
    if level == "model":
        model = build_model(MODELS[kind])
        apply_activation_checkpointing(model, (DiTBlock,))
        config = model.config
        patch = config.patch_size
        x = torch.randn(1, config.latent_channels, grid[0] * patch, grid[1] * patch)
        t, text = torch.rand(1), torch.randn(1, text_tokens, config.text_dim)
        mask = torch.ones(1, text_tokens, dtype=torch.bool)
        return (lambda x: model(x, t, text, mask)), x
    attention = LinearAttention(dim, heads) if kind == "linear" else SoftmaxAttention(dim, heads)
    x = torch.randn(1, grid[0] * grid[1], (3 if level == "mixing" else 1) * dim, requires_grad=True)
    if level == "mixing":
        mix = relu_linear_attention if kind == "linear" else F.scaled_dot_product_attention

        def step(x: torch.Tensor) -> torch.Tensor:
            q, k, v = x.reshape(1, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            return mix(q, k, v)
        return step, x
    if level == "attention":
        return (lambda x: attention(x, None, grid)), x
    block = DiTBlock(dim, dim, attention, MixFFN(dim, 4 * dim))
    cond, text = torch.randn(1, dim), torch.zeros(1, 0, dim)
    return (lambda x: block(x, text, None, cond, grid)[0]), x


def measure(kind: str, level: str, tokens: int, dim: int, heads: int, text_tokens: int, repeats: int,
            threads: int) -> dict:
    """Seconds per forward+backward (fastest timed run) and peak-RSS increase of the first one, in this process."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    step, x = build_step(kind, level, tokens, dim, heads, text_tokens)
    baseline = peak_rss_mb()
    times = []
    for _ in range(repeats + 1):  # the first run also sets the memory peak; later ones are timed
        start = time.perf_counter()
        step(x).square().mean().backward()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = peak_rss_mb() - baseline
    # repeats=0 times the first run itself: at minutes per run its first-call overhead does not matter
    return {"seconds": min(times[1:] or times), "peak_mb": peak}


def run_case(args: argparse.Namespace, kind: str, level: str, tokens: int) -> dict:
    repeats = args.repeats if tokens <= LARGE_TOKENS else args.large_repeats
    command = [sys.executable, __file__, "--child", kind, level, str(tokens), "--dim", str(args.dim),
               "--heads", str(args.heads), "--text-tokens", str(args.text_tokens), "--repeats", str(repeats),
               "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"benchmark case {kind}/{level}/{tokens} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--model-tokens", type=int, nargs="+", default=[4096, 16384],
                        help="image tokens of the whole-model comparison")
    parser.add_argument("--text-tokens", type=int, default=128, help="text tokens of the whole-model comparison")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs up to 4,096 tokens")
    parser.add_argument("--large-repeats", type=int, default=1, help="timed runs above 4,096 tokens; 0 = time the first run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=LEVELS)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "LEVEL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, level, tokens = args.child
        print(json.dumps(measure(kind, level, int(tokens), args.dim, args.heads, args.text_tokens, args.repeats,
                                 args.threads)))
        return 0

    print(f"fp32 forward+backward, batch 1, dim {args.dim}, {args.heads} heads, {args.threads} threads; "
          f"level model: {MODELS['full']} (full) vs {MODELS['linear']} (linear), +{args.text_tokens} text tokens, "
          "activation checkpointing")
    for tokens in sorted({*args.tokens, *args.model_tokens}):
        print(f"softmax anchors' token mixing: {anchor_share(tokens, args.text_tokens):.0%} of {MODELS['linear']}'s "
              f"forward FLOPs at {tokens} image tokens")
    print(f"{'level':<10}{'tokens':>7}{'full s':>9}{'linear s':>10}{'speed-up':>10}{'FLOPs':>8}{'full MB':>9}"
          f"{'linear MB':>11}{'mem ratio':>11}")
    results = []
    for level in args.levels:
        for tokens in args.model_tokens if level == "model" else args.tokens:
            full, linear = (run_case(args, kind, level, tokens) for kind in ("full", "linear"))
            row = {"level": level, "tokens": tokens, "full": full, "linear": linear,
                   "speedup": full["seconds"] / linear["seconds"],
                   "predicted": predicted_speedup(level, tokens, args.dim, args.heads, args.text_tokens),
                   "memory_ratio": full["peak_mb"] / max(linear["peak_mb"], 1.0)}
            results.append(row)
            print(f"{level:<10}{tokens:>7}{full['seconds']:>9.3f}{linear['seconds']:>10.3f}{row['speedup']:>9.2f}x"
                  f"{row['predicted']:>7.2f}x{full['peak_mb']:>9.0f}{linear['peak_mb']:>11.0f}"
                  f"{row['memory_ratio']:>10.2f}x", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
