"""Stage `k8s`: Kubernetes manifests for Triton replicas that read the model repository from
object storage, rendered into k8s/ (generated, ignored by git; `kubectl apply -k k8s/`).

    doit k8s repo=s3://BUCKET/PREFIX

The pods run NVIDIA's Triton image (the Dockerfile's server stage builds on it) through our
supervisor (triton/supervisor/supervisor.py), as docker-compose does: explicit model control,
strict readiness, and a model whose python stub died reloaded, so that the readiness probe
says not-ready while a model cannot answer. The supervisor and requirements/server.txt reach
the pods in a ConfigMap; an init container installs what the python-backend models import.
The storage credentials come from a Secret the manifests name but do not hold.

Templates are strict Jinja (StrictUndefined), like the pbtxt stage's. The manifests are stale
when the settings they render from change (a digest of them in config_changed) or when a file
they read does (file_dep: templates, this module, the Dockerfile, the supervisor, server.txt).
"""

from __future__ import annotations

import hashlib
import json
import re

from doit.tools import config_changed

from tasks import artifacts, paths
from tasks.errors import ConfigError, SettingsError, fails_cleanly
from tasks.settings import Settings, current

# The Kubernetes objects `kubectl apply -k k8s/` creates, in the kustomization's order.
MANIFESTS = ("configmap", "deployment", "service", "hpa", "pdb")
# Also rendered: the kustomization itself, and the prometheus-adapter rule that gives the
# HPA its metric (Helm values for the prometheus-adapter chart; not applied with -k).
KUSTOMIZATION = "kustomization"
ADAPTER_VALUES = "prometheus-adapter-values"
RENDERED = (*MANIFESTS, KUSTOMIZATION, ADAPTER_VALUES)

KUBERNETES_VERSION = "1.34"  # the schemas tests/test_k8s.py validates every manifest against

# Replicas, and when to add one: Triton's queue time per request (its k8s-onprem chart's
# `avg_time_queue_us`) averaged over the pods. Two replicas at least, so that a node drain
# (the PodDisruptionBudget keeps one) or a pod restart never stops serving.
MIN_REPLICAS, MAX_REPLICAS = 2, 4
QUEUE_METRIC = "avg_time_queue_us"
QUEUE_TARGET_US = 5000  # 5 ms waiting in queues per request, averaged over the pods
METRIC_WINDOW = "1m"  # the rate window of the adapter's query: several 15-30 s scrapes
MIN_AVAILABLE = 1  # the PodDisruptionBudget

# What a pod asks for. The model step's instances each take a core, and the server one more;
# no CPU limit (throttling adds latency), a memory limit so a leak restarts the pod.
MEMORY_REQUEST, MEMORY_LIMIT = "4Gi", "8Gi"
SHM_SIZE = "1Gi"  # /dev/shm: the python backend's tensors (docker-compose: shm_size 1g)
# Slow model loads (a download from the bucket, TensorRT engines): the startup probe allows
# this long before liveness takes over.
STARTUP_SECONDS = 600
PROBE_PERIOD = 10
SITE_PACKAGES = "/opt/llm-in-triton/site"  # the init container installs server.txt here
FILES_DIR = "/opt/llm-in-triton/files"  # the ConfigMap: supervisor.py, server.txt


# The S3 credentials Triton reads from its environment, each from the Secret's key of the
# same name: (variable, optional)
S3_ENVIRONMENT = (
    ("AWS_ACCESS_KEY_ID", False),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("AWS_ENDPOINT_URL", True),
    ("AWS_DEFAULT_REGION", True),
)


def object_name(name: str) -> str:
    """A Kubernetes object name (DNS-1123: lower case, digits, '-') for a deployment."""
    return "triton-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def server_image() -> str:
    """The image the Dockerfile's server stage builds on: NVIDIA's Triton, the same release."""
    found = re.search(r"^FROM\s+(\S+)\s+AS\s+server\s*$", paths.DOCKERFILE.read_text(), re.M | re.I)
    if found is None:
        raise ConfigError("Dockerfile: no `FROM <image> AS server` line; k8s/ runs that image")
    return found.group(1)


def needs_repository(settings: Settings) -> str:
    """The repository the pods read; `doit k8s` without one is refused naming the fix."""
    if settings.storage.location is None:
        raise SettingsError(
            "doit k8s needs repo=: the model repository in object storage the pods read, e.g. "
            "doit k8s repo=s3://BUCKET/PREFIX (doit publish uploads it there)"
        )
    return settings.storage.repo


def k8s_params(settings: Settings) -> dict:
    """Everything the manifests render from that the settings decide (JSON-safe): what
    config_changed sees. The files they read are the task's file_dep."""
    endpoints, repo = settings.endpoints, settings.storage.repo
    name = object_name(settings.name)
    gpus = (len(settings.serving.gpus) or 1) if settings.backend == "tensorrt" else 0
    return {
        "name": name,
        "deployment": settings.name,
        "backend": settings.backend,
        "repo": repo,
        "secret": f"{name}-storage",
        "storage_env": [list(e) for e in S3_ENVIRONMENT],
        "ports": {
            "http": endpoints.http_port,
            "grpc": endpoints.grpc_port,
            "metrics": endpoints.metrics_port,
        },
        "cpu": settings.serving.instances + 1,
        "memory": [MEMORY_REQUEST, MEMORY_LIMIT],
        "gpus": gpus,  # nvidia.com/gpu: TensorRT engines only
        "shm_size": SHM_SIZE,
        "startup_failures": STARTUP_SECONDS // PROBE_PERIOD,
        "probe_period": PROBE_PERIOD,
        "replicas": [MIN_REPLICAS, MAX_REPLICAS],
        "min_available": MIN_AVAILABLE,
        "metric": QUEUE_METRIC,
        "queue_target_us": QUEUE_TARGET_US,
        "metric_window": METRIC_WINDOW,
        "site_packages": SITE_PACKAGES,
        "files_dir": FILES_DIR,
        "manifests": [paths.k8s_manifest(kind).name for kind in MANIFESTS],
    }


def render_context(settings: Settings) -> dict:
    """The params, and what the manifests read from files: the image, the ConfigMap's files
    and their digest (a pod annotation, so a changed supervisor rolls the pods)."""
    files = {
        "supervisor.py": paths.runtime_file("supervisor", "supervisor.py").read_text(),
        "server.txt": paths.SERVER_REQUIREMENTS.read_text(),
    }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {**k8s_params(settings), "image": server_image(), "files": files, "files_digest": digest}


def render(kind: str, context: dict) -> str:
    """One manifest from templates/k8s/<kind>.yaml.j2; strings go in as JSON (valid YAML)."""
    # q: a quoted YAML scalar, whatever the text holds
    return artifacts.render_template(paths.k8s_template(kind), context, {"q": json.dumps})


def render_manifests(settings: Settings) -> None:
    """Render every file of k8s/, each parsed back as YAML before it counts as written."""
    import yaml

    needs_repository(settings)
    context = render_context(settings)
    for kind in RENDERED:
        text = render(kind, context)
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"templates/k8s/{kind}.yaml.j2 renders invalid YAML: {err}") from err
        artifacts.write_text(paths.k8s_manifest(kind), text)
    print(f"k8s: wrote {paths.K8S_DIR.name}/ for {context['repo']}: kubectl apply -k k8s/")


def task_k8s():
    """Kubernetes manifests in k8s/ for replicas serving repo=s3://... (kubectl apply -k k8s/)."""
    settings = current()
    targets = [paths.k8s_manifest(kind) for kind in RENDERED]
    return {
        "actions": [(fails_cleanly(render_manifests), [settings])],
        "file_dep": [
            *(paths.k8s_template(kind) for kind in RENDERED),
            paths.stage_module("k8s"),
            paths.DOCKERFILE,
            paths.runtime_file("supervisor", "supervisor.py"),
            paths.SERVER_REQUIREMENTS,
        ],
        "targets": targets,
        "uptodate": [config_changed(k8s_params(settings))],
        "clean": [(artifacts.remove_artifacts, [targets, [paths.K8S_DIR]])],
    }
