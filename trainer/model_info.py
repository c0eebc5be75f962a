"""`hybriddit model-info`: parameter counts of a model preset, in total and per module, as JSON."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from torch import nn

from trainer.models import DEFAULT_PRESET, MODEL_PRESETS, build_model


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model: nn.Module) -> dict:
    """Totals per top-level module and per block part (attn, cross, ffn, ada_ln, fourier) summed over blocks."""
    parts: Counter[str] = Counter()
    for name, param in model.named_parameters():
        path = name.split(".")
        if path[0] in ("blocks", "noise_refiner", "context_refiner"):
            parts[f"{path[0]}.{path[2]}"] += param.numel()
    modules = {name: count(child) for name, child in model.named_children() if count(child)}
    if getattr(model, "pos_embed", None) is not None:
        modules["pos_embed"] = model.pos_embed.numel()
    return {"params": count(model), "modules": modules, "block_parts": dict(sorted(parts.items()))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(MODEL_PRESETS),
                        help=f"model preset (default {DEFAULT_PRESET})")


def run(args: argparse.Namespace) -> int:
    model = build_model(args.preset)
    counts = parameter_counts(model)
    config = model.config
    report = {
        "preset": args.preset,
        "params": counts["params"],
        "params_millions": round(counts["params"] / 1e6, 2),
        "blocks": {
            "full_attention": len(config.full_attention_blocks),
            "linear_attention": config.depth - len(config.full_attention_blocks),
            "cross_attention": sum(config.has_cross_attention(block) for block in range(config.depth)),
        },
        "modules": counts["modules"],
        "block_parts": counts["block_parts"],
        "config": config.model_dump(mode="json"),
    }
    print(json.dumps(report, indent=2))
    return 0
