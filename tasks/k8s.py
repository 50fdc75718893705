"""Stage `k8s`: Kubernetes manifests for Triton replicas that read the model repository from
object storage, rendered into k8s/ (generated, ignored by git; `kubectl apply -k k8s/`).

    doit k8s repo=s3://BUCKET/PREFIX

The pods run NVIDIA's Triton image (the Dockerfile's server stage builds on it) through our
supervisor (triton/supervisor/supervisor.py), as docker-compose does: explicit model control,
strict readiness, and a model whose python stub died reloaded, so that the readiness probe
says not-ready while a model cannot answer. The supervisor and requirements/server.txt reach
the pods in a ConfigMap; an init container installs what the python-backend models import.

Locked down (docs/security.md): every object in one namespace (`namespace=`, restricted Pod
Security Standard), the pods as the image's non-root user with a read-only root filesystem,
no capabilities, seccomp RuntimeDefault, no service-account token, CPU and memory bounded,
a NetworkPolicy admitting the served ports only. Secrets are files: the S3 credentials, the
admin key of Triton's restricted APIs and the optional client API key come from Kubernetes
Secrets the manifests name but never hold; `doit k8s` prints the commands that create them
(values never pass through doit).

With `openai_port` (not 0) each pod also runs the OpenAI-compatible API (triton/openai_api/,
from the ConfigMap, on the packages server.txt pins) beside Triton, on the same hardening, with
a readiness probe on its /health; an init container copies what it reads of the repository
(configs, tokenizers, chat templates) from the bucket first (triton/openai_api/bucket.py).

Templates are strict Jinja (StrictUndefined), like the pbtxt stage's. The manifests are stale
when the settings they render from change (a digest of them in config_changed) or when a file
they read does (file_dep: templates, this module, the Dockerfile, the supervisor, server.txt).
"""

from __future__ import annotations

import hashlib
import json
import math
import re

from doit.tools import config_changed

from tasks import artifacts, paths, profiles
from tasks.errors import BuildError, ConfigError, SettingsError, fails_cleanly
from tasks.facts import max_positions
from tasks.settings import Settings, current

# The Kubernetes objects `kubectl apply -k k8s/` creates, in the kustomization's order.
MANIFESTS = ("namespace", "configmap", "deployment", "service", "networkpolicy", "hpa", "pdb")
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

# What a pod asks for, unless cpu= and memory= say (tasks/variables.py tells how): a core per
# instance of the model step and one for the server; memory from the weights in models/ and,
# for generation, the KV cache of each loop at the profile's maxima (profiles.loop_bytes).
SERVER_MIB = 1024  # tritonserver, the python stubs, tokenizers: what an empty pod holds
WEIGHT_COPIES = 2  # per instance: ONNX Runtime's copy of the weights and its arenas
LOOP_PARTS = ("generate", "stream")  # the generation models that each run a loop per instance
UNKNOWN_MEMORY_MIB = (4096, 8192)  # models/ does not hold the deployment: a guess, say so
MEMORY_STEP_MIB = 256  # amounts rounded up to this
# /dev/shm, a Memory emptyDir (counted in the memory limit): the python backend's tensors in
# flight, in regions that grow 1 MiB at a time per stub (docker-compose: shm_size 1g). A
# batch of 32 x 512 MiniLM embeddings is 25 MiB, a step of GPT-2's logits for 32 is 6 MiB.
SHM_MIB = 1024
# /tmp, a disk emptyDir: Triton downloads the repository from the bucket here
# (TRITON_AWS_MOUNT_DIRECTORY), with room for a second version during a rolling update.
TMP_HEADROOM_MIB = 1024
UNKNOWN_TMP_MIB = 8192  # models/ does not hold the deployment

# The image's own non-root user: NVIDIA's `triton-server` (the Dockerfile's server stage
# runs as it too). fsGroup makes the mounted Secrets readable by its group.
RUN_AS_USER = RUN_AS_GROUP = 1000
# The Secrets, as files in one read-only projected volume: Kubernetes Secret -> the file
# names its keys become. The API key is optional (no key: inference stays open to whoever
# the NetworkPolicy admits); the AWS config file (region) too.
SECRETS_DIR = "/var/run/secrets/llm-in-triton"
SECRET_FILES_MODE = 0o440  # owner and group (fsGroup) read; nobody writes
ADMIN_KEY_FILE = "admin-key"
API_KEY_FILE = "api-key"
AWS_CREDENTIALS_FILE = "aws-credentials"  # INI: [default] aws_access_key_id=... (AWS SDKs)
AWS_CONFIG_FILE = "aws-config"  # INI: [default] region=...; optional
# Slow model loads (a download from the bucket, TensorRT engines): the startup probe allows
# this long before liveness takes over.
STARTUP_SECONDS = 600
PROBE_PERIOD = 10
SITE_PACKAGES = "/opt/llm-in-triton/site"  # the init container installs server.txt here
FILES_DIR = "/opt/llm-in-triton/files"  # the ConfigMap: the supervisor's files, server.txt
# The supervisor runs from here, with access.py and secret_args.so beside it, where it looks
# for them: an init container copies them in and compiles the library (NVIDIA's image has no
# compiler), with the flags access.py uses.
BIN_DIR = "/opt/llm-in-triton/bin"
COMPILER_IMAGE = "docker.io/library/gcc:14"  # Debian 12's glibc 2.36: runs on 24.04's 2.39
SUPERVISOR_FILES = ("supervisor.py", "access.py", "secret_args.c")
# The OpenAI API's container (openai_port): its package from the ConfigMap, laid out as in the
# project (server.py reads ../supervisor/access.py), and the repository files it reads, copied
# from the bucket by an init container with boto3 at the build's pin.
API_DIR = "/opt/llm-in-triton/api"
API_REPOSITORY = "/opt/llm-in-triton/repository"
API_FILE_PREFIX = "openai_api."  # ConfigMap keys (no '/' in a key)
API_CPU = (0.5, 1)  # request, limit: asyncio, one process (what one API needs at full load)
API_MEMORY_MIB = (512, 1024)  # the deployments' tokenizers, and answers in flight
API_REPOSITORY_MIB = 256  # its emptyDir: configs and tokenizers (a large one is 10-20 MiB)


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


def weights_mib(settings: Settings) -> int | None:
    """MiB on disk of the deployment's models in models/ (what the pods download and load),
    or None when models/ does not hold it (built elsewhere)."""
    dirs = [paths.repo_model_dir(model) for model in settings.triton_models.values()]
    if not all(d.is_dir() for d in dirs):
        return None
    size = sum(f.stat().st_size for d in dirs for f in d.rglob("*") if f.is_file())
    return math.ceil(size / 2**20)


def loops_mib(settings: Settings) -> float | None:
    """MiB the deployment's generation loops hold at most in one instance of each (their KV
    caches at the profile's maxima: profiles.loop_bytes), 0 for an encoder task and on
    TensorRT (the cache stays on the GPU, which the plan stage's reservation counts), or None
    when model_zoo/ does not hold its export (built elsewhere) or its dims are unknown."""
    if not settings.task.generation or settings.backend == "tensorrt":
        return 0
    io_file = paths.onnx_io(settings.name, "decoder_with_past_model")
    if not io_file.is_file():
        return None
    io, positions = artifacts.read_json(io_file), max_positions(settings.name)
    loops = sum(part in settings.triton_models for part in LOOP_PARTS)
    try:
        return loops * profiles.loop_bytes(settings, io, positions) / 2**20
    except BuildError:  # a dim the profiles do not know: the plan stage names it, not here
        return None


def _round_up(mib: float) -> int:
    return math.ceil(mib / MEMORY_STEP_MIB) * MEMORY_STEP_MIB


def pod_resources(settings: Settings) -> dict:
    """CPU cores, memory MiB (request, limit) and the /tmp emptyDir's MiB of a Triton pod:
    cpu= and memory= when given, else sized from `instances`, the weights in models/ and the
    generation loops' caches (`weights` None: models/ does not hold the deployment; `loops`
    None: model_zoo/ does not hold its export, so the caches go uncounted)."""
    instances, weights = settings.serving.instances, weights_mib(settings)
    cpu = settings.kubernetes.cpu or (instances + 1, 2 * (instances + 1))
    memory, loops = settings.kubernetes.memory, loops_mib(settings)
    if memory is None and weights is None:
        memory = UNKNOWN_MEMORY_MIB
    elif memory is None:
        request = _round_up(SERVER_MIB + (WEIGHT_COPIES * weights + (loops or 0)) * instances)
        memory = (request, 2 * request + SHM_MIB)
    tmp = _round_up(2 * weights + TMP_HEADROOM_MIB) if weights is not None else UNKNOWN_TMP_MIB
    return {
        "cpu": list(cpu),
        "memory": list(memory),
        "tmp": tmp,
        "weights": weights,
        "loops": loops,
    }


def cores(amount: float) -> str:
    """A CPU quantity as Kubernetes writes it: 2, or 500m."""
    return str(int(amount)) if amount == int(amount) else f"{round(amount * 1000)}m"


def mebibytes(amount: int) -> str:
    """A memory quantity as Kubernetes writes it: 4Gi, or 1536Mi."""
    return f"{amount // 1024}Gi" if amount % 1024 == 0 else f"{amount}Mi"


def secret_names(name: str) -> dict[str, str]:
    """The Secrets the pods read, by what they hold (created by hand: secret_commands)."""
    return {"storage": f"{name}-storage", "admin": f"{name}-admin", "api_key": f"{name}-api-key"}


def pinned(package: str) -> str:
    """`package==VERSION` as requirements/build.txt pins it (one pin for the build and pods)."""
    text = paths.BUILD_REQUIREMENTS.read_text()
    found = re.search(rf"^{re.escape(package)}==([\w.]+)", text, re.M)
    if found is None:
        raise ConfigError(f"requirements/build.txt pins no {package}==VERSION; k8s/ needs it")
    return f"{package}=={found.group(1)}"


def api_files() -> dict[str, str]:
    """The OpenAI API's modules as ConfigMap keys -> their text."""
    return {
        f"{API_FILE_PREFIX}{path.name}": path.read_text()
        for path in paths.runtime_modules("openai_api")
    }


def openai_params(settings: Settings) -> dict | None:
    """What the API's container renders from (None: openai_port=0, no API)."""
    endpoints = settings.endpoints
    if not endpoints.openai_port:
        return None
    return {
        "dir": API_DIR,
        "repository": API_REPOSITORY,
        "max_body_mb": endpoints.max_body_mb,
        "cpu": list(API_CPU),
        "memory": list(API_MEMORY_MIB),
        "repository_mib": API_REPOSITORY_MIB,
        "setup": api_repository_setup(settings.storage.repo),
    }


def api_repository_setup(repo: str) -> str:
    """The API's init container's shell command: boto3 (the build's pin) into /tmp, then the
    files the API reads copied from the bucket into API_REPOSITORY."""
    import shlex

    boto3, fetch = "/tmp/boto3", f"{API_DIR}/openai_api/bucket.py"
    return (
        f"pip install --no-cache-dir --disable-pip-version-check --quiet --target {boto3} "
        f"{pinned('boto3')} && PYTHONPATH={boto3} python3 {fetch} {shlex.quote(repo)} "
        f"{API_REPOSITORY}"
    )


def k8s_params(settings: Settings) -> dict:
    """Everything the manifests render from that the settings decide (JSON-safe): what
    config_changed sees. The files they read are the task's file_dep."""
    endpoints, repo = settings.endpoints, settings.storage.repo
    name = object_name(settings.name)
    gpus = (len(settings.serving.gpus) or 1) if settings.backend == "tensorrt" else 0
    return {
        "name": name,
        "namespace": settings.kubernetes.namespace,
        "deployment": settings.name,
        "backend": settings.backend,
        "repo": repo,
        "secrets": secret_names(name),
        "secrets_dir": SECRETS_DIR,
        "secret_files_mode": SECRET_FILES_MODE,
        "files_of_secrets": {
            "admin_key": ADMIN_KEY_FILE,
            "api_key": API_KEY_FILE,
            "aws_credentials": AWS_CREDENTIALS_FILE,
            "aws_config": AWS_CONFIG_FILE,
        },
        "run_as": [RUN_AS_USER, RUN_AS_GROUP],
        "ports": {
            "http": endpoints.http_port,
            "grpc": endpoints.grpc_port,
            "metrics": endpoints.metrics_port,
            **({"openai": endpoints.openai_port} if endpoints.openai_port else {}),
        },
        "openai": openai_params(settings),
        "resources": pod_resources(settings),
        "gpus": gpus,  # nvidia.com/gpu: TensorRT engines only
        "shm_mib": SHM_MIB,
        "startup_failures": STARTUP_SECONDS // PROBE_PERIOD,
        "probe_period": PROBE_PERIOD,
        "replicas": [MIN_REPLICAS, MAX_REPLICAS],
        "min_available": MIN_AVAILABLE,
        "metric": QUEUE_METRIC,
        "queue_target_us": QUEUE_TARGET_US,
        "metric_window": METRIC_WINDOW,
        "site_packages": SITE_PACKAGES,
        "files_dir": FILES_DIR,
        "bin_dir": BIN_DIR,
        "compiler_image": COMPILER_IMAGE,
        "manifests": [paths.k8s_manifest(kind).name for kind in MANIFESTS],
    }


def render_context(settings: Settings) -> dict:
    """The params, and what the manifests read from files: the image, the ConfigMap's files
    and their digest (a pod annotation, so a changed supervisor rolls the pods)."""
    files = {name: paths.runtime_file("supervisor", name).read_text() for name in SUPERVISOR_FILES}
    files["server.txt"] = paths.SERVER_REQUIREMENTS.read_text()
    if settings.endpoints.openai_port:
        files.update(api_files())
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    params = k8s_params(settings)
    return {
        **params,
        "image": server_image(),
        "files": files,
        "files_digest": digest,
        "secret_commands": secret_commands(params),
        "supervisor_setup": supervisor_setup(),
        "api_files": sorted(api_files()),
        "api_file_prefix": API_FILE_PREFIX,
    }


def supervisor_setup() -> str:
    """The init container's shell command: the supervisor and access.py into BIN_DIR, and
    secret_args.so compiled beside them."""
    copied = " ".join(f"{FILES_DIR}/{name}" for name in SUPERVISOR_FILES[:2])
    return (
        f"cp {copied} {BIN_DIR}/ && gcc -shared -fPIC -O2 -o {BIN_DIR}/secret_args.so "
        f"{FILES_DIR}/secret_args.c"
    )


def secret_commands(params: dict) -> list[str]:
    """The commands that create the Secrets the pods read: values come from the user's own
    files or are made on the spot, and never pass through doit, its state or k8s/."""
    namespace, secrets, files = params["namespace"], params["secrets"], params["files_of_secrets"]
    create = f"kubectl --namespace {namespace} create secret generic"
    token = "python3 -c 'import secrets; print(secrets.token_urlsafe(32), end=\"\")'"
    return [
        f"{create} {secrets['storage']} --from-file={files['aws_credentials']}=CREDENTIALS_FILE"
        f" [--from-file={files['aws_config']}=CONFIG_FILE]",
        f"{token} | {create} {secrets['admin']} --from-file={files['admin_key']}=/dev/stdin",
        f"{create} {secrets['api_key']} --from-file={files['api_key']}=API_KEY_FILE"
        "  # optional: clients must then send this key",
    ]


def _quantity_filters() -> dict:
    return {
        "q": json.dumps,  # a quoted YAML scalar, whatever the text holds
        "cores": lambda amount: json.dumps(cores(amount)),
        "mib": lambda amount: json.dumps(mebibytes(amount)),
    }


def render(kind: str, context: dict) -> str:
    """One manifest from templates/k8s/<kind>.yaml.j2; strings go in as JSON (valid YAML)."""
    return artifacts.render_template(paths.k8s_template(kind), context, _quantity_filters())


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
    resources = context["resources"]
    if resources["weights"] is None and settings.kubernetes.memory is None:
        print(
            f"k8s: models/ does not hold {settings.name}, so each pod asks for "
            f"{mebibytes(resources['memory'][0])} of memory, at most "
            f"{mebibytes(resources['memory'][1])}: a guess; build it here first, or pass "
            "memory=REQUEST,LIMIT"
        )
    elif resources["loops"] is None and settings.kubernetes.memory is None:
        print(
            f"k8s: model_zoo/ does not hold {settings.name}'s export, so the memory each pod "
            "asks for counts its weights but not its generation loops' KV caches; build it "
            "here first, or pass memory=REQUEST,LIMIT"
        )
    print(f"k8s: wrote {paths.K8S_DIR.name}/ for {context['repo']}. Create the Secrets first")
    print("(the values come from your files, never through doit):")
    for command in context["secret_commands"]:
        print(f"    {command}")
    print("then: kubectl apply -k k8s/")


def task_k8s():
    """Kubernetes manifests in k8s/ for replicas serving repo=s3://... (kubectl apply -k k8s/)."""
    settings = current()
    targets = [paths.k8s_manifest(kind) for kind in RENDERED]
    return {
        "actions": [(fails_cleanly(render_manifests), [settings])],
        "file_dep": [
            *(paths.k8s_template(kind) for kind in RENDERED),
            paths.stage_module("k8s"),
            paths.stage_module("profiles"),
            paths.stage_module("facts"),
            paths.DOCKERFILE,
            *(paths.runtime_file("supervisor", name) for name in SUPERVISOR_FILES),
            *paths.runtime_modules("openai_api"),
            paths.SERVER_REQUIREMENTS,
            paths.BUILD_REQUIREMENTS,
        ],
        "targets": targets,
        "uptodate": [config_changed(k8s_params(settings))],
        "clean": [(artifacts.remove_artifacts, [targets, [paths.K8S_DIR]])],
    }
