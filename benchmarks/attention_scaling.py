"""Linear vs full attention at equal width: forward+backward time and peak memory at growing token counts.

Each measurement runs in its own process so that the peak-RSS increase belongs to that one case;
times are the fastest of several runs (the machine may be shared). Three levels are compared:
`mixing` (the token mixing alone: ReLU linear attention vs SDPA on the same q, k, v), `attention`
(the layer: QKV, mixing, output projection) and `block` (adaLN + attention + Mix-FFN), where the
projections and FFN that both share dilute the difference.

    python benchmarks/attention_scaling.py [--tokens 256 1024 4096] [--dim 768] [--heads 12]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

LEVELS = ["mixing", "attention", "block"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(kind: str, level: str, tokens: int, dim: int, heads: int, repeats: int, threads: int) -> dict:
    """Seconds per forward+backward (fastest) and peak-RSS increase of the first one, in this process."""
    import torch
    import torch.nn.functional as F

    from trainer.models.attention import LinearAttention, SoftmaxAttention, relu_linear_attention
    from trainer.models.hybrid_dit import DiTBlock
    from trainer.models.layers import MixFFN

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    side = math.isqrt(tokens)
    grid = (side, tokens // side)
    attention = LinearAttention(dim, heads) if kind == "linear" else SoftmaxAttention(dim, heads)
    if level == "mixing":
        mix = relu_linear_attention if kind == "linear" else F.scaled_dot_product_attention

        def step(x: torch.Tensor) -> torch.Tensor:
            q, k, v = x.reshape(1, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            return mix(q, k, v)
    elif level == "attention":
        module = attention

        def step(x: torch.Tensor) -> torch.Tensor:
            return module(x, None, grid)
    else:
        module = DiTBlock(dim, dim, attention, MixFFN(dim, 4 * dim))
        cond = torch.randn(1, dim)
        text = torch.zeros(1, 0, dim)

        def step(x: torch.Tensor) -> torch.Tensor:
            return module(x, text, None, cond, grid)[0]

    x = torch.randn(1, grid[0] * grid[1], (3 if level == "mixing" else 1) * dim, requires_grad=True)
    baseline = peak_rss_mb()
    times = []
    for _ in range(repeats + 1):  # the first run also sets the memory peak; later ones are timed
        start = time.perf_counter()
        step(x).square().mean().backward()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = peak_rss_mb() - baseline
    return {"seconds": min(times[1:]), "peak_mb": peak}


def run_case(args: argparse.Namespace, kind: str, level: str, tokens: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, level, str(tokens), "--dim", str(args.dim),
               "--heads", str(args.heads), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"benchmark case {kind}/{level}/{tokens} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=LEVELS)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "LEVEL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, level, tokens = args.child
        print(json.dumps(measure(kind, level, int(tokens), args.dim, args.heads, args.repeats, args.threads)))
        return 0

    print(f"fp32 forward+backward, batch 1, dim {args.dim}, {args.heads} heads, {args.threads} threads")
    header = f"{'level':<10}{'tokens':>7}{'full s':>9}{'linear s':>10}{'speed-up':>10}{'full MB':>9}" \
             f"{'linear MB':>11}{'mem ratio':>11}"
    print(header)
    results = []
    for level in args.levels:
        for tokens in args.tokens:
            full, linear = (run_case(args, kind, level, tokens) for kind in ("full", "linear"))
            row = {"level": level, "tokens": tokens, "full": full, "linear": linear,
                   "speedup": full["seconds"] / linear["seconds"],
                   "memory_ratio": full["peak_mb"] / max(linear["peak_mb"], 1.0)}
            results.append(row)
            print(f"{level:<10}{tokens:>7}{full['seconds']:>9.3f}{linear['seconds']:>10.3f}{row['speedup']:>9.1f}x"
                  f"{full['peak_mb']:>9.0f}{linear['peak_mb']:>11.0f}{row['memory_ratio']:>10.1f}x", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
