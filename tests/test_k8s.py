"""`doit k8s`: the manifests in k8s/ pass the Kubernetes schemas (kubernetes-validate, strict),
their probes and ports agree with the server, and no credential is in them."""

from __future__ import annotations

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from tasks import k8s, paths, settings
from tests.helpers.stages import settings_from

REPO = "s3://bucket/prefix"
SECRET_VALUES = ("AKIAEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


def rendered(**variables) -> dict[str, dict]:
    """Each file of k8s/ as `doit k8s` would write it, parsed: kind -> object."""
    context = k8s.render_context(settings_from(**{"repo": REPO, **variables}))
    return {kind: yaml.safe_load(k8s.render(kind, context)) for kind in k8s.RENDERED}


def container(manifests: dict) -> dict:
    (triton,) = manifests["deployment"]["spec"]["template"]["spec"]["containers"]
    return triton


@pytest.mark.parametrize(
    "variables", [{}, {"task": "causallm"}, {"repo": "s3://other-bucket/deep/prefix"}]
)
def test_every_manifest_passes_the_kubernetes_schemas_in_strict_mode(variables):
    manifests = rendered(**variables)
    for kind in k8s.MANIFESTS:
        version = kubernetes_validate.validate(manifests[kind], k8s.KUBERNETES_VERSION, strict=True)
        assert version == k8s.KUBERNETES_VERSION, kind


def test_strict_validation_refuses_a_field_kubernetes_does_not_know():
    manifests = rendered()
    container(manifests)["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(manifests["deployment"], k8s.KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_once():
    kustomization = rendered()["kustomization"]
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == [f"{kind}.yaml" for kind in k8s.MANIFESTS]


def test_probes_ask_the_health_routes_on_the_http_port_and_the_service_exposes_every_port():
    manifests = rendered(http_port="9000", grpc_port="9001", metrics_port="9002", openai_port="0")
    triton = container(manifests)
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 9000, "grpc": 9001, "metrics": 9002}
    service = manifests["service"]["spec"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]} == {
        name: (port, name) for name, port in ports.items()
    }
    assert service["selector"] == manifests["deployment"]["spec"]["selector"]["matchLabels"]
    # tritonserver listens where the probes and the Service look
    assert {"--http-port=9000", "--grpc-port=9001", "--metrics-port=9002"} <= set(triton["command"])


def test_the_pods_run_nvidias_triton_image_through_the_supervisor_on_the_bucket():
    manifests = rendered()
    triton = container(manifests)
    assert triton["image"] == k8s.server_image() == "nvcr.io/nvidia/tritonserver:24.10-py3"
    command = triton["command"]
    supervisor = f"{k8s.FILES_DIR}/supervisor.py"
    assert command[:2] == ["python3", supervisor]
    assert command[command.index("--") + 1] == "tritonserver"
    assert f"--model-repository={REPO}" in command
    # the supervisor comes from the ConfigMap the pod mounts, as it is in the project
    files = manifests["configmap"]["data"]
    assert files["supervisor.py"] == paths.runtime_file("supervisor", "supervisor.py").read_text()
    assert files["server.txt"] == paths.SERVER_REQUIREMENTS.read_text()
    mounts = {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}
    assert mounts["files"] == k8s.FILES_DIR
    volumes = {v["name"]: v for v in manifests["deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["files"]["configMap"]["name"] == manifests["configmap"]["metadata"]["name"]


def gpu_requests(manifests: dict) -> dict:
    resources = container(manifests)["resources"]
    return {
        part: amounts["nvidia.com/gpu"]
        for part, amounts in resources.items()
        if "nvidia.com/gpu" in amounts
    }


def test_the_gpu_is_requested_on_the_tensorrt_backend_only(monkeypatch):
    for backend in ("python", "onnxruntime"):
        assert gpu_requests(rendered(backend=backend)) == {}
    monkeypatch.setattr(settings, "tensorrt_available", lambda: True)
    assert gpu_requests(rendered(backend="tensorrt")) == {"requests": "1", "limits": "1"}
    assert gpu_requests(rendered(backend="tensorrt", gpus="0,1")) == {
        "requests": "2",
        "limits": "2",
    }
    resources = container(rendered())["resources"]
    assert resources["requests"]["cpu"] == "2"  # the model instance and the server
    assert container(rendered(instances="3"))["resources"]["requests"]["cpu"] == "4"


def test_credentials_come_from_the_secret_the_manifests_name_but_do_not_hold():
    manifests = rendered()
    env = {e["name"]: e for e in container(manifests)["env"]}
    secret = f"{k8s.object_name('encode')}-storage"
    referenced = {
        name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e
    }
    assert referenced == {
        "AWS_ACCESS_KEY_ID": {"name": secret, "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": secret, "key": "AWS_SECRET_ACCESS_KEY"},
        "AWS_ENDPOINT_URL": {"name": secret, "key": "AWS_ENDPOINT_URL", "optional": True},
        "AWS_DEFAULT_REGION": {"name": secret, "key": "AWS_DEFAULT_REGION", "optional": True},
    }
    assert not [m for m in manifests.values() if m.get("kind") == "Secret"]

    name = rendered(name="Big_Encoder")["deployment"]["metadata"]["name"]
    assert name == "triton-big-encoder"


@pytest.mark.parametrize(
    ("repo", "words"),
    [("http://host/bucket", "only S3 is supported"), ("s3://", "s3://BUCKET/PREFIX")],
)
def test_a_repository_that_is_not_s3_is_refused_at_the_door(project, repo, words):
    run = project.doit("k8s", f"repo={repo}", check=False)
    assert run.returncode == 3
    lines = run.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ERROR: repo={repo}") and words in lines[0]
    assert not project.path(paths.K8S_DIR).exists()


@pytest.mark.parametrize("repo", ["/tmp/models", "models/"])
def test_a_local_repository_is_refused_by_k8s_naming_the_fix(project, repo):
    run = project.doit("k8s", f"repo={repo}", check=False)
    assert run.returncode == 1 and "Traceback" not in run.output
    assert "doit k8s needs repo=: " in run.output and "doit publish uploads it" in run.output
    assert not project.path(paths.K8S_DIR).exists()


def test_doit_k8s_writes_k8s_once_and_clean_removes_it(project):
    missing = project.doit("k8s", check=False)
    assert missing.returncode == 1
    assert "doit k8s needs repo=: " in missing.output
    assert "e.g. doit k8s repo=s3://BUCKET/PREFIX" in missing.output
    assert "Traceback" not in missing.output

    first = project.doit("k8s", "repo=s3://bkt/p")
    assert first.executed == ["k8s"]
    k8s_dir = project.path(paths.K8S_DIR)
    assert sorted(p.name for p in k8s_dir.iterdir()) == sorted(
        f"{kind}.yaml" for kind in k8s.RENDERED
    )
    assert project.git("status", "--porcelain") == ""  # ignored by git
    assert project.doit("k8s", "repo=s3://bkt/p").executed == []  # up to date
    assert project.doit("k8s", "repo=s3://bkt/other").executed == ["k8s"]  # a new repository
    text = "".join(p.read_text() for p in k8s_dir.iterdir())
    assert "s3://bkt/other" in text and 's3://bkt/p"' not in text

    project.doit("clean")  # plain `doit clean` removes k8s/ too
    assert not k8s_dir.exists()


def test_no_credential_reaches_k8s(project):
    environment = dict(zip(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), SECRET_VALUES))
    project.doit("k8s", "repo=s3://bkt/p", environment=environment)
    for manifest in project.path(paths.K8S_DIR).iterdir():
        text = manifest.read_text()
        assert not [v for v in SECRET_VALUES if v in text], manifest.name
