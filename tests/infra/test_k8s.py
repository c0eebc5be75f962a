"""KubeRay manifests in infra/k8s: kinds, groups, credentials and job entrypoints."""

from __future__ import annotations

import re
import shlex

import yaml

from tests.infra.conftest import REPO

K8S = REPO / "infra/k8s"
ENTRYPOINTS = {
    "rayjob-encode.yaml": ("pipelines/encode_latents.py", "configs/encode/"),
    "rayjob-train.yaml": ("trainer/train.py", "configs/train/"),
}


def manifests() -> dict[str, list[dict]]:
    return {path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted(K8S.glob("*.yaml"))}


def only(name: str) -> dict:
    (document,) = manifests()[name]
    return document


def ray_containers(cluster: dict) -> list[dict]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


def test_every_manifest_parses_with_the_expected_kind():
    kinds = {name: [(doc["apiVersion"], doc["kind"]) for doc in docs] for name, docs in manifests().items()}
    assert kinds == {
        "configmap.yaml": [("v1", "ConfigMap")],
        "kustomization.yaml": [("kustomize.config.k8s.io/v1beta1", "Kustomization")],
        "networkpolicy.yaml": [("networking.k8s.io/v1", "NetworkPolicy")],
        "ray-auth-secret.example.yaml": [("v1", "Secret")],
        "raycluster.yaml": [("ray.io/v1", "RayCluster")],
        "rayjob-encode.yaml": [("ray.io/v1", "RayJob")],
        "rayjob-train.yaml": [("ray.io/v1", "RayJob")],
        "secret.example.yaml": [("v1", "Secret")],
    }


def test_cluster_has_a_cpu_and_a_gpu_worker_group():
    groups = {group["groupName"]: group for group in only("raycluster.yaml")["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    (gpu_container,) = groups["gpu"]["template"]["spec"]["containers"]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_container["image"].endswith(":cuda")
    (cpu_container,) = groups["cpu"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]


def test_every_ray_node_reads_the_s3_configmap_and_secret_by_their_declared_names():
    declared = {
        (doc["kind"], doc["metadata"].get("name"))
        for docs in manifests().values()
        for doc in docs
        if "metadata" in doc
    }
    for container in ray_containers(only("raycluster.yaml")):
        refs = {
            ("ConfigMap", ref["configMapRef"]["name"])
            for ref in container["envFrom"]
            if "configMapRef" in ref
        }
        refs |= {("Secret", ref["secretRef"]["name"]) for ref in container["envFrom"] if "secretRef" in ref}
        assert refs == {("ConfigMap", "hybriddit-s3"), ("Secret", "hybriddit-s3-credentials")}
        assert refs <= declared


def test_configmap_and_secret_carry_the_variables_s3_clients_read():
    assert "AWS_ENDPOINT_URL" in only("configmap.yaml")["data"]
    assert set(only("secret.example.yaml")["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_secret_example_holds_placeholders_only():
    values = only("secret.example.yaml")["stringData"].values()
    assert all(value.startswith("replace-with-") for value in values)


def test_rayjobs_submit_to_the_cluster():
    cluster_name = only("raycluster.yaml")["metadata"]["name"]
    for name in ENTRYPOINTS:
        assert only(name)["spec"]["clusterSelector"] == {"ray.io/cluster": cluster_name}, name


def test_rayjob_entrypoints_run_the_job_script_with_a_config_of_that_job():
    for name, (script, config_folder) in ENTRYPOINTS.items():
        argv = shlex.split(only(name)["spec"]["entrypoint"])
        assert argv[:2] == ["python", script], name
        assert argv[2] == "--config", name
        assert re.fullmatch(re.escape(config_folder) + r"[a-z0-9][a-z0-9._-]*\.yaml", argv[3]), name
        assert (REPO / script).is_file() and (REPO / argv[3]).is_file(), name


def test_kustomization_applies_cluster_resources_but_never_the_secret_template():
    resources = only("kustomization.yaml")["resources"]
    assert all((K8S / resource).is_file() for resource in resources)
    assert "secret.example.yaml" not in resources
