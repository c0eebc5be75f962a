"""The demo waits for each job's own end, not for `ray job submit`'s log tail (which can close early)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.fixtures.ray_cluster import REPO


@pytest.fixture
def demo(ray_cluster, monkeypatch):
    """scripts/demo.py as a module, in the environment `hybriddit exec` gives it (the cluster's auth)."""
    for name, value in ray_cluster.env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submit_returns_the_whole_log_of_a_finished_job(demo, ray_cluster, tmp_path):
    argv = ["-c", "import time; print('started', flush=True); time.sleep(3); print('finished')"]
    output = demo.submit("sleeper", ray_cluster.dashboard_url, argv, tmp_path)
    assert "started" in output and "finished" in output


def test_submit_names_the_job_and_its_state_when_the_job_fails(demo, ray_cluster, tmp_path):
    argv = ["-c", "raise SystemExit('the job gave up')"]
    with pytest.raises(demo.DemoError, match=r"stage 'quitter' .*(FAILED|exit)") as failure:
        demo.submit("quitter", ray_cluster.dashboard_url, argv, tmp_path)
    assert "the job gave up" in str(failure.value)
