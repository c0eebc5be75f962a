"""The demo waits for each job's own end, not for `ray job submit`'s log tail (which can close early).

Each call runs in a process of its own with the cluster's environment, as the demo does under
`hybriddit exec` (Ray keeps one auth token per process, and this session's other clusters have others).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.fixtures.ray_cluster import REPO

CALL_SUBMIT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("demo_script", sys.argv[1])
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)
try:
    output = demo.submit(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), demo.Path(sys.argv[5]))
except demo.DemoError as error:
    print("DEMO_ERROR " + json.dumps(str(error)))
else:
    print("JOB_OUTPUT " + json.dumps(output))
"""


def demo_submit(ray_cluster, stage: str, job_argv: list[str], log_dir) -> tuple[str, str]:
    """("JOB_OUTPUT" or "DEMO_ERROR", the job's whole log or the error) of scripts/demo.py's `submit`."""
    done = subprocess.run(
        [sys.executable, "-c", CALL_SUBMIT, str(REPO / "scripts" / "demo.py"), stage, ray_cluster.dashboard_url,
         json.dumps(job_argv), str(log_dir)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=ray_cluster.env, check=True,
    )  # fmt: skip
    (line,) = [line for line in done.stdout.splitlines() if line.startswith(("JOB_OUTPUT ", "DEMO_ERROR "))]
    kind, payload = line.split(" ", 1)
    return kind, json.loads(payload)


def test_submit_returns_the_whole_log_of_a_finished_job(ray_cluster, tmp_path):
    argv = ["-c", "import time; print('started', flush=True); time.sleep(3); print('finished')"]
    kind, output = demo_submit(ray_cluster, "sleeper", argv, tmp_path)
    assert kind == "JOB_OUTPUT" and "started" in output and "finished" in output


def test_submit_names_the_job_and_its_state_when_the_job_fails(ray_cluster, tmp_path):
    kind, error = demo_submit(ray_cluster, "quitter", ["-c", "raise SystemExit('the job gave up')"], tmp_path)
    assert kind == "DEMO_ERROR" and "stage 'quitter'" in error and "the job gave up" in error
