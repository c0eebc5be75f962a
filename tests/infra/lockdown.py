"""The open doors issue 12 lists, as checks over parsed deployment files; each returns what it finds.

The tests run them on the shipped files (nothing may be found) and on copies with one door opened
again (it must be found), so that none of these checks can pass by being unable to fail.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Values that must never reach a process's arguments. Access key ids and user names are identifiers.
SECRET_VARIABLE = re.compile(r"PASSWORD|SECRET|TOKEN")
# ${VAR}, ${VAR:?msg}, ${VAR:-default}; `$$` escapes a dollar for the container's shell.
INTERPOLATED = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:\?)?")
# Process arguments a container runs with (a healthcheck's `test` runs as a process too).
ARGUMENT_FIELDS = ("command", "entrypoint")

RAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
DASHBOARD_PORT = 8265
METRICS_PORT = 8080


def is_secret_variable(name: str) -> bool:
    return bool(SECRET_VARIABLE.search(name)) and not name.endswith(("_PATH", "_FILE", "_MODE"))


def shell_expansions(text: str) -> set[str]:
    """Variables a shell would expand in `text`: $NAME and ${NAME...}."""
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))


def service_arguments(spec: dict[str, Any]) -> str:
    healthcheck = spec.get("healthcheck") or {}
    return json.dumps([spec.get(field) for field in ARGUMENT_FIELDS] + [healthcheck.get("test")])


# ---------------------------------------------------------------------------------------------- compose


def compose_open_doors(
    raw: dict[str, Any],
    effective: dict[str, Any],
    secret_values: dict[str, str],
    compose_text: str,
    placeholders: set[str],
) -> list[str]:
    """`raw`: docker-compose.yml as YAML; `effective`: `docker compose config` run with `secret_values`;
    `placeholders`: the variables .env.example leaves as `replace-with-...`."""
    doors = []
    for name, spec in effective["services"].items():
        arguments = service_arguments(spec)
        leaked = sorted(variable for variable, value in secret_values.items() if value in arguments)
        if leaked:
            doors.append(f"{name}: the value of {', '.join(leaked)} is in its command/entrypoint/healthcheck")
        deferred = sorted(
            variable for variable in shell_expansions(arguments) if is_secret_variable(variable)
        )
        if deferred:
            doors.append(f"{name}: its command line expands {', '.join(deferred)} at run time")
    for variable, required in INTERPOLATED.findall(compose_text):
        if not required:
            doors.append(
                f"${{{variable}}} has no `:?` requirement, so a missing value starts the stack anyway"
            )
    grafana = effective["services"]["grafana"]["environment"]
    if str(grafana.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() != "false":
        doors.append("grafana: anonymous access is on")
    raw_password = str(raw["services"]["grafana"]["environment"].get("GF_SECURITY_ADMIN_PASSWORD", ""))
    if not raw_password.startswith("${") or ":?" not in raw_password:
        doors.append("grafana: GF_SECURITY_ADMIN_PASSWORD is not a required `${VAR:?message}` setting")
    doors += placeholder_check_gaps(raw, effective, placeholders)
    return doors


def placeholder_check_gaps(
    raw: dict[str, Any], effective: dict[str, Any], placeholders: set[str]
) -> list[str]:
    """The start-up check must read every placeholder and secret and run before every service that reads one."""
    check = effective["services"].get("config-check")
    if check is None:
        return ["no config-check service: placeholder values would start the stack"]
    checked = set(check.get("command") or [])
    interpolated = {variable for variable, _ in INTERPOLATED.findall(json.dumps(raw["services"]))}
    must_check = {
        variable for variable in interpolated if is_secret_variable(variable) or variable in placeholders
    }
    gaps = [f"config-check does not check {variable}" for variable in sorted(must_check - checked)]
    for name, spec in raw["services"].items():
        if name == "config-check" or not INTERPOLATED.search(json.dumps(spec.get("environment") or {})):
            continue
        condition = ((effective["services"][name].get("depends_on") or {}).get("config-check") or {}).get(
            "condition"
        )
        if condition != "service_completed_successfully":
            gaps.append(f"{name} reads settings but does not wait for config-check to succeed")
    return gaps


def secrets_in_script_arguments(script: str) -> list[str]:
    """Lines of a shell script that expand a secret anywhere but in the printf builtin of a pipeline."""
    return [
        line.strip()
        for line in script.splitlines()
        if not line.lstrip().startswith("#")
        and any(is_secret_variable(variable) for variable in shell_expansions(line))
        and not re.match(r"\s*printf\s[^|]*\|", line)
    ]


# ------------------------------------------------------------------------------------------------- k8s


def by_kind(manifests: dict[str, list[dict]], kind: str) -> list[tuple[str, dict]]:
    return [(file, doc) for file, docs in manifests.items() for doc in docs if doc.get("kind") == kind]


def env_by_name(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env") or []}


def token_auth_gaps(where: str, container: dict, secrets: dict[str, set[str]]) -> list[str]:
    env = env_by_name(container)
    gaps = []
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        gaps.append(f"{where}: RAY_AUTH_MODE is not token")
    token = env.get("RAY_AUTH_TOKEN") or {}
    ref = (token.get("valueFrom") or {}).get("secretKeyRef") or {}
    if "value" in token or ref.get("key") not in secrets.get(ref.get("name"), set()):
        gaps.append(f"{where}: RAY_AUTH_TOKEN does not come from a key of a shipped Secret template")
    if any(
        is_secret_variable(v)
        for v in shell_expansions(json.dumps([container.get("command"), container.get("args")]))
    ):
        gaps.append(f"{where}: a secret is expanded on its command line")
    return gaps


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels") or {}
    return bool(match) and all(labels.get(key) == value for key, value in match.items())


def k8s_open_doors(manifests: dict[str, list[dict]]) -> list[str]:
    """`manifests`: every YAML file of infra/k8s, parsed, by file name."""
    secrets = {
        doc["metadata"]["name"]: set(doc.get("stringData") or {}) for _, doc in by_kind(manifests, "Secret")
    }
    ((_, cluster),) = by_kind(manifests, "RayCluster")
    cluster_labels = {"ray.io/cluster": cluster["metadata"]["name"]}
    head = cluster["spec"]["headGroupSpec"]
    doors = []
    groups = [("head", head)] + [
        (f"worker group {g['groupName']}", g) for g in cluster["spec"]["workerGroupSpecs"]
    ]
    for where, group in groups:
        for container in group["template"]["spec"]["containers"]:
            doors += token_auth_gaps(f"RayCluster {where} container {container['name']}", container, secrets)
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        doors.append("RayCluster head: its Service or an Ingress reaches outside the Kubernetes cluster")

    submitter_labels = []
    for file, job in by_kind(manifests, "RayJob"):
        template = job["spec"].get("submitterPodTemplate")
        if template is None:
            doors.append(f"{file}: the default submitter pod has no token")
            continue
        submitter_labels.append((file, (template.get("metadata") or {}).get("labels") or {}))
        for container in template["spec"]["containers"]:
            doors += token_auth_gaps(f"{file} submitter", container, secrets)

    kustomized = {resource for _, doc in by_kind(manifests, "Kustomization") for resource in doc["resources"]}
    policies = [doc for file, doc in by_kind(manifests, "NetworkPolicy") if file in kustomized]
    covering = [
        policy for policy in policies
        if selects(policy["spec"]["podSelector"], cluster_labels) and "Ingress" in policy["spec"].get("policyTypes", [])
    ]  # fmt: skip
    dashboard_host = head.get("rayStartParams", {}).get("dashboard-host", "0.0.0.0")  # KubeRay's default
    if not covering:
        doors.append(
            f"no NetworkPolicy in the kustomization fences the Ray pods (dashboard host {dashboard_host})"
        )
    for policy in covering:
        doors += ingress_rule_gaps(policy, cluster_labels)
        for file, labels in submitter_labels:
            if not any(
                rule_admits(rule, labels, DASHBOARD_PORT) for rule in policy["spec"].get("ingress", [])
            ):
                doors.append(f"{file}: the NetworkPolicy does not let its submitter reach the dashboard")
    return doors


def rule_admits(rule: dict, labels: dict, port: int) -> bool:
    ports = {entry.get("port") for entry in rule.get("ports") or []}
    return (not ports or port in ports) and any(
        selects(peer.get("podSelector") or {}, labels) for peer in rule["from"]
    )


def ingress_rule_gaps(policy: dict, cluster_labels: dict) -> list[str]:
    """Each rule admits labelled pods only; pods other than Ray's own reach the dashboard or metrics only."""
    gaps = []
    for index, rule in enumerate(policy["spec"].get("ingress") or []):
        where = f"NetworkPolicy {policy['metadata']['name']} rule {index}"
        peers = rule.get("from") or []
        if not peers:
            gaps.append(f"{where}: admits every source")
            continue
        for peer in peers:
            if "ipBlock" in peer or not (peer.get("podSelector") or {}).get("matchLabels"):
                gaps.append(f"{where}: admits sources by address or whole namespaces, not by pod labels")
        own_pods_only = all(peer.get("podSelector") == {"matchLabels": cluster_labels} and "namespaceSelector" not in peer
                            for peer in peers)  # fmt: skip
        ports = {entry.get("port") for entry in rule.get("ports") or []}
        if not own_pods_only and (not ports or ports - {DASHBOARD_PORT, METRICS_PORT}):
            gaps.append(f"{where}: pods outside the Ray cluster reach ports beyond the dashboard and metrics")
    return gaps


# ------------------------------------------------------------------------------------------------ docs


def code_lines(markdown: str) -> list[str]:
    """The lines of fenced code blocks and the inline code spans of a Markdown text."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            lines.append(line)
        else:
            lines += re.findall(r"`([^`]+)`", line)
    return lines


def secrets_on_command_lines(lines: list[str]) -> list[str]:
    """Command lines that would put a secret into argv or shell history."""
    found = []
    for line in lines:
        assigned = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=(\S+)", line)
        literal = re.findall(r"--from-literal=([A-Za-z_][A-Za-z0-9_]*)=", line)
        flags = re.findall(r"--(password|secret|token)[= ]\S+", line, flags=re.IGNORECASE)
        expanded = [v for v in shell_expansions(line) if is_secret_variable(v)]
        if any(is_secret_variable(name) for name, _ in assigned) or literal or flags or expanded:
            found.append(line.strip())
    return found
