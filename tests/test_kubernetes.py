"""The platform on Kubernetes, checked offline: the manifests against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail), the policy scanner (checkov: every finding fixed or
skipped with its reason in the manifest), the Prefect Kubernetes work pool's job template rendered by
prefect-kubernetes itself for a CPU and a GPU deployment, and the cross-references between them."""

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from tests.conftest import ROOT

K8S = ROOT / "deploy/kubernetes"
TOOLS = ROOT / ".venv-k8s/bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "checkov").exists(), reason="needs .venv-k8s (make test-env)")


def _manifests() -> dict[str, list[dict]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {name: [d for d in yaml.safe_load_all((K8S / name).read_text()) if d] for name in kust["resources"]}


def _validate(paths: list[Path]) -> None:
    out = subprocess.run([str(TOOLS / "kubernetes-validate"), "--strict", "--quiet", "-k", "1.33.0",
                          *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_manifest_file_is_listed_and_valid_against_the_schemas():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "params.yaml"}
    assert listed == on_disk
    _validate([K8S / name for name in sorted(listed)])


def test_a_broken_manifest_fails_validation(tmp_path):
    bad = tmp_path / "bad.yaml"
    doc = _manifests()["gateway.yaml"][0]
    doc["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}  # a typo the API server would drop
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(AssertionError):
        _validate([bad])


def test_checkov_finds_nothing_unjustified(tmp_path):
    out = subprocess.run([str(TOOLS / "checkov"), "-d", str(K8S), "--framework", "kubernetes", "-o", "json",
                          "--skip-download"], capture_output=True, text=True, timeout=600)
    report = json.loads(out.stdout)
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert not failed, failed
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] >= 20 and report["summary"]["passed"] > 100, report["summary"]
    for c in results["skipped_checks"]:  # a skip must say why
        assert len((c.get("check_result") or {}).get("suppress_comment", "")) > 20, c["check_id"]


def test_nothing_is_exposed_beyond_the_authenticated_gateway():
    docs = [d for ds in _manifests().values() for d in ds]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in services.values())
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"]["podSelector"] == {}
    open_to_all = [n for n, p in policies.items() if any("from" not in rule for rule in p.get("ingress", []))]
    assert open_to_all == ["gateway-from-clients"]
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            pod = d["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
            assert pod.get("automountServiceAccountToken") is (d["metadata"]["name"] == "prefect-worker")
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                refs = [e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for e in c.get("env", [])]
                refs += [e.get("secretRef", {}).get("name") for e in c.get("envFrom", [])]
                assert "loraflow-secrets" in refs or d["metadata"]["name"] == "prefect-server" or refs


def test_params_overlay_matches_the_manifests():
    from pipeline.serve.vllm import launch_command

    p = load_params(K8S / "params.yaml")
    docs = {(d["kind"], d["metadata"]["name"]): d for ds in _manifests().values() for d in ds}
    vllm = docs[("StatefulSet", "vllm")]
    assert p.serve.upstream_urls == [f"http://vllm-{i}.vllm:8000" for i in range(vllm["spec"]["replicas"])]
    flags = {a.split("=")[0] for a in vllm["spec"]["template"]["spec"]["containers"][0]["args"]}
    ours = {a for a in launch_command(p.serve, Path("base")) if a.startswith("--")}
    assert ours <= flags, ours - flags
    k = p.platform.kubernetes
    assert docs[("PersistentVolumeClaim", k.workspace_claim)]
    assert docs[("ServiceAccount", k.service_account)]
    assert p.platform.work_pool_type == "kubernetes" and p.registry.tracking_uri == "http://mlflow:5000"


def test_work_pool_template_renders_a_gpu_job_for_train_and_cpu_jobs_for_the_rest(tmp_path, prefect_server):
    from flows.kubernetes import base_job_template, render
    from flows.platform import deployment_specs, platform_of

    p = load_params(K8S / "params.yaml")
    plat = platform_of(p, "deploy/kubernetes/params.yaml", ROOT)
    specs = {f"{s['flow']}/{s['name']}": s for s in deployment_specs(plat)}
    assert set(specs) == {"retrain/production", "drift-check/production", "stage/gpu"}
    template = base_job_template(p.platform.kubernetes)
    jobs = {}
    for name, spec in specs.items():
        job = asyncio.run(render(template, spec["job_variables"]))
        jobs[name] = job
        # prefect-kubernetes insists on these two Job fields inside the pod spec (its own template has them
        # there; the API server ignores them): everything else must be a valid Job.
        checked = json.loads(json.dumps(job))
        for key in ("completions", "parallelism"):
            checked["spec"]["template"]["spec"].pop(key)
        (tmp_path / f"{name.replace('/', '-')}.yaml").write_text(yaml.safe_dump(checked))
    _validate(sorted(tmp_path.glob("*.yaml")))  # what the worker would submit is a valid Job

    def pod(name):
        return jobs[name]["spec"]["template"]["spec"]

    gpu = pod("stage/gpu")["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1" and gpu["requests"]["nvidia.com/gpu"] == "1"
    assert pod("stage/gpu")["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for name in ("retrain/production", "drift-check/production"):
        res = pod(name)["containers"][0]["resources"]
        assert not any("gpu" in k for part in res.values() for k in part), res
        assert pod(name)["tolerations"] == []
    for name in jobs:
        spec = pod(name)
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "loraflow-workspace"
        assert spec["containers"][0]["image"] == p.platform.kubernetes.image
        assert spec["securityContext"]["runAsNonRoot"] and spec["automountServiceAccountToken"] is False
    # A GPU elsewhere is configuration: another resource name and a node selector.
    k = p.platform.kubernetes.model_copy(update={"gpu": p.platform.kubernetes.gpu.model_copy(update={
        "gpu_resource": "amd.com/gpu", "gpus": 2, "node_selector": {"pool": "mi300"}})})
    from flows.kubernetes import job_variables

    amd = asyncio.run(render(base_job_template(k), job_variables(k, "gpu")))["spec"]["template"]["spec"]
    assert amd["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "2"
    assert amd["nodeSelector"] == {"pool": "mi300"}
