"""Issue 12's open doors stay shut: the shipped compose file, KubeRay manifests and docs are checked,
and each check is shown to find its door on a copy where that door is open again."""

from __future__ import annotations

import copy
import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.conftest import REPO, docker_compose_binary, env_example, needs_docker_compose
from tests.infra.lockdown import (
    code_lines,
    compose_open_doors,
    is_secret_variable,
    k8s_open_doors,
    secrets_in_script_arguments,
    secrets_on_command_lines,
)

COMPOSE_FILE = REPO / "docker-compose.yml"
CHECK_SCRIPT = REPO / "docker/check-env.sh"
K8S = REPO / "infra/k8s"
PLACEHOLDERS = {name for name, value in env_example().items() if value.startswith("replace-with")}


def effective_compose(env_file: Path) -> dict[str, Any]:
    """`docker compose config` as the real binary resolves it: what containers would be started with."""
    result = subprocess.run(
        [docker_compose_binary(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "--profile", "gpu",
         "config", "--format", "json"],
        cwd=env_file.parent, capture_output=True, text=True, timeout=60,
        # Compose lets the shell's variables win over the env file: keep the test session's AWS_* (its S3 server) out.
        env={name: os.environ[name] for name in ("PATH", "HOME", "TMPDIR") if name in os.environ},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def secret_values() -> dict[str, str]:
    """A real-looking value for every setting, distinctive enough to be found wherever it lands."""
    return {
        name: f"canary{secrets.token_hex(12)}" if is_secret_variable(name) or name in PLACEHOLDERS else value
        for name, value in env_example().items()
    }


@pytest.fixture(scope="module")
def effective(tmp_path_factory, secret_values) -> dict[str, Any]:
    env_file = tmp_path_factory.mktemp("compose") / "filled.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in secret_values.items()))
    return effective_compose(env_file)


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def open_doors_in_compose(raw, effective, secret_values, text=None) -> list[str]:
    secret_only = {name: value for name, value in secret_values.items() if is_secret_variable(name)}
    return compose_open_doors(raw, effective, secret_only, text or COMPOSE_FILE.read_text(), PLACEHOLDERS)


# ------------------------------------------------------------------------------------------------ compose


@needs_docker_compose
def test_shipped_compose_file_has_none_of_the_open_doors(raw_compose, effective, secret_values):
    assert open_doors_in_compose(raw_compose, effective, secret_values) == []


@needs_docker_compose
def test_compose_checks_find_each_door_opened_again(raw_compose, effective, secret_values):
    opened = copy.deepcopy(effective)
    init = opened["services"]["minio-init"]
    # The command this project shipped before: the root password on mc's command line.
    init["command"] = [f"mc alias set local http://minio:9000 admin {secret_values['MINIO_ROOT_PASSWORD']}"]
    opened["services"]["ray-head"]["healthcheck"]["test"] = ["CMD-SHELL", 'curl -H "$$RAY_AUTH_TOKEN" x']
    opened["services"]["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] = "true"
    del opened["services"]["grafana"]["depends_on"]["config-check"]
    opened["services"]["config-check"]["command"].remove("RAY_AUTH_TOKEN")
    raw = copy.deepcopy(raw_compose)
    raw["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] = "${GRAFANA_ADMIN_PASSWORD}"
    text = COMPOSE_FILE.read_text() + "\n# ${GRAFANA_ADMIN_PASSWORD}\n"
    doors = "\n".join(open_doors_in_compose(raw, opened, secret_values, text))
    for expected in (
        "minio-init: the value of MINIO_ROOT_PASSWORD",
        "ray-head: its command line expands RAY_AUTH_TOKEN",
        "grafana: anonymous access is on",
        "grafana: GF_SECURITY_ADMIN_PASSWORD is not a required",
        "${GRAFANA_ADMIN_PASSWORD} has no `:?` requirement",
        "grafana reads settings but does not wait for config-check",
        "config-check does not check RAY_AUTH_TOKEN",
    ):
        assert expected in doors


def test_scripts_compose_runs_pass_secrets_to_mc_on_stdin_only(raw_compose):
    scripts = [
        REPO / mount.split(":")[0]
        for spec in raw_compose["services"].values()
        for mount in spec.get("volumes", [])
        if mount.split(":")[0].endswith(".sh")
    ]
    assert {path.name for path in scripts} == {"check-env.sh", "minio-init.sh"}
    for script in scripts:
        assert secrets_in_script_arguments(script.read_text()) == [], script.name
    # What the script did before: the job's secret key as an argument of mc.
    assert secrets_in_script_arguments(
        'mc admin user add local "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"\n'
    )


def run_check(env: dict[str, str], names: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(CHECK_SCRIPT), *names],
        env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@needs_docker_compose
def test_config_check_refuses_the_env_example_placeholders_naming_each_variable():
    check = effective_compose(REPO / ".env.example")["services"]["config-check"]
    result = run_check(check["environment"], check["command"])
    assert result.returncode == 1
    assert PLACEHOLDERS
    for name in PLACEHOLDERS:
        assert f"check-env: {name} is still the placeholder from .env.example" in result.stderr


def test_config_check_accepts_real_values_and_refuses_an_empty_one(effective):
    check = effective["services"]["config-check"]
    accepted = run_check(check["environment"], check["command"])
    assert accepted.returncode == 0, accepted.stderr
    refused = run_check({**check["environment"], "RAY_AUTH_TOKEN": ""}, check["command"])
    assert refused.returncode == 1
    assert "check-env: RAY_AUTH_TOKEN is empty" in refused.stderr


def test_config_check_takes_names_not_values():
    result = run_check({}, ["not a name"])
    assert result.returncode == 2
    assert "'not a name' is not a variable name" in result.stderr


# ---------------------------------------------------------------------------------------------------- k8s


def k8s_manifests() -> dict[str, list[dict]]:
    return {path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted(K8S.glob("*.yaml"))}


def test_shipped_k8s_manifests_have_none_of_the_open_doors():
    assert k8s_open_doors(k8s_manifests()) == []


def cluster_of(manifests):
    return manifests["raycluster.yaml"][0]["spec"]


def test_k8s_checks_find_a_worker_group_without_token_auth():
    manifests = k8s_manifests()
    (container,) = cluster_of(manifests)["workerGroupSpecs"][1]["template"]["spec"]["containers"]
    container["env"] = [{"name": "RAY_AUTH_TOKEN", "value": "inline-token"}]
    assert k8s_open_doors(manifests) == [
        "RayCluster worker group gpu container ray-worker: RAY_AUTH_MODE is not token",
        "RayCluster worker group gpu container ray-worker: RAY_AUTH_TOKEN does not come from a key of a shipped "
        "Secret template",
    ]


def test_k8s_checks_find_a_submitter_without_the_token():
    manifests = k8s_manifests()
    del manifests["rayjob-train.yaml"][0]["spec"]["submitterPodTemplate"]
    assert k8s_open_doors(manifests) == ["rayjob-train.yaml: the default submitter pod has no token"]


def test_k8s_checks_find_an_open_dashboard_without_a_network_policy():
    manifests = k8s_manifests()
    manifests["kustomization.yaml"][0]["resources"].remove("networkpolicy.yaml")
    assert cluster_of(manifests)["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert k8s_open_doors(manifests) == [
        "no NetworkPolicy in the kustomization fences the Ray pods (dashboard host 0.0.0.0)"
    ]


def test_k8s_checks_find_a_policy_that_lets_anyone_in():
    manifests = k8s_manifests()
    (policy,) = manifests["networkpolicy.yaml"]
    policy["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    policy["spec"]["ingress"].append({"from": [{"namespaceSelector": {}}], "ports": [{"port": 10001}]})
    assert k8s_open_doors(manifests) == [
        "NetworkPolicy hybriddit-ray rule 4: admits sources by address or whole namespaces, not by pod labels",
        "NetworkPolicy hybriddit-ray rule 4: pods outside the Ray cluster reach ports beyond the dashboard and "
        "metrics",
        "NetworkPolicy hybriddit-ray rule 5: admits sources by address or whole namespaces, not by pod labels",
        "NetworkPolicy hybriddit-ray rule 5: pods outside the Ray cluster reach ports beyond the dashboard and "
        "metrics",
    ]


def test_k8s_checks_find_a_head_service_exposed_outside_the_cluster():
    manifests = k8s_manifests()
    cluster_of(manifests)["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert k8s_open_doors(manifests) == [
        "RayCluster head: its Service or an Ingress reaches outside the Kubernetes cluster"
    ]


def test_network_policy_lets_the_submitters_reach_the_dashboard_and_nothing_else():
    manifests = k8s_manifests()
    (policy,) = manifests["networkpolicy.yaml"]
    submitter_rules = [
        rule for rule in policy["spec"]["ingress"]
        if rule["from"][0].get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
        == "ray-submitter"
    ]  # fmt: skip
    assert [rule["ports"] for rule in submitter_rules] == [[{"protocol": "TCP", "port": 8265}]]
    for name in ("rayjob-encode.yaml", "rayjob-train.yaml"):
        labels = manifests[name][0]["spec"]["submitterPodTemplate"]["metadata"]["labels"]
        assert submitter_rules[0]["from"][0]["podSelector"]["matchLabels"].items() <= labels.items()


def test_secret_templates_are_never_applied_and_hold_placeholders_only():
    manifests = k8s_manifests()
    templates = {name for name in manifests if name.endswith("secret.example.yaml")}
    assert templates == {"secret.example.yaml", "ray-auth-secret.example.yaml"}
    assert not templates & set(manifests["kustomization.yaml"][0]["resources"])
    for name in templates:
        (secret,) = manifests[name]
        assert all(value.startswith("replace-with-") for value in secret["stringData"].values()), name


# --------------------------------------------------------------------------------------------------- docs


def documented_command_lines() -> dict[str, list[str]]:
    """Code in the Markdown docs, and the comments of the deployment files (they hold usage lines)."""
    docs = sorted({*REPO.glob("*.md"), *REPO.glob("infra/**/*.md"), *REPO.glob("docs/**/*.md")})
    lines = {str(path.relative_to(REPO)): code_lines(path.read_text()) for path in docs}
    for path in [COMPOSE_FILE, REPO / ".env.example", *sorted(K8S.glob("*.yaml"))]:
        comments = [line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line]
        lines[str(path.relative_to(REPO))] = comments
    return lines


def test_no_documented_command_line_carries_a_secret():
    lines = documented_command_lines()
    assert {"README.md", "infra/k8s/README.md", "docker-compose.yml"} <= set(lines)
    assert {name: found for name, lines in lines.items() if (found := secrets_on_command_lines(lines))} == {}


def test_docs_check_finds_the_command_lines_this_project_documented_before():
    before = [
        "RAY_AUTH_TOKEN=... ray job submit --address http://127.0.0.1:8265 -- python ...",
        "  --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...",
        'mc alias set local http://minio:9000 "$$MINIO_ROOT_USER" "$$MINIO_ROOT_PASSWORD"',
        "mc admin user add local minio-user --password hunter22",
    ]
    assert secrets_on_command_lines(before) == [line.strip() for line in before]
    # A token file's path and the auth mode are not secrets.
    assert secrets_on_command_lines(["RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.t ray job list"]) == []
