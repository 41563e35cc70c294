"""deploy/admission-policy.yml: valid for the Kubernetes schemas, and its CEL expressions, evaluated
offline with cel-python on the requests a flannel token can send, allow flannel's own patch only."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy  # type: ignore[import-untyped]
import pytest
import yaml
from kubernetes_validate import utils as kube_schemas  # type: ignore[import-untyped]

from tools.kubeapi import realistic_node

POLICY = Path(__file__).resolve().parent.parent / "deploy" / "admission-policy.yml"
FLANNEL = "system:serviceaccount:kube-flannel:flannel"
CLAIM = "authentication.kubernetes.io/node-name"
PREFIX = "flannel.alpha.coreos.com/"


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(POLICY.read_text()) if d is not None]


def policy() -> dict[str, Any]:
    spec: dict[str, Any] = documents()[0]["spec"]
    return spec


_ENV = celpy.Environment()


def evaluate(expression: str, activation: dict[str, Any]) -> Any:
    """One CEL expression, parsed and run by cel-python (an error is raised, not returned)."""
    result = _ENV.program(_ENV.compile(expression)).evaluate(activation)
    if isinstance(result, celpy.CELEvalError):
        raise AssertionError("%s: %s" % (expression, result))
    return result


def admit(old: dict[str, Any], new: dict[str, Any], username: str = FLANNEL,
          node_claim: str | None = "k8s01") -> list[str] | None:
    """What the policy says to an update of nodes/<name>/status: None if it does not apply to the
    request, else the messages of the validations that failed (empty: allowed)."""
    extra = {CLAIM: [node_claim]} if node_claim is not None else {}
    activation: dict[str, Any] = {
        "object": celpy.json_to_cel(new), "oldObject": celpy.json_to_cel(old),
        "request": celpy.json_to_cel({"userInfo": {"username": username, "extra": extra}, "subResource": "status"}),
    }
    spec = policy()
    if not all(evaluate(c["expression"], activation) for c in spec["matchConditions"]):
        return None
    activation["variables"] = celpy.celtypes.MapType(
        {celpy.celtypes.StringType(v["name"]): evaluate(v["expression"], activation) for v in spec["variables"]})
    failed = []
    for validation in spec["validations"]:
        if not evaluate(validation["expression"], activation):
            assert validation["reason"] == "Forbidden"
            failed.append(str(evaluate(validation["messageExpression"], activation)) if "messageExpression" in validation
                          else " ".join(validation["message"].split()))
    return failed


def node(name: str = "k8s01") -> dict[str, Any]:
    """A node as its kubelet reports it, before flannel ran."""
    return realistic_node(name, "10.244.1.0/24", "192.168.56.11")


def flannel_patch(old: dict[str, Any], public_ip: str = "192.168.56.11") -> dict[str, Any]:
    """``old`` after pyflannel's patch: its annotations and the NetworkUnavailable condition."""
    new = copy.deepcopy(old)
    new["metadata"]["annotations"].update({
        PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"6e:4b:3c:91:a2:10"}', PREFIX + "backend-type": "vxlan",
        PREFIX + "kube-subnet-manager": "true", PREFIX + "public-ip": public_ip})
    new["status"]["conditions"].append({"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp",
                                        "message": "Flannel is running on this node",
                                        "lastTransitionTime": "2024-05-14T09:00:00Z",
                                        "lastHeartbeatTime": "2024-05-14T09:00:00Z"})
    return new


@pytest.mark.parametrize("version", ["1.30", kube_schemas.latest_version()])
def test_policy_matches_the_kubernetes_schemas(version: str) -> None:
    """admissionregistration.k8s.io/v1 (Kubernetes 1.30+), no unknown field; the binding names it."""
    docs = documents()
    for doc in docs:
        kube_schemas.validate(doc, version, strict=True)
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    assert docs[1]["spec"] == {"policyName": docs[0]["metadata"]["name"], "validationActions": ["Deny"]}
    assert policy()["failurePolicy"] == "Fail"
    assert policy()["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes/status"]}]


def test_flannel_may_patch_its_own_node() -> None:
    old = node()
    assert admit(old, flannel_patch(old)) == []
    # Later patches: a new public IP, the condition flipped; and a node that had no annotations.
    later = flannel_patch(flannel_patch(old), "192.168.56.99")
    later["status"]["conditions"][-1]["status"] = "True"
    assert admit(flannel_patch(old), later) == []
    bare = node()
    del bare["metadata"]["annotations"]
    assert admit(bare, flannel_patch({**bare, "metadata": {**bare["metadata"], "annotations": {}}})) == []


def test_other_users_and_flannel_in_kube_system() -> None:
    old = node()
    hostile = flannel_patch(old, "10.9.9.9")
    assert admit(old, hostile, username="system:node:k8s01") is None, "the kubelet is NodeRestriction's business"
    assert admit(old, hostile, username="system:serviceaccount:kube-system:flannel") == []


@pytest.mark.parametrize("claim, message", [
    ("k8s02", "flannel on node k8s02 may not change the status of node k8s01"),
    (None, "flannel may change a node only with a token bound to a pod on that node (no node-name claim)"),
])
def test_flannel_may_not_patch_another_node(claim: str | None, message: str) -> None:
    old = node()
    assert admit(old, flannel_patch(old), node_claim=claim) == [message]


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of ``obj`` with the value at ``path`` replaced (removed if None)."""
    new = copy.deepcopy(obj)
    *parents, last = path
    target = new
    for key in parents:
        target = target[key]
    if value is None:
        del target[last]
    else:
        target[last] = value
    return new


ANNOTATIONS = "flannel may change only the flannel.alpha.coreos.com/ annotations of its node"
CONDITIONS = "flannel may change only the NetworkUnavailable condition of its node"
OTHERS = ("flannel may not change a node's labels, finalizers, owners, addresses or any status but the "
          "NetworkUnavailable condition")


@pytest.mark.parametrize("change, message", [
    (lambda n: _set(n, ("metadata", "annotations", "node.alpha.kubernetes.io/ttl"), "5"), ANNOTATIONS),
    (lambda n: _set(n, ("metadata", "annotations", "evil"), "1"), ANNOTATIONS),
    (lambda n: _set(n, ("metadata", "annotations", "csi.volume.kubernetes.io/nodeid"), None), ANNOTATIONS),
    (lambda n: _set(n, ("status", "conditions"), [{**c, "status": "False"} if c["type"] == "Ready" else c
                                             for c in n["status"]["conditions"]]), CONDITIONS),
    (lambda n: _set(n, ("status", "conditions"), n["status"]["conditions"][1:]), CONDITIONS),
    (lambda n: _set(n, ("status", "addresses"), [{"type": "InternalIP", "address": "203.0.113.9"}]), OTHERS),
    (lambda n: _set(n, ("metadata", "labels", "node-role.kubernetes.io/control-plane"), ""), OTHERS),
    (lambda n: _set(n, ("metadata", "finalizers"), ["example.com/keep"]), OTHERS),
    (lambda n: _set(n, ("status", "capacity", "pods"), "1000"), OTHERS),
    (lambda n: _set(n, ("status", "daemonEndpoints"), {"kubeletEndpoint": {"Port": 10251}}), OTHERS),
    (lambda n: _set(n, ("status", "nodeInfo"), None), OTHERS),
], ids=["annotation-changed", "annotation-added", "annotation-removed", "ready-condition", "condition-removed",
        "addresses", "label", "finalizer", "capacity", "kubelet-port", "node-info-removed"])
def test_flannel_may_change_nothing_else(change: Any, message: str) -> None:
    """Along with a valid flannel patch of its own node: one more change is refused, and said."""
    old = node()
    assert admit(old, change(flannel_patch(old))) == [message]
