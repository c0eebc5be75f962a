"""`make demo`: digits + photos -> encode job -> train job -> images -> evaluation job, on the local stack.

    hybriddit exec -- .venv/bin/python scripts/demo.py [--out out/demo] [--train-steps N]

Builds the demo corpus from data shipped in installed packages (pipelines/demo/corpus.py), submits
the encode job twice (training folder, held-out digits) and the train job with `ray job submit`,
generates ten images of each digit from the final checkpoint, submits the evaluation job, and prints
where the cache, checkpoints, sample grid, the run's progress image and validation-loss plot and the
report are, the dashboard URL and each stage's time.
Run it where the stack's environment is set (`hybriddit exec --`, or after `source .stack/env`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from pipelines.demo.corpus import HELD_OUT_DIR, TRAIN_DIR, build_demo_corpus, digit_caption  # noqa: E402

CONFIGS = REPO_ROOT / "configs" / "demo"
SUMMARY_FILE = "demo_summary.json"
SAMPLES_PER_DIGIT = 10
# The jobs spread over several raylets (encode actors, one DDP rank per node), as on a real cluster.
WORKER_NODES = 2  # `make demo` starts the stack with `--workers 2`
JOB_POLL_SECONDS = 2.0


class DemoError(RuntimeError):
    """A stage of the demo failed; the message names the stage and its log file."""


def stack_endpoints() -> tuple[str, str]:
    """(Ray dashboard URL, bucket) from the environment `hybriddit exec` / `.stack/env` provides."""
    missing = [name for name in ("RAY_API_SERVER_ADDRESS", "AWS_ENDPOINT_URL") if not os.environ.get(name)]
    if missing:
        raise DemoError(f"{', '.join(missing)} not set: start the stack (`hybriddit stack up`) and run the demo "
                        "as `hybriddit exec -- .venv/bin/python scripts/demo.py` (or `make demo`)")
    return os.environ["RAY_API_SERVER_ADDRESS"], os.environ.get("HYBRIDDIT_BUCKET", "hybriddit")


def worker_nodes(dashboard: str, minimum: int) -> list[str]:
    """Labels of the cluster's live worker nodes; fewer than `minimum` is an error naming the fix."""
    from ray.util.state import list_nodes

    from infra.local.ray_workers import NODE_LABEL

    alive = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
    labels = sorted(node.labels.get(NODE_LABEL, node.node_id) for node in alive if not node.is_head_node)
    if len(labels) < minimum:
        raise DemoError(f"the Ray cluster at {dashboard} has {len(labels)} worker node(s), the demo runs on "
                        f"{minimum}: start them with `hybriddit stack up --workers {minimum}`")
    return labels


def run_logged(stage: str, argv: list[str], log_dir: Path) -> str:
    """Run a command, its output going to `<log_dir>/<stage>.log` as it runs; raises DemoError with the tail."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{stage}.log"
    print(f"[demo] {stage}: running (follow it with: tail -f {log})", flush=True)
    with log.open("w") as handle:
        returncode = subprocess.run(argv, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
    output = log.read_text()
    if returncode != 0:
        tail = "\n".join(output.splitlines()[-25:])
        raise DemoError(f"stage {stage!r} failed (exit {returncode}); full log: {log}\n{tail}")
    return output


def submit(stage: str, dashboard: str, job_argv: list[str], log_dir: Path) -> str:
    """`ray job submit`, then wait for the job itself to end; returns the job's whole log.

    The submit command follows the job's log over a websocket, which can close while the job still
    runs (seen on an overloaded machine: the command exited 0 with the job RUNNING), so the job's end
    is read from the job API rather than from the command's exit.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray = Path(sys.executable).with_name("ray")
    job_id = f"demo-{stage}-{uuid.uuid4().hex[:8]}"
    run_logged(stage, [str(ray), "job", "submit", "--address", dashboard, "--submission-id", job_id, "--", "python",
                       *job_argv], log_dir)  # fmt: skip
    client = JobSubmissionClient(dashboard)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(JOB_POLL_SECONDS)
    output = client.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        tail = "\n".join(output.splitlines()[-25:])
        raise DemoError(f"job {job_id} of stage {stage!r} ended {status.value}; full log: {log_dir / stage}.log\n{tail}")
    return output


def sample_grid(images: np.ndarray, out: Path, rows: int, margin: int = 4, scale: int = 2) -> Path:
    """(N, H, W, 3) uint8 images as a white-spaced grid, one row per digit (generation's grid.png has no gaps)."""
    from PIL import Image

    tiles = [Image.fromarray(image) for image in images]
    tile_w, tile_h = tiles[0].width * scale, tiles[0].height * scale
    cols = -(-len(tiles) // rows)
    grid = Image.new("RGB", (cols * (tile_w + margin) + margin, rows * (tile_h + margin) + margin), "white")
    for index, tile in enumerate(tiles):
        row, col = divmod(index, cols)
        grid.paste(tile.resize((tile_w, tile_h), Image.Resampling.NEAREST),
                   (margin + col * (tile_w + margin), margin + row * (tile_h + margin)))
    grid.save(out)
    return out


def run_demo(args: argparse.Namespace) -> dict:
    dashboard, bucket = stack_endpoints()
    nodes = worker_nodes(dashboard, WORKER_NODES)
    print(f"[demo] Ray worker nodes: {', '.join(nodes)}", flush=True)
    out = Path(args.out).resolve()
    logs = out / "logs"
    prefix = args.prefix or f"s3://{bucket}/demo"
    caches = {"train": f"{prefix}/cache/train", "heldout": f"{prefix}/cache/heldout"}
    checkpoints = f"{prefix}/checkpoints"
    timings: dict[str, float] = {}

    def timed(stage: str, action):
        started = time.perf_counter()
        result = action()
        timings[stage] = round(time.perf_counter() - started, 1)
        print(f"[demo] {stage}: {timings[stage]:.1f} s", flush=True)
        return result

    from services import storage

    if args.fresh:
        for uri in (*caches.values(), checkpoints):
            storage.delete(uri, recursive=True)
        shutil.rmtree(out, ignore_errors=True)
    corpus = out / "corpus"
    timed("corpus", lambda: build_demo_corpus(corpus, limit_per_digit=args.limit_per_digit))
    for name, folder in (("train", TRAIN_DIR), ("heldout", HELD_OUT_DIR)):
        timed(f"encode_{name}", lambda name=name, folder=folder: submit(
            f"encode_{name}", dashboard,
            ["pipelines/encode_latents.py", "--config", str(CONFIGS / "encode.yaml"),
             "--set", f"source.root={corpus / folder}", "--set", f"output.uri={caches[name]}"], logs))
    train_overrides = ["--set", f"data.uris=[{caches['train']}]", "--set", f"checkpoint.uri={checkpoints}",
                       "--set", f"validation.uris=[{caches['heldout']}]"]
    if args.train_steps:
        train_overrides += ["--set", f"max_steps={args.train_steps}"]
    timed("train", lambda: submit("train", dashboard,
                                  ["trainer/train.py", "--config", str(CONFIGS / "train.yaml"), *train_overrides], logs))

    from trainer.checkpoint import resolve_export
    from trainer.validation import PROGRESS_IMAGE, VALIDATION_PLOT

    export, _ = resolve_export(checkpoints)
    pictures = {}  # the train job's own pictures of the run, copied beside the demo's other outputs
    for name, file in (("progress_image", PROGRESS_IMAGE), ("val_loss_plot", VALIDATION_PLOT)):
        storage.download_file(storage.join(checkpoints, file), out / file)
        pictures[name] = str(out / file)
    samples = out / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    prompts = [digit_caption(digit) for digit in range(10) for _ in range(SAMPLES_PER_DIGIT)]

    def generate() -> np.ndarray:
        from trainer.generation import generate_images, load_export, to_uint8, write_images
        from trainer.samplers import SamplerSettings

        images = generate_images(load_export(export), prompts,
                                 SamplerSettings(steps=20, cfg=args.cfg, batch_size=100, seed=0))
        write_images(str(samples), prompts, images)
        return to_uint8(images)

    grid = sample_grid(timed("generate", generate), out / "digits_grid.png", rows=10)

    eval_output = timed("evaluate", lambda: submit(
        "evaluate", dashboard,
        ["trainer/evaluate.py", "--config", str(CONFIGS / "evaluate.yaml"), "--set", f"checkpoint={checkpoints}",
         "--set", f"reference_uri={caches['heldout']}"], logs))
    match = re.search(r"^EVAL_REPORT (.+)$", eval_output, flags=re.MULTILINE)
    evaluation = json.loads(match.group(1)) if match else {}
    summary = {
        "corpus": str(corpus),
        "caches": caches,
        "checkpoints": checkpoints,
        "export": export,
        "samples": str(samples),
        "sample_grid": str(grid),
        **pictures,
        "evaluation": evaluation,
        "dashboard": dashboard,
        "worker_nodes": nodes,
        "logs": str(logs),
        "seconds": {**timings, "total": round(sum(timings.values()), 1)},
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "out" / "demo"), help="local output directory")
    parser.add_argument("--prefix", help="S3 prefix for caches and checkpoints (default s3://$HYBRIDDIT_BUCKET/demo)")
    parser.add_argument("--train-steps", type=int, help="override the train config's max_steps")
    parser.add_argument("--limit-per-digit", type=int, help="train on at most N digits per class")
    parser.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale of the samples")
    parser.add_argument("--keep", dest="fresh", action="store_false",
                        help="keep earlier caches/checkpoints (the jobs then resume instead of starting over)")
    args = parser.parse_args(argv)
    try:
        summary = run_demo(args)
    except DemoError as exc:
        print(f"[demo] {exc}", file=sys.stderr)
        return 1
    evaluation = summary["evaluation"]
    print("\n[demo] done in {total:.0f} s".format(**summary["seconds"]))
    print(f"  latent caches : {summary['caches']['train']} (train), {summary['caches']['heldout']} (held out)")
    print(f"  checkpoints   : {summary['checkpoints']} (export used: {summary['export']})")
    print(f"  sample grid   : {summary['sample_grid']}")
    print(f"  training      : {summary['progress_image']} (the sample grids of the run, a row per step), "
          f"{summary['val_loss_plot']} (held-out loss per noise level)")
    if evaluation:
        print(f"  evaluation    : {evaluation.get('report_uri')}: FID {evaluation['fid']:.2f}, "
              f"KID {evaluation['kid_mean']:.4f}, digit accuracy {evaluation.get('digit_accuracy', float('nan')):.2f}")
        per_digit = evaluation.get("digit_accuracy_per_digit", {})
        if per_digit:
            print("  per digit     : " + ", ".join(f"{digit}: {accuracy:.0%}" for digit, accuracy in per_digit.items()))
    print(f"  dashboard     : {summary['dashboard']}")
    print(f"  summary       : {Path(args.out).resolve() / SUMMARY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
