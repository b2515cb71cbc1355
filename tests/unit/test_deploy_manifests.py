"""The Kubernetes manifests under deploy/ keep the settings prelock depends on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
EXPECTED_CAPABILITIES = {"IPC_LOCK", "SYS_PTRACE", "DAC_READ_SEARCH", "CHECKPOINT_RESTORE"}


def load_documents() -> list[tuple[Path, dict]]:
    documents = []
    for path in sorted(DEPLOY_DIR.rglob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path, document))
    return documents


def find_one(kind: str) -> dict:
    matches = [document for _, document in load_documents() if document.get("kind") == kind]
    assert len(matches) == 1, f"expected one {kind} under deploy/, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def pod_spec() -> dict:
    return find_one("DaemonSet")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod_spec) -> dict:
    (prelock,) = [c for c in pod_spec["containers"] if c["name"] == "prelock"]
    return prelock


def test_manifests_parse_with_kind():
    documents = load_documents()
    assert documents, "no YAML documents under deploy/"
    for path, document in documents:
        assert isinstance(document, dict), path
        assert "apiVersion" in document, path
        assert "kind" in document, path


def test_daemonset_uses_host_pid(pod_spec):
    assert pod_spec["hostPID"] is True


def test_daemonset_priority_class(pod_spec):
    assert pod_spec["priorityClassName"] == "system-node-critical"


def test_daemonset_tolerates_all_taints(pod_spec):
    assert {"operator": "Exists"} in pod_spec["tolerations"]


def test_container_capabilities_exact(container):
    capabilities = container["securityContext"]["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    assert set(capabilities["add"]) == EXPECTED_CAPABILITIES
    assert len(capabilities["add"]) == len(EXPECTED_CAPABILITIES)


def test_container_runs_as_root_unprivileged(container):
    security = container["securityContext"]
    assert security["runAsUser"] == 0
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False


def test_container_has_memory_limit(container):
    resources = container["resources"]
    assert "memory" in resources["limits"]
    assert "memory" in resources["requests"]


def test_config_mounted_from_configmap(pod_spec, container):
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/prelock"]
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    configmap = find_one("ConfigMap")

    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert "prelock.yaml" in configmap["data"]
    assert container["args"] == ["run", "-c", "/etc/prelock/prelock.yaml"]


def test_state_on_host_path(pod_spec, container):
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/prelock"]
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["path"] == "/var/lib/prelock"


def test_configmap_matches_shipped_config():
    configmap = find_one("ConfigMap")
    shipped = yaml.safe_load((REPO_ROOT / "config" / "prelock.yaml").read_text())
    assert yaml.safe_load(configmap["data"]["prelock.yaml"]) == shipped


def test_configmap_and_daemonset_share_namespace():
    configmap = find_one("ConfigMap")
    daemonset = find_one("DaemonSet")
    assert configmap["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
