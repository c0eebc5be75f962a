"""Wall time of `make demo`, stage by stage: corpus, two encode jobs, train job, generation, evaluation job.

Runs scripts/demo.py against the local stack (started first if needed, as `make demo` does) and prints the
stage timings it records in demo_summary.json, plus the machine's CPU count and load, which the times
depend on (the acceptance bound is "well under 15 minutes on 2 cores").

    python benchmarks/demo_time.py [--out out/demo-bench] [demo.py options, e.g. --train-steps 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BOUND_SECONDS = 15 * 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "out" / "demo-bench"))
    args, demo_args = parser.parse_known_args(argv)
    hybriddit = Path(sys.executable).with_name("hybriddit")
    subprocess.run([str(hybriddit), "stack", "up", "--workers", "2"], cwd=REPO_ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run([str(hybriddit), "exec", "--", sys.executable, "scripts/demo.py", "--out", args.out, *demo_args],
                   cwd=REPO_ROOT, check=True)
    wall = time.perf_counter() - started
    summary = json.loads((Path(args.out) / "demo_summary.json").read_text())
    result = {"cpus": os.cpu_count(), "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
              "wall_seconds": round(wall, 1), "stage_seconds": summary["seconds"],
              "within_bound": wall < BOUND_SECONDS, "evaluation": summary["evaluation"]}
    print(json.dumps(result, indent=2))
    return 0 if result["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
