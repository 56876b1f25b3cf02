"""The Prefect Kubernetes work pool: one base job template, CPU and GPU pods chosen per deployment.

Prefect's own template (prefect-kubernetes) is the starting point; loraflow adds what its flow runs need:
the shared workspace volume (the checkout, DVC cache and outputs every stage reads and writes), the
environment from a Kubernetes Secret, whole ``resources``/``nodeSelector``/``tolerations`` values per
deployment (a GPU is a resource *name*, which a template cannot put in a key), and a locked-down pod
(non-root, no privilege escalation, no capabilities, no service-account token). The deployments set the
variables from ``platform.kubernetes``: ``cpu`` for retrain and drift-check, ``gpu`` for ``stage/gpu``,
which runs the stages named in ``gpu_stages`` (train) as a flow run of their own.
"""

from __future__ import annotations

import copy

from pipeline.config import KubernetesConfig, PodResources

RUN_AS = 10001  # the image's user (deploy/pipeline.Dockerfile)


def _variable(kind: str, default, description: str) -> dict:
    return {"type": kind, "default": default, "description": description}


def base_job_template(k: KubernetesConfig) -> dict:
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    props = template["variables"]["properties"]
    props["namespace"]["default"] = k.namespace
    props["image"]["default"] = k.image
    props["service_account_name"]["default"] = k.service_account
    for name in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
        props.pop(name, None)  # replaced by the whole ``resources`` value below
    props["resources"] = _variable("object", resources(k.cpu), "The container's resources (requests, limits).")
    props["node_selector"] = _variable("object", k.cpu.node_selector, "The pod's nodeSelector.")
    props["tolerations"] = _variable("array", k.cpu.tolerations, "The pod's tolerations.")
    props["workspace_claim"] = _variable("string", k.workspace_claim, "The PVC holding the shared workspace.")
    props["workspace_path"] = _variable("string", k.workspace_path, "Where the workspace is mounted.")
    props["env_secret"] = _variable("string", k.env_secret, "The Secret whose keys become the environment.")
    job = template["job_configuration"]["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    container.update({
        "resources": "{{ resources }}",
        "workingDir": "{{ workspace_path }}",
        "envFrom": [{"secretRef": {"name": "{{ env_secret }}"}}],
        "volumeMounts": [{"name": "workspace", "mountPath": "{{ workspace_path }}"},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": RUN_AS, "capabilities": {"drop": ["ALL"]}},
    })
    pod.update({
        "nodeSelector": "{{ node_selector }}",
        "tolerations": "{{ tolerations }}",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": "{{ workspace_claim }}"}},
                    {"name": "tmp", "emptyDir": {}}],
    })
    return template


def resources(r: PodResources) -> dict:
    out = {"requests": {"cpu": r.cpu, "memory": r.memory}, "limits": {"memory": r.memory}}
    if r.gpus:
        out["requests"][r.gpu_resource] = str(r.gpus)
        out["limits"][r.gpu_resource] = str(r.gpus)
    return out


def job_variables(k: KubernetesConfig, kind: str) -> dict:
    """The deployment's job variables: ``cpu`` or ``gpu`` pods."""
    r = k.gpu if kind == "gpu" else k.cpu
    return {"image": k.image, "namespace": k.namespace, "service_account_name": k.service_account,
            "resources": resources(r), "node_selector": r.node_selector, "tolerations": r.tolerations,
            "workspace_claim": k.workspace_claim, "workspace_path": k.workspace_path, "env_secret": k.env_secret}


async def render(template: dict, values: dict) -> dict:
    """The Job manifest Prefect's Kubernetes worker would submit for a deployment with ``values``."""
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    cfg = await KubernetesWorkerJobConfiguration.from_template_and_values(template, values)
    return cfg.job_manifest
