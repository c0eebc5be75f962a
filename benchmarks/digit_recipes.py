"""What the seed-recipe comparisons (lit_conversion.py, hidit_stages.py) share: the digits that ship with
scikit-learn encoded by the encode job's own stages in this process, and a recipe's train run with its held-out
losses kept.

The comparisons train several tiny models one after another on the same cache, so they run the training loop the
train job runs on each rank (trainer.loop.TrainingRun) in this process, one rank, instead of a Ray job apiece.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from services.third_party_notices import QUIET_TORCHAO_ENV  # noqa: E402

os.environ.update(QUIET_TORCHAO_ENV)  # before anything imports torchao


@dataclass
class DigitCaches:
    train: str
    held_out: str


def encode_digits(out: Path, encode_config: str, *, class_folders: bool, size: int,
                  limit_per_digit: int | None = None) -> DigitCaches:
    """The demo corpus' digits (no photos) under `<out>/corpus`, encoded with `encode_config` (a path under the repo)
    into `<out>/cache/train` and `<out>/cache/heldout`."""
    from pipelines.config import EncodeJobConfig
    from pipelines.demo.corpus import HELD_OUT_DIR, TRAIN_DIR, build_demo_corpus
    from pipelines.local_loop import run_local
    from services.config import load_config

    corpus = out / "corpus"
    build_demo_corpus(corpus, photos=False, class_folders=class_folders, size=size, limit_per_digit=limit_per_digit)
    caches = DigitCaches(train=str(out / "cache" / "train"), held_out=str(out / "cache" / "heldout"))
    for folder, uri in ((TRAIN_DIR, caches.train), (HELD_OUT_DIR, caches.held_out)):
        job = load_config(EncodeJobConfig, REPO_ROOT / encode_config,
                          [f"source.root={corpus / folder}", f"output.uri={uri}", "progress_bar=false"])
        run_local(job)
    return caches


@dataclass
class RecipeRun:
    """A finished run: its checkpoints, its held-out losses (one dict per validation, with its step), its time."""

    name: str
    checkpoints: str
    validations: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def val_losses(self) -> dict[int, float]:
        return {int(row["step"]): row["val_loss"] for row in self.validations}

    def first_step_at_or_below(self, target: float) -> int | None:
        """The first validated step whose held-out loss is <= `target`; None if none is."""
        return next((step for step, loss in sorted(self.val_losses().items()) if loss <= target), None)


def train_recipe(name: str, config_path: str, overrides: list[str]) -> RecipeRun:
    """Train `config_path` (a path under the repo) with `overrides` (`--set` syntax) as one rank in this process."""
    from services.config import load_config
    from trainer.config import TrainJobConfig
    from trainer.inputs import resolve_cache
    from trainer.loop import TrainingRun

    config = load_config(TrainJobConfig, REPO_ROOT / config_path, [*overrides, "scaling.num_workers=1"])
    run = RecipeRun(name, config.checkpoint.uri)
    started = time.perf_counter()
    trainer = TrainingRun(config, resolve_cache(config),
                          reporter=lambda metrics: run.validations.append(metrics) if "val_loss" in metrics else None)
    first_step = trainer.step  # past 0 when the recipe continues another run (resume_from)
    trainer.run()
    run.seconds = time.perf_counter() - started
    curve = ", ".join(f"{step}: {loss:.4f}" for step, loss in run.val_losses().items())
    print(f"[{name}] steps {first_step}-{trainer.step} in {run.seconds:.0f} s"
          + (f"; held-out loss {curve}" if curve else ""), flush=True)
    return run


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scratch", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")


def run_comparison(compare: Callable[..., dict], args: argparse.Namespace, prefix: str, **settings) -> int:
    """`compare(work_dir, **settings)` in --scratch or a temporary directory; its report to --out as JSON."""
    with tempfile.TemporaryDirectory(prefix=prefix) as temporary:
        report = compare(args.scratch or Path(temporary), **settings)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0
