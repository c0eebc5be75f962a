"""Soaks: a long encode job and a long train job, the memory of every Ray process sampled through each.

    python -m infra.local.netns .venv/bin/python benchmarks/soak.py [--images 20000] [--steps 10000] [--plots docs]

Starts a private SeaweedFS and Ray head on loopback. The encode soak writes `--images` digit images
(scikit-learn's digits repeated, 32 px PNG + caption) and submits the demo's encode job on them
(pixel codec + MiniLM, `configs/demo/encode.yaml`); the train soak submits the demo's train job
(`configs/demo/train.yaml`, the tiny hybrid DiT) on that cache for `--steps` steps, checkpointing and
validating as the demo does. Every `--sample-every` seconds it records the resident memory of each
Ray worker process and of the processes those start (the trainer's loader), by pid and process title,
and the job's progress (encode: samples in the units the progress records call finished; train: the
step of the job's last report line).

Verdict per job: every process that lived through the run, its private memory (RssAnon: the heap, what a leak
grows) at the end of its warm-up (the first `--warmup` of its life) against its maximum after it (goal: < 10%
growth), and the throughput in each fifth of the run after the warm-up (goal: no decay). The RSS is reported
beside it but not judged: it also counts the pages of Ray's shared-memory object store a worker has mapped (every
block it read or wrote), which grow towards the store's size as the worker touches more of it and belong to the
store, and the pages of shared libraries as their code is first run. Writes `soak.json`, one PNG per job
(memory and throughput against time) and the jobs' logs to `--plots`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from benchmarks.private_stack import start_services  # noqa: E402
from services.third_party_notices import QUIET_TORCHAO_ENV  # noqa: E402

os.environ.update(QUIET_TORCHAO_ENV)  # before anything imports torchao

BUCKET = "soak"
ENCODE_CONFIG = "configs/demo/encode.yaml"
TRAIN_CONFIG = "configs/demo/train.yaml"
STEP_LINE = re.compile(r"step (\d+): loss=")
SHELLS = {"sh", "bash", "sleep"}  # the job's `sh -c <entrypoint>` wrappers and their sleeps: nothing there grows
MIB = 1 << 20
GENERIC_TITLES = {"ray::IDLE", "default_worker.py"}  # a Ray worker between actors and tasks


@dataclass
class Trace:
    """What the sampler saw: (seconds since start, progress) and per-process (seconds, RSS MiB, private MiB)."""

    progress: list[tuple[float, float]] = field(default_factory=list)
    memory: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)


def ray_processes(temp_dir: Path) -> dict[int, psutil.Process]:
    """Every process the Ray head's raylet started (workers, actors, agents) and theirs (the job's driver, the
    trainer's loader), by pid; other Ray clusters on the machine are left out."""
    found: dict[int, psutil.Process] = {}
    for raylet in psutil.process_iter(["name", "cmdline"]):
        if raylet.info["name"] != "raylet" or str(temp_dir) not in " ".join(raylet.info["cmdline"] or []):
            continue
        for process in raylet.children(recursive=True):
            try:
                if process.name() in SHELLS:
                    continue
                found[process.pid] = process
            except psutil.Error:
                continue  # it exited while being listed
    return found


def process_title(process: psutil.Process) -> str:
    """`ray::<actor or task>` for a Ray worker; the script (or the program) for anything else."""
    command = process.cmdline()
    if command and command[0].startswith("ray::"):
        return command[0].split()[0]
    scripts = [Path(part).name for part in command if part.endswith(".py")]
    return scripts[0] if scripts else Path(command[0]).name if command else process.name()


def memory_mib(process: psutil.Process) -> tuple[float, float]:
    """(RSS, private anonymous memory) of a process in MiB: on Linux RSS minus its shared (file and shmem) pages is
    exactly its RssAnon."""
    memory = process.memory_info()
    return memory.rss / MIB, (memory.rss - memory.shared) / MIB


def sample_while(job: subprocess.Popen, temp_dir: Path, progress: Callable[[], float], every: float) -> Trace:
    """Sample until the job's process exits."""
    trace, started = Trace(), time.monotonic()
    titles: dict[int, str] = {}
    memory: dict[int, list[tuple[float, float, float]]] = {}
    while job.poll() is None:
        now = time.monotonic() - started
        for pid, process in ray_processes(temp_dir).items():
            try:
                title, (rss, private) = process_title(process), memory_mib(process)
            except psutil.Error:
                continue  # it exited between listing and reading
            if pid not in titles or title not in GENERIC_TITLES:  # a worker takes its actor's title once it has one
                titles[pid] = title
            memory.setdefault(pid, []).append((now, rss, private))
        try:
            trace.progress.append((now, progress()))
        except Exception as error:  # noqa: BLE001 - a progress read failing mid-run is reported, not fatal
            print(f"progress read failed at {now:.0f} s: {error}", flush=True)
        time.sleep(every)
    trace.memory = {f"{titles[pid]} [{pid}]": series for pid, series in memory.items()}
    return trace


def submit(head, env: dict[str, str], script: str, config: str, overrides: dict[str, object],
           log: Path) -> subprocess.Popen:  # fmt: skip
    arguments = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    command = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", head.dashboard_url, "--",
               "python", script, "--config", config, *arguments]  # fmt: skip
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


def finish(job: subprocess.Popen, log: Path, name: str, keep_in: Path) -> None:
    """Wait for the job; its log (the train job's per-report steps/s and data wait) is kept beside the plots."""
    keep_in.mkdir(parents=True, exist_ok=True)
    job.wait()
    shutil.copy(log, keep_in / log.name)
    if job.returncode != 0:
        raise RuntimeError(f"the {name} job failed (exit {job.returncode}):\n{log.read_text()[-3000:]}")


def write_digits(folder: Path, images: int) -> None:
    from pipelines.demo.corpus import load_digit_split, write_digit_folder

    digits = load_digit_split()
    order = np.arange(images) % len(digits.train_ink)
    write_digit_folder(folder, digits.train_ink[order], digits.train_labels[order])


def encoded_samples(out_uri: str) -> Callable[[], float]:
    from services.cache.manifest import ProgressRecords

    records = ProgressRecords(out_uri)  # each record fetched once; the listing is redone
    return lambda: float(sum(progress.samples_written for progress in records.read()))


def last_step(log: Path) -> Callable[[], float]:
    def read() -> float:
        steps = STEP_LINE.findall(log.read_text(errors="replace")) if log.exists() else []
        return float(steps[-1]) if steps else 0.0

    return read


def verdict(trace: Trace, warmup: float) -> dict:
    """Private-memory growth after its warm-up per long-lived process (RSS beside it), and the job's rate in each
    fifth after the warm-up.

    A process's warm-up is the first `warmup` of its own life (the encoders' actors start well after the job), and
    a process counts when it lived through at least half of the run.
    """
    end = trace.progress[-1][0] if trace.progress else 0.0
    processes = {}
    for name, series in trace.memory.items():
        born, died = series[0][0], series[-1][0]
        if died - born < 0.5 * end:
            continue
        after = np.array([(rss, private) for t, rss, private in series if t >= born + warmup * (died - born)])
        rss, private = after[:, 0], after[:, 1]
        processes[name] = {"private_at_warmup_mib": round(private[0], 1), "max_private_after_mib": round(private.max(), 1),
                           "growth": round(private.max() / private[0] - 1, 4),
                           "rss_at_warmup_mib": round(rss[0], 1), "max_rss_after_mib": round(rss.max(), 1),
                           "rss_growth": round(rss.max() / rss[0] - 1, 4)}  # fmt: skip
    times = np.array([t for t, _ in trace.progress])
    done = np.array([value for _, value in trace.progress])
    edges = np.linspace(warmup * end, end, 6)
    rates = []
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        at = np.interp([start, stop], times, done) if len(times) else [0.0, 0.0]
        rates.append(round(float((at[1] - at[0]) / max(stop - start, 1e-9)), 3))
    return {"seconds": round(end, 1), "processes": processes, "rate_per_fifth": rates,
            "max_growth": max((row["growth"] for row in processes.values()), default=0.0),
            "trace": {"progress": trace.progress, "memory": trace.memory}}  # fmt: skip


def plot(trace: Trace, result: dict, title: str, unit: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, rate) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name in result["processes"]:
        series = np.array(trace.memory[name])
        line, = memory.plot(series[:, 0], series[:, 2], label=name.split(" [")[0][:40])
        memory.plot(series[:, 0], series[:, 1], color=line.get_color(), linestyle=":", linewidth=0.8)
    memory.set_ylabel("private (solid) and RSS (dotted), MiB")
    memory.set_title(f"{title}: memory of each Ray process (max private growth after warm-up "
                     f"{result['max_growth']:.1%})", fontsize=10)
    memory.legend(fontsize=7, loc="upper left")
    progress = np.array(trace.progress)
    if len(progress) > 2:
        window = max(1, len(progress) // 40)
        rates = (progress[window:, 1] - progress[:-window, 1]) / (progress[window:, 0] - progress[:-window, 0])
        rate.plot(progress[window:, 0], rates)
    rate.set_ylabel(unit)
    rate.set_xlabel("seconds since submission")
    fifths = ", ".join(f"{value:.3g}" for value in result["rate_per_fifth"])
    rate.set_title(f"{title}: throughput (per fifth after warm-up: {fifths})", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def report(name: str, result: dict, unit: str) -> None:
    print(f"{name}: {result['seconds']:.0f} s; {unit} per fifth after warm-up: {result['rate_per_fifth']}")
    for process, row in sorted(result["processes"].items()):
        print(f"  {process:60s} private {row['private_at_warmup_mib']:7.1f} -> max {row['max_private_after_mib']:7.1f}"
              f" MiB ({row['growth']:+6.1%}); RSS {row['rss_at_warmup_mib']:7.1f} -> max "
              f"{row['max_rss_after_mib']:7.1f} MiB ({row['rss_growth']:+6.1%})")  # fmt: skip
    print(f"  max private-memory growth after warm-up: {result['max_growth']:.1%} (goal < 10%)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--files-per-unit", type=int, default=512)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of each run counted as warm-up")
    parser.add_argument("--jobs", choices=["both", "encode"], default="both",
                        help="encode: the encode soak alone (the train soak needs its cache)")
    parser.add_argument("--plots", type=Path, default=REPO_ROOT / "out" / "soak")
    parser.add_argument("--json", type=Path, help="default: soak.json beside the plots")
    args = parser.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch_name:
        scratch = Path(scratch_name)
        write_digits(scratch / "digits", args.images)
        s3, head, env = start_services(scratch, bucket=BUCKET)
        try:
            cache = f"s3://{BUCKET}/cache"
            log = scratch / "encode.log"
            job = submit(head, env, "pipelines/encode_latents.py", ENCODE_CONFIG, {
                "source.root": scratch / "digits", "source.files_per_unit": args.files_per_unit, "output.uri": cache,
            }, log)  # fmt: skip
            trace = sample_while(job, head.temp_dir, encoded_samples(cache), args.sample_every)
            finish(job, log, "encode", args.plots)
            results["encode"] = verdict(trace, args.warmup)
            report(f"encode ({args.images} images)", results["encode"], "images/s")
            plot(trace, results["encode"], f"encode soak, {args.images:,} digits", "images/s",
                 args.plots / "soak_encode.png")  # fmt: skip

            if args.jobs == "encode":
                return save(results, args)
            log = scratch / "train.log"
            job = submit(head, env, "trainer/train.py", TRAIN_CONFIG, {
                "data.uris": json.dumps([cache]), "validation.uris": json.dumps([cache]),
                "checkpoint.uri": f"s3://{BUCKET}/checkpoints", "max_steps": args.steps,
                "checkpoint.every_steps": args.checkpoint_every, "validation.every_steps": args.checkpoint_every,
            }, log)  # fmt: skip
            trace = sample_while(job, head.temp_dir, last_step(log), args.sample_every)
            finish(job, log, "train", args.plots)
            results["train"] = verdict(trace, args.warmup)
            report(f"train ({args.steps} steps)", results["train"], "steps/s")
            plot(trace, results["train"], f"train soak, {args.steps:,} steps", "steps/s", args.plots / "soak_train.png")
        finally:
            head.stop()
            s3.stop()
    return save(results, args)


def save(results: dict, args: argparse.Namespace) -> int:
    path = args.json or args.plots / "soak.json"
    path.write_text(json.dumps(results))
    print(f"wrote {path} (with the sampled traces) and the plots in {args.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
