"""`doit k8s`: the manifests in k8s/ pass the Kubernetes schemas (kubernetes-validate, strict),
their probes and ports agree with the server, and no credential is in them."""

from __future__ import annotations

import json

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


def container(manifests: dict, name: str = "triton") -> dict:
    containers = manifests["deployment"]["spec"]["template"]["spec"]["containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return found


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
    assert triton["image"] == k8s.server_image() == "nvcr.io/nvidia/tritonserver:26.05-py3"
    command = triton["command"]
    supervisor = f"{k8s.BIN_DIR}/supervisor.py"
    assert command[:2] == ["python3", supervisor]
    assert command[command.index("--") + 1] == "tritonserver"
    assert f"--model-repository={REPO}" in command
    # the supervisor's files come from the ConfigMap, as they are in the project
    files = manifests["configmap"]["data"]
    for name in ("supervisor.py", "access.py", "secret_args.c"):
        assert files[name] == paths.runtime_file("supervisor", name).read_text(), name
    assert files["server.txt"] == paths.SERVER_REQUIREMENTS.read_text()
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    assert volumes["files"]["configMap"]["name"] == manifests["configmap"]["metadata"]["name"]
    # an init container puts the supervisor and access.py in bin/, with secret_args.so
    # compiled beside them (where the supervisor looks: NVIDIA's image has no compiler)
    setup = {c["name"]: c for c in pod_spec(manifests)["initContainers"]}["supervisor"]
    assert setup["image"] == k8s.COMPILER_IMAGE
    script = setup["command"][2]
    assert f"cp {k8s.FILES_DIR}/supervisor.py {k8s.FILES_DIR}/access.py {k8s.BIN_DIR}/" in script
    assert f"-o {k8s.BIN_DIR}/secret_args.so {k8s.FILES_DIR}/secret_args.c" in script
    assert "gcc -shared -fPIC -O2" in script  # as access.py builds it
    assert "-shared" in (paths.TRITON_DIR / "supervisor" / "access.py").read_text()
    assert mounts(setup)[k8s.BIN_DIR]["name"] == mounts(triton)[k8s.BIN_DIR]["name"] == "bin"
    assert mounts(triton)[k8s.BIN_DIR]["readOnly"] is True
    assert volumes["bin"] == {"name": "bin", "emptyDir": {}}


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


def pod_spec(manifests: dict) -> dict:
    return manifests["deployment"]["spec"]["template"]["spec"]


def volume_of(manifests: dict, name: str) -> dict:
    (volume,) = [v for v in pod_spec(manifests)["volumes"] if v["name"] == name]
    return volume


def mounts(container_spec: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container_spec["volumeMounts"]}


def test_secrets_are_files_from_secrets_the_manifests_name_but_do_not_hold():
    manifests = rendered()
    triton, names = container(manifests), k8s.secret_names(k8s.object_name("encode"))
    # no secret in the environment: the S3 credentials are a file the AWS SDK reads
    assert not [e for e in triton["env"] if "valueFrom" in e]
    env = {e["name"]: e["value"] for e in triton["env"]}
    secrets_dir = k8s.SECRETS_DIR
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == f"{secrets_dir}/{k8s.AWS_CREDENTIALS_FILE}"
    assert env["AWS_CONFIG_FILE"] == f"{secrets_dir}/{k8s.AWS_CONFIG_FILE}"
    # the admin key and the API key: files the supervisor reads, named before its `--`
    command = triton["command"]
    options = command[: command.index("--")]
    assert options[options.index("--admin-key-file") + 1] == f"{secrets_dir}/admin-key"
    assert options[options.index("--api-key-file") + 1] == f"{secrets_dir}/api-key"
    # one read-only projected volume, owner and group read only; the API key is optional
    assert mounts(triton)[secrets_dir] == {
        "name": "secrets",
        "mountPath": secrets_dir,
        "readOnly": True,
    }
    projected = volume_of(manifests, "secrets")["projected"]
    assert projected["defaultMode"] == 0o440
    assert [source["secret"] for source in projected["sources"]] == [
        {"name": names["storage"]},
        {"name": names["admin"]},
        {"name": names["api_key"], "optional": True},
    ]
    assert not [m for m in manifests.values() if m.get("kind") == "Secret"]
    name = rendered(name="Big_Encoder")["deployment"]["metadata"]["name"]
    assert name == "triton-big-encoder"


def test_the_printed_commands_create_the_secrets_the_pods_read_with_no_value_in_them():
    context = k8s.render_context(settings_from(repo=REPO, namespace="team-a"))
    commands = context["secret_commands"]
    names = k8s.secret_names(k8s.object_name("encode"))
    for command, secret, key in zip(
        commands,
        names.values(),
        (k8s.AWS_CREDENTIALS_FILE, k8s.ADMIN_KEY_FILE, k8s.API_KEY_FILE),
    ):
        assert f"--namespace team-a create secret generic {secret} " in command
        assert f"--from-file={key}=" in command
    # the admin key is made on the spot and piped in: never an argument, never a file here
    assert "secrets.token_urlsafe(32)" in commands[1] and "=/dev/stdin" in commands[1]
    kustomization = k8s.render("kustomization", context)
    assert all(command in kustomization for command in commands)


def test_every_object_is_in_the_namespace_which_the_kustomization_creates_first():
    manifests = rendered(namespace="team-a")
    assert manifests["namespace"]["metadata"]["name"] == "team-a"
    labels = manifests["namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for kind in k8s.MANIFESTS[1:]:
        assert manifests[kind]["metadata"]["namespace"] == "team-a", kind
    assert k8s.MANIFESTS[0] == "namespace"
    assert rendered()["deployment"]["metadata"]["namespace"] == "llm-in-triton"
    with pytest.raises(settings.SettingsError, match="namespace=Team_A: a Kubernetes namespace"):
        settings_from(repo=REPO, namespace="Team_A")


def test_the_pods_run_as_the_images_non_root_user_with_nothing_to_escalate_or_write():
    manifests = rendered()
    spec = pod_spec(manifests)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # NVIDIA's triton-server, the user the Dockerfile's server stage runs as (uid 1000 in
    # NVIDIA's image) and the uid the exporter stage gives its own user
    dockerfile = paths.DOCKERFILE.read_text()
    assert "USER triton-server" in dockerfile and "useradd --uid 1000 --gid 1000" in dockerfile
    for each in (*spec["initContainers"], *spec["containers"]):  # the OpenAI API's too
        assert each["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }, each["name"]
        assert mounts(each)["/tmp"]["name"] == "tmp", each["name"]
        assert set(each["resources"]) == {"requests", "limits"}, each["name"]
    # what Triton writes: /tmp (the bucket's download, the stubs) and /dev/shm (python backend)
    assert mounts(container(manifests))["/dev/shm"]["name"] == "shm"
    assert volume_of(manifests, "shm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert "sizeLimit" in volume_of(manifests, "tmp")["emptyDir"]
    env = {e["name"]: e["value"] for e in container(manifests)["env"]}
    assert env["TRITON_AWS_MOUNT_DIRECTORY"] == "/tmp"


def test_the_network_policy_admits_the_served_ports_of_the_triton_pods_only():
    manifests = rendered(http_port="9000", grpc_port="9001", metrics_port="9002", openai_port="0")
    policy = manifests["networkpolicy"]["spec"]
    assert policy["podSelector"] == manifests["deployment"]["spec"]["selector"]
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule == {"ports": [{"port": p, "protocol": "TCP"} for p in (9000, 9001, 9002)]}


def test_the_openai_api_runs_beside_triton_with_its_port_probe_and_service_port():
    manifests = rendered(grpc_port="9001", openai_port="9100", max_body_mb="8")
    api = container(manifests, "openai")
    assert api["image"] == container(manifests)["image"]  # NVIDIA's, on server.txt's packages
    assert {e["name"]: e["value"] for e in api["env"]} == {"PYTHONPATH": k8s.SITE_PACKAGES}
    command = api["command"]
    assert command[:2] == ["python3", f"{k8s.API_DIR}/openai_api/server.py"]
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags == {
        "--triton": "127.0.0.1:9001",  # Triton's gRPC in the pod
        "--repository": k8s.API_REPOSITORY,
        "--host": "0.0.0.0",
        "--port": "9100",
        "--max-body-mb": "8",
        "--api-key-file": f"{k8s.SECRETS_DIR}/{k8s.API_KEY_FILE}",  # optional, as Triton's
    }
    assert api["ports"] == [{"name": "openai", "containerPort": 9100}]
    assert api["readinessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}
    assert api["livenessProbe"]["tcpSocket"] == {"port": "openai"}
    service = {p["name"]: p for p in manifests["service"]["spec"]["ports"]}
    assert service["openai"] == {
        "name": "openai",
        "port": 9100,
        "targetPort": "openai",
        "protocol": "TCP",
        "appProtocol": "http",
    }
    (rule,) = manifests["networkpolicy"]["spec"]["ingress"]
    assert {"port": 9100, "protocol": "TCP"} in rule["ports"]
    assert set(api["resources"]) == {"requests", "limits"}
    # its package comes from the ConfigMap, laid out as in the project
    files = manifests["configmap"]["data"]
    items = {i["path"]: i["key"] for i in volume_of(manifests, "api")["configMap"]["items"]}
    for module in paths.runtime_modules("openai_api"):
        assert files[items[f"openai_api/{module.name}"]] == module.read_text(), module.name
    assert items["supervisor/access.py"] == "access.py"  # server.py reads ../supervisor/
    mounted = mounts(api)
    assert mounted[k8s.API_DIR]["name"] == "api" and mounted[k8s.API_DIR]["readOnly"]
    assert mounted[k8s.API_REPOSITORY]["readOnly"] and mounted[k8s.SITE_PACKAGES]["readOnly"]
    # what it reads of the repository is copied from the bucket first, with the build's boto3
    setup = {c["name"]: c for c in pod_spec(manifests)["initContainers"]}["api-repository"]
    script = setup["command"][2]
    assert "boto3==" in script and k8s.pinned("boto3") in paths.BUILD_REQUIREMENTS.read_text()
    assert f"openai_api/bucket.py {REPO} {k8s.API_REPOSITORY}" in script
    assert mounts(setup)[k8s.API_REPOSITORY]["name"] == "api-repository"
    env = {e["name"]: e["value"] for e in setup["env"]}
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == f"{k8s.SECRETS_DIR}/{k8s.AWS_CREDENTIALS_FILE}"


@pytest.mark.parametrize(
    "repo, expected",
    [
        ("s3://bucket/prefix", (None, "bucket", "prefix")),
        ("s3://bucket", (None, "bucket", "")),
        ("s3://bkt/deep/prefix/", (None, "bkt", "deep/prefix")),
        ("s3://minio:9000/bkt/p", ("http://minio:9000", "bkt", "p")),
        ("s3://https://s3.example.com:443/bkt/p", ("https://s3.example.com:443", "bkt", "p")),
    ],
)
def test_the_apis_copy_reads_the_repository_as_triton_names_it(repo, expected):
    from tasks import artifacts

    bucket = artifacts.load_runtime("openai_api", "bucket.py")
    assert bucket.location(repo) == expected


def test_openai_port_0_renders_no_api():
    manifests = rendered(openai_port="0")
    containers = pod_spec(manifests)["containers"]
    assert [c["name"] for c in containers] == ["triton"]
    assert "api-repository" not in {c["name"] for c in pod_spec(manifests)["initContainers"]}
    assert "openai" not in {p["name"] for p in manifests["service"]["spec"]["ports"]}
    assert not [key for key in manifests["configmap"]["data"] if key.startswith("openai_api.")]


def resources(**variables) -> dict:
    return container(rendered(**variables))["resources"]


def test_cpu_and_memory_are_sized_from_instances_and_the_weights_in_models(monkeypatch, tmp_path):
    # models/ without this deployment (whatever the developer's own models/ holds): a stated
    # guess for memory; cpu from the instances
    monkeypatch.setattr(paths, "MODELS", tmp_path)
    assert resources() == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }
    assert resources(instances="3")["requests"]["cpu"] == "4"
    # the deployment's model files in models/: 300 MiB of weights
    for model in settings_from(repo=REPO).triton_models.values():
        paths.repo_version_dir(model).mkdir(parents=True)
    paths.repo_version_file("encode_model", "model.onnx").write_bytes(b"\0" * 300 * 2**20)
    # 1 GiB for the server, and two copies of the weights per instance; limit twice that
    # plus /dev/shm (a Memory emptyDir counts in it)
    assert resources()["requests"]["memory"] == "1792Mi"  # 1024 + 2 x 300, rounded to 256
    assert resources()["limits"]["memory"] == "4608Mi"  # 2 x 1792 + 1024
    assert resources(instances="2")["requests"]["memory"] == "2304Mi"  # 1024 + 4 x 300
    tmp = volume_of(rendered(), "tmp")["emptyDir"]["sizeLimit"]
    assert tmp == "1792Mi"  # two versions of the weights during an update, and 1 GiB
    # cpu= and memory= say otherwise
    assert resources(cpu="500m,1.5", memory="3Gi,6000") == {
        "requests": {"cpu": "500m", "memory": "3Gi"},
        "limits": {"cpu": "1500m", "memory": "6000Mi"},
    }
    for variable, value, words in [
        ("cpu", "4,2", "REQUEST must be above 0 and at most LIMIT"),
        ("memory", "4GB,8GB", "expected REQUEST,LIMIT, e.g. memory=4Gi,8Gi"),
    ]:
        with pytest.raises(settings.SettingsError, match=f"{variable}={value}: {words}"):
            settings_from(repo=REPO, **{variable: value})


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
    # it says which Secrets to create first, and how, with no value in the commands
    for command in k8s.render_context(settings_from(repo="s3://bkt/p"))["secret_commands"]:
        assert command in first.output
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


def test_a_generation_pod_also_holds_each_loops_kv_cache_at_the_profiles_maxima(
    monkeypatch, tmp_path
):
    """Per instance, `<name>_generate` and `<name>_stream` each run a loop whose step holds
    the batch's cache in and out at batch MAX and the longest cache (seq MAX + MAX_NEW_TOKENS
    - 2 = 254 here); decoder=slots holds its buffers once, 256 positions long."""
    monkeypatch.setattr(paths, "MODELS", tmp_path / "models")
    monkeypatch.setattr(paths, "MODEL_ZOO", tmp_path / "model_zoo")
    shapes = {"task": "causallm", "name": "gen", "batch": "1,4,16", "seq": "1,64,128"}
    for model in settings_from(repo=REPO, **shapes).triton_models.values():
        paths.repo_version_dir(model).mkdir(parents=True)
    paths.repo_version_file("gen_generate", "model.onnx").write_bytes(b"\0" * 100 * 2**20)
    # no export in model_zoo/: the weights alone, 1024 + 2 x 100 rounded up to 256
    assert resources(**shapes)["requests"]["memory"] == "1280Mi"
    layers, kv_heads, head, vocab = 4, 8, 128, 1000
    cache = ["batch_size", kv_heads, "past_sequence_length", head]
    grown = ["batch_size", kv_heads, "past_sequence_length + 1", head]
    io = {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
            {
                "name": "attention_mask",
                "dtype": "int64",
                "shape": ["batch_size", "past_sequence_length + sequence_length"],
            },
            {"name": "position_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
            *(
                {"name": f"past_key_values.{i}.{kind}", "dtype": "float32", "shape": cache}
                for i in range(layers)
                for kind in ("key", "value")
            ),
        ],
        "outputs": [
            {
                "name": "logits",
                "dtype": "float32",
                "shape": ["batch_size", "sequence_length", vocab],
            },
            *(
                {"name": f"present.{i}.{kind}", "dtype": "float32", "shape": grown}
                for i in range(layers)
                for kind in ("key", "value")
            ),
        ],
    }
    paths.onnx_io("gen", "decoder_with_past_model").parent.mkdir(parents=True)
    paths.onnx_io("gen", "decoder_with_past_model").write_text(json.dumps(io))
    paths.source_dir("gen").mkdir(parents=True)
    paths.source_file("gen", "config.json").write_text('{"max_position_embeddings": 4096}')
    per_position = 16 * kv_heads * head * 4 * 2 * layers  # a cache position of every row
    step = 254 * per_position + 255 * per_position + 16 * (8 + 255 * 8 + 8) + 16 * vocab * 4
    assert round(2 * step / 2**20, 1) == 509.2
    # 1024 + 2 x 100 (weights) + 509.2 (two loops' steps) = 1733.2, rounded up to 256
    assert resources(**shapes)["requests"]["memory"] == "1792Mi"
    assert resources(**shapes, instances="2")["requests"]["memory"] == "2560Mi"  # 2442.4
    # decoder=slots: 256 positions of every row once per loop, 2 x 128 MiB
    assert 2 * 256 * per_position == 256 * 2**20
    assert resources(**shapes, decoder="slots")["requests"]["memory"] == "1536Mi"  # 1480
    # TensorRT: the cache stays on the GPU (the plan stage's reservation counts it)
    monkeypatch.setattr(settings, "tensorrt_available", lambda: True)
    for model in settings_from(repo=REPO, **shapes, backend="tensorrt").triton_models.values():
        paths.repo_version_dir(model).mkdir(parents=True, exist_ok=True)
    assert resources(**shapes, backend="tensorrt")["requests"]["memory"] == "1280Mi"
    # an export whose dims the profiles do not know: its caches uncounted, not a failed load
    io["inputs"][3]["shape"][2] = "past_len"
    paths.onnx_io("gen", "decoder_with_past_model").write_text(json.dumps(io))
    assert resources(**shapes)["requests"]["memory"] == "1280Mi"
