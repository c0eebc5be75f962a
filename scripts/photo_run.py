"""The photo run: bundled photos + captions -> encode job (taef2, MiniLM) -> train job -> photo recall, on the stack.

    hybriddit exec -- .venv/bin/python scripts/photo_run.py [--out out/photos] [--train-steps N]

Writes the seven bundled photos with their captions to a folder (pipelines/demo/photos.py), submits the
encode job and the train job (configs/photos/) with `ray job submit`, then regenerates each photo from its
caption, from another photo's caption and from no caption (trainer/evaluation/photo_recall.py), and copies
the figures (photos.png, the run's progress.png) and photos.json into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts.demo import DemoError, stack_endpoints, submit  # noqa: E402

CONFIGS = REPO_ROOT / "configs" / "photos"
SUMMARY_FILE = "photo_run.json"


def run(args: argparse.Namespace) -> dict:
    from pipelines.demo.photos import write_photo_folder
    from services import storage
    from services.config import load_config
    from trainer.evaluation.photo_recall import PhotoRecallConfig, photo_recall
    from trainer.validation import PROGRESS_IMAGE

    dashboard, bucket = stack_endpoints()
    out = Path(args.out).resolve()
    prefix = args.prefix or f"s3://{bucket}/photos"
    cache, checkpoints = f"{prefix}/cache", f"{prefix}/checkpoints"
    if args.fresh:
        for uri in (cache, checkpoints):
            storage.delete(uri, recursive=True)
        shutil.rmtree(out, ignore_errors=True)
    folder, logs = out / "folder", out / "logs"
    write_photo_folder(folder)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    submit("encode_photos", dashboard, ["pipelines/encode_latents.py", "--config", str(CONFIGS / "encode.yaml"),
                                        "--set", f"source.root={folder}", "--set", f"output.uri={cache}"], logs)
    timings["encode"] = round(time.perf_counter() - started, 1)
    overrides = ["--set", f"data.uris=[{cache}]", "--set", f"checkpoint.uri={checkpoints}"]
    if args.train_steps:
        overrides += ["--set", f"max_steps={args.train_steps}"]
    started = time.perf_counter()
    submit("train_photos", dashboard, ["trainer/train.py", "--config", str(CONFIGS / "train.yaml"), *overrides], logs)
    timings["train"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    report = photo_recall(load_config(PhotoRecallConfig, CONFIGS / "recall.yaml",
                                      [f"checkpoint={checkpoints}", f"reference_uri={cache}"]))
    timings["photo_recall"] = round(time.perf_counter() - started, 1)
    copies = {"photos_figure": report["figure"], "photos_report": report["report_uri"],
              "progress_image": storage.join(checkpoints, PROGRESS_IMAGE)}
    for name, uri in copies.items():
        storage.download_file(uri, out / uri.rsplit("/", 1)[-1])
        copies[name] = str(out / uri.rsplit("/", 1)[-1])
    summary = {"cache": cache, "checkpoints": checkpoints, **copies, "chance_recall_at_1": report["chance_recall_at_1"],
               "modes": {mode: {key: scores[key] for key in ("mean_psnr", "mean_latent_rmse", "recall_at_1_psnr")}
                         for mode, scores in report["modes"].items()},
               "seconds": timings}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "out" / "photos"), help="local output directory")
    parser.add_argument("--prefix", help="S3 prefix of the cache and checkpoints (default s3://$HYBRIDDIT_BUCKET/photos)")
    parser.add_argument("--train-steps", type=int, help="override the train config's max_steps")
    parser.add_argument("--keep", dest="fresh", action="store_false",
                        help="keep the earlier cache and checkpoints (the jobs then resume instead of starting over)")
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except DemoError as exc:
        print(f"[photos] {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
