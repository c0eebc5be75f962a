"""docker-compose.yml, .env.example, the Dockerfiles and .dockerignore (no Docker engine needed)."""

from __future__ import annotations

import re
import subprocess

from tests.infra.conftest import RAY_SERVICES, REPO, docker_compose_binary, env_example, needs_docker_compose
from tests.infra.lockdown import INTERPOLATED

COMPOSE_TEXT = (REPO / "docker-compose.yml").read_text()


def test_stack_has_storage_ray_and_monitoring_services(services):
    assert {"config-check", "minio", "minio-init", "ray-head", "ray-worker", "prometheus", "grafana"} <= set(
        services
    )


def test_every_published_port_is_bound_to_loopback(services):
    published = [(name, port) for name, spec in services.items() for port in spec.get("ports", [])]
    assert published, "the stack publishes no port at all"
    assert [(name, port) for name, port in published if not str(port).startswith("127.0.0.1:")] == []


def test_every_interpolated_variable_is_defined_in_env_example():
    used = {variable for variable, _ in INTERPOLATED.findall(COMPOSE_TEXT)}
    assert used, "docker-compose.yml reads nothing from .env"
    assert sorted(used - set(env_example())) == []


def test_env_example_holds_placeholders_not_secrets():
    secrets = {
        key: value for key, value in env_example().items() if re.search("PASSWORD|SECRET|TOKEN|KEY", key)
    }
    assert secrets, ".env.example defines no credentials"
    assert {key for key, value in secrets.items() if not value.startswith("replace-with-")} == set()


def test_build_contexts_and_dockerfiles_exist(services):
    builds = [spec["build"] for spec in services.values() if "build" in spec]
    assert builds
    for build in builds:
        context = REPO / build["context"]
        assert context.is_dir(), build
        assert (context / build["dockerfile"]).is_file(), build


def test_named_volumes_are_declared_and_bind_mounts_exist(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, spec in services.items():
        for mount in spec.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_ray_nodes_write_to_minio_with_the_job_keys(services):
    for name in RAY_SERVICES:
        environment = services[name]["environment"]
        assert environment["AWS_ENDPOINT_URL"] == "http://minio:9000", name
        assert environment["AWS_ACCESS_KEY_ID"].startswith("${AWS_ACCESS_KEY_ID"), name
        assert environment["AWS_SECRET_ACCESS_KEY"].startswith("${AWS_SECRET_ACCESS_KEY"), name


def test_ray_head_points_its_dashboard_at_prometheus_and_grafana(services):
    environment = services["ray-head"]["environment"]
    assert environment["RAY_PROMETHEUS_HOST"] == "http://prometheus:9090"
    assert environment["RAY_GRAFANA_HOST"] == "http://grafana:3000"
    assert "--metrics-export-port=8080" in services["ray-head"]["command"]


def test_ray_worker_can_be_scaled(services):
    worker = services["ray-worker"]
    # A fixed container name or host port would make `--scale ray-worker=N` fail for N > 1.
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "--address=ray-head:6379" in worker["command"]


def test_gpu_worker_reserves_nvidia_devices_behind_a_profile(services):
    gpu = services["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_prometheus_shares_the_ray_heads_session_folder(services):
    ray_session = "ray-session:/tmp/ray"
    assert ray_session in services["ray-head"]["volumes"]
    assert f"{ray_session}:ro" in services["prometheus"]["volumes"]


def test_dockerfiles_install_torch_before_the_project():
    for dockerfile in ("docker/Dockerfile", "docker/Dockerfile.cuda"):
        text = (REPO / dockerfile).read_text()
        assert text.index("install-python-deps.sh") < text.index("pip install --no-cache-dir --no-deps ."), (
            dockerfile
        )
    script = (REPO / "docker/install-python-deps.sh").read_text()
    assert script.index('"torch==$torch_version"') < script.index('-r "$requirements"')
    assert 'echo "torch==$torch_version" >"$constraints"' in script


def test_cpu_image_takes_torch_from_the_cpu_wheel_index():
    assert (
        "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in (REPO / "docker/Dockerfile").read_text()
    )


def test_dockerignore_keeps_secrets_and_the_venv_out_of_images():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".git"} <= ignored


@needs_docker_compose
def test_compose_file_validates_with_docker_compose():
    result = subprocess.run(
        [docker_compose_binary(), "--env-file", ".env.example", "--profile", "gpu", "config", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@needs_docker_compose
def test_compose_refuses_to_start_without_env_values(tmp_path):
    result = subprocess.run(
        [
            docker_compose_binary(),
            "-f",
            str(REPO / "docker-compose.yml"),
            "--env-file",
            "/dev/null",
            "config",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "in .env" in result.stderr
