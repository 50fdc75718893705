"""The Docker files for GPU hosts, checked as far as a machine without a Docker engine allows."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tasks import paths
from tasks.server import DockerTritonServer
from tasks.settings import Endpoints

needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose (Debian package) is not installed",
)


def volumes(service: dict) -> dict[str, str]:
    """source -> target, from either of docker-compose's spellings."""
    found = {}
    for volume in service["volumes"]:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        found[source] = target
    return found


def compose_config(**env: str) -> dict:
    import yaml

    out = subprocess.run(
        ["docker-compose", "-f", str(paths.COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=paths.ROOT,
    )
    return yaml.safe_load(out.stdout)


@needs_compose
def test_the_triton_service_serves_the_repository_the_build_writes():
    triton = compose_config()["services"]["triton"]
    assert volumes(triton)[str(paths.MODELS)] == "/models"
    # started by the supervisor the server image carries, which reloads a dead stub's model
    supervisor = "/opt/llm-in-triton/supervisor.py"
    command = triton["command"]
    assert command[:2] == ["python3", supervisor]
    assert command[command.index("--") + 1] == "tritonserver"
    dockerfile = (paths.ROOT / "Dockerfile").read_text()
    assert f"COPY triton/supervisor/supervisor.py {supervisor}" in dockerfile
    assert "--model-repository=/models" in triton["command"]
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@needs_compose
def test_the_exporter_writes_into_the_same_folders():
    exporter = compose_config()["services"]["exporter"]
    workdir = re.search(r"^WORKDIR (\S+)$", (paths.ROOT / "Dockerfile").read_text(), re.M)[1]
    mounts = volumes(exporter)
    assert mounts[str(paths.MODELS)] == f"{workdir}/models"
    assert mounts[str(paths.MODEL_ZOO)] == f"{workdir}/model_zoo"
    # doit's state lives on that volume, so `compose run --rm` does not rebuild everything
    assert paths.MODEL_ZOO in paths.DEP_FILE.parents


@needs_compose
def test_serve_ports_reach_the_published_ports():
    server = DockerTritonServer(Endpoints(http_port=18000, grpc_port=18001, metrics_port=18002))
    env = {
        k: v
        for k, v in server.environment().items()
        if k in ("TRITON_HOST", "HTTP_PORT", "GRPC_PORT", "METRICS_PORT")
    }
    ports = compose_config(**env)["services"]["triton"]["ports"]
    published = {
        p if isinstance(p, str) else f"{p['host_ip']}:{p['published']}:{p['target']}/tcp"
        for p in ports
    }
    assert published == {
        "127.0.0.1:18000:8000/tcp",
        "127.0.0.1:18001:8001/tcp",
        "127.0.0.1:18002:8002/tcp",
    }


def test_serve_with_docker_fails_at_the_door_without_an_engine(project):
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        pytest.skip("a Docker engine answers here")
    run = project.doit("serve", "server=docker", check=False, timeout=60)
    assert run.returncode == 3
    assert run.output.startswith("ERROR: server=docker: "), run.output
    assert "or use server=embedded" in run.output
    assert run.executed == []


# --- the images' Python packages ---------------------------------------------------------

GLIBC = (2, 39)  # Ubuntu 24.04, the base of both NGC 26.05 images
NETWORK_ERRORS = (
    "NewConnectionError",
    "Max retries",
    "Could not fetch URL",
    "unreachable",
    "Temporary failure in name resolution",
    "timed out",
)


@dataclass
class Stage:
    name: str
    python: str
    requirement_files: list[Path]
    pins: list[str]
    sdist_files: list[Path] = field(default_factory=list)  # built from source, on purpose
    user: str = "root"  # the last USER (the base image's own is root unless it says)
    healthcheck: str = ""  # the HEALTHCHECK's words after the instruction, joined


def dockerfile_stages() -> dict[str, Stage]:
    """Each stage's stated Python and what its `pip install` lines install (files resolved
    through the stage's COPY lines back to the project's own files)."""
    stages, stage, workdir, copies = {}, None, Path("/"), {}
    text = re.sub(r"\\\n", " ", (paths.ROOT / "Dockerfile").read_text())  # continued lines
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            stage = Stage(words[-1], "", [], [])
            stages[stage.name], workdir, copies = stage, Path("/"), {}
        elif words[0] == "ARG" and words[1].startswith("PYTHON_VERSION="):
            stage.python = words[1].split("=", 1)[1]
        elif words[0] == "USER":
            stage.user = words[1]
        elif words[0] == "HEALTHCHECK":
            stage.healthcheck = " ".join(words[1:])
        elif words[0] == "WORKDIR":
            workdir = workdir / words[1]
        elif words[0] == "COPY":
            copies[workdir / words[2]] = paths.ROOT / words[1]
        elif words[:3] == ["RUN", "pip", "install"] and "--no-binary=:all:" in words:
            stage.sdist_files += [_copied(workdir / w, copies) for w in words if w.endswith(".txt")]
        elif words[:3] == ["RUN", "pip", "install"]:
            args = iter(words[3:])
            for arg in args:
                if arg == "-r":
                    stage.requirement_files.append(_copied(workdir / next(args), copies))
                elif not arg.startswith("-"):
                    stage.pins.append(arg)
    return stages


def _copied(inside: Path, copies: dict[Path, Path]) -> Path:
    for dest, source in copies.items():
        if inside == dest or dest in inside.parents:
            return source / inside.relative_to(dest) if source.is_dir() else source
    raise AssertionError(f"{inside} is installed but no COPY puts it in the image")


def normalized(name: str) -> str:
    """A name as PyPI compares them (PEP 503): onnx_graphsurgeon is onnx-graphsurgeon."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(requirement_file: Path) -> dict[str, str]:
    """name -> version of every pin in a requirements file and the files it includes."""
    pins = {}
    for line in requirement_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            pins |= pinned(requirement_file.parent / line[3:].strip())
        elif line:
            name, version = line.split("==")
            pins[normalized(re.sub(r"\[.*\]", "", name))] = version
    return pins


IMAGES = ("server", "exporter")  # the stages docker-compose.yml runs; the others build parts


def test_every_stage_states_its_python_and_installs_project_files():
    stages = dockerfile_stages()
    assert set(stages) == {*IMAGES, "secret-args"}
    for stage in (stages[name] for name in IMAGES):
        assert re.fullmatch(r"3\.\d+", stage.python), stage
        assert stage.requirement_files, stage
        assert all(f.is_file() for f in stage.requirement_files), stage


@pytest.mark.parametrize(
    "stage_name",
    ["server", pytest.param("exporter", marks=pytest.mark.slow)],  # 41 s
)
def test_pip_resolves_each_stage_for_its_python_and_platform_from_wheels(tmp_path, stage_name):
    """pip's own resolver, for the stage's Python and glibc, wheels only (no build from source)."""
    stage = dockerfile_stages()[stage_name]
    platforms = [f"manylinux_{GLIBC[0]}_{minor}_x86_64" for minor in range(17, GLIBC[1] + 1)]
    platforms += ["manylinux2014_x86_64"]  # pip does not widen a manylinux_2_35 tag itself
    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
        "--only-binary=:all:", "--python-version", stage.python, "--target", str(tmp_path / "t"),
        *(arg for p in platforms for arg in ("--platform", p)),
        "--report", str(report),
        *(arg for f in stage.requirement_files for arg in ("-r", str(f))), *stage.pins,
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and any(e in run.stderr for e in NETWORK_ERRORS):
        pytest.skip(f"the package registry cannot be reached: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    resolved = {
        normalized(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    for requirement_file in stage.requirement_files:
        for name, version in pinned(requirement_file).items():
            assert resolved[name] == version, (name, version, resolved.get(name))


def test_the_packages_built_from_source_are_declared_pure_python_sdists(tmp_path):
    """The one RUN line with --no-binary: each pin has an sdist, and it builds a wheel for any
    Python (py3-none-any: no compiler in the image), with no dependency left unpinned."""
    exporter = dockerfile_stages()["exporter"]
    assert exporter.sdist_files == [paths.ROOT / "requirements" / "sdist.txt"]
    assert "-r requirements/sdist.txt" in (paths.ROOT / "requirements.txt").read_text()
    for name, version in pinned(exporter.sdist_files[0]).items():
        run = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary=:all:", "-q",
             "-w", str(tmp_path), f"{name}=={version}"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if run.returncode != 0 and any(e in run.stderr for e in NETWORK_ERRORS):
            pytest.skip(f"the package registry cannot be reached: {run.stderr.strip()[-300:]}")
        assert run.returncode == 0, run.stderr[-2000:]
        wheels = [w.name for w in tmp_path.glob(f"{name}-{version}-*.whl")]
        assert len(wheels) == 1 and wheels[0].endswith("-py3-none-any.whl"), wheels


def test_the_server_image_installs_what_the_embedded_server_runs_with():
    """One source: the server stage installs requirements/server.txt, this machine's venv
    includes it, and the versions installed here are its pins."""
    from importlib.metadata import version

    server = paths.ROOT / "requirements" / "server.txt"
    assert dockerfile_stages()["server"].requirement_files == [server]
    assert "-r requirements/server.txt" in (paths.ROOT / "requirements.txt").read_text()
    assert "-r server.txt" in (paths.ROOT / "requirements" / "exporter.txt").read_text()
    pins = pinned(server)
    assert set(pins) >= {"numpy", "tokenizers", "onnxruntime"}
    assert {name: version(name) for name in pins} == pins


def test_the_server_image_installs_what_the_runtime_models_import():
    """...and what the OpenAI API beside the server imports (triton/openai_api/)."""
    stage = dockerfile_stages()["server"]
    imports_of = {"cupy-cuda13x": "cupy", "tritonclient[grpc]": "tritonclient"}
    installed = set(pinned(stage.requirement_files[0])) | {p.split("==")[0] for p in stage.pins}
    installed = {imports_of.get(name, name) for name in installed}
    api = sorted((paths.TRITON_DIR / "openai_api").glob("*.py"))
    # bucket.py is not the API: k8s's init container runs it, with boto3 it installs itself
    # at requirements/build.txt's pin (tests/test_k8s.py)
    served = [module for module in api if module.name != "bucket.py"]
    imported = set()
    for model in [*paths.TRITON_DIR.glob("*/model.py"), *served]:
        for node in ast.walk(ast.parse(model.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    ours = {"triton_python_backend_utils", Path(paths.RUNTIME_SHIPPED_AS).stem}  # beside them
    ours |= {module.stem for module in api}  # the API's modules import each other
    brought = {"grpc", "google"}  # by tritonclient[grpc]: grpcio, protobuf
    third_party = imported - set(sys.stdlib_module_names) - ours - brought
    found_by_uvicorn = {"httptools"}  # its C HTTP parser: uvicorn imports it, none of ours
    assert third_party == installed - found_by_uvicorn, (third_party, installed)


def test_every_image_runs_as_a_non_root_user_and_says_how_its_health_is_checked():
    """checkov reads the Dockerfile as one image (a USER or HEALTHCHECK in any stage passes
    for all), so each stage is checked here."""
    stages = dockerfile_stages()
    for stage in (stages[name] for name in IMAGES):
        assert stage.user not in ("root", "0", "0:0"), stage.name
    assert stages["server"].user == "triton-server"  # NVIDIA's, uid 1000
    # the server: ready (every model loaded) on Triton's HTTP port, the one compose publishes
    server = stages["server"].healthcheck
    assert "CMD" in server and "http://127.0.0.1:8000/v2/health/ready" in server
    assert "--start-period=600s" in server  # loading engines takes minutes
    # the exporter is a batch job: it says so rather than inheriting a check
    assert stages["exporter"].healthcheck == "NONE"


def test_the_server_image_carries_the_supervisors_access_module_and_its_library():
    """The supervisor looks beside itself for access.py and secret_args.so (it would need a
    compiler to build the library, and the server image has none)."""
    dockerfile = paths.DOCKERFILE.read_text()
    assert "COPY triton/supervisor/access.py /opt/llm-in-triton/access.py" in dockerfile
    assert "COPY triton/supervisor/secret_args.c /build/secret_args.c" in dockerfile
    assert "RUN gcc -shared -fPIC -O2 -o /build/secret_args.so /build/secret_args.c" in dockerfile
    copied = "COPY --from=secret-args /build/secret_args.so /opt/llm-in-triton/secret_args.so"
    assert copied in dockerfile
    # the same release of Ubuntu as the server's base (NGC 26.05), so the same glibc
    assert re.search(r"^FROM ubuntu:24\.04 AS secret-args$", dockerfile, re.M)


def compose_file() -> dict:
    import yaml

    return yaml.safe_load(paths.COMPOSE_FILE.read_text())


def test_compose_runs_triton_read_only_without_privileges_with_the_admin_key_as_a_file():
    compose = compose_file()
    triton = compose["services"]["triton"]
    assert triton["user"] == "1000:1000" and triton["read_only"] is True
    assert triton["tmpfs"] == ["/tmp"]
    for name, service in compose["services"].items():
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
    # the admin key: a secret from a file the user makes (ADMIN_KEY_FILE names another),
    # which the supervisor reads from /run/secrets; no key value in compose or the image
    assert triton["secrets"] == ["admin_key"]
    assert compose["secrets"] == {"admin_key": {"file": "${ADMIN_KEY_FILE:-./.secrets/admin-key}"}}
    assert paths.ADMIN_KEY == paths.ROOT / ".secrets" / "admin-key"  # the one doit serve makes
    command = triton["command"]
    assert command[command.index("--admin-key-file") + 1] == "/run/secrets/admin_key"
    assert command.index("--admin-key-file") < command.index("--")
    assert "/.secrets/" in (paths.ROOT / ".gitignore").read_text().split()  # never committed


def test_docker_context_leaves_out_the_hosts_venv_and_build_outputs():
    ignored = (paths.ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "models/*", "model_zoo/*", ".git", ".secrets"):
        assert entry in ignored


def test_serve_bench_and_soak_get_their_server_from_one_place():
    """server=docker reaches every stage that starts a server: they all call make_server (soak
    refuses docker at the door: it kills a stub and reads /proc)."""
    from tasks.server import EmbeddedTritonServer, make_server

    docker = make_server(Endpoints(server="docker", http_port=18000, grpc_port=18001))
    assert isinstance(docker, DockerTritonServer) and docker.http_url == "127.0.0.1:18000"
    embedded = make_server(Endpoints(http_port=18010, grpc_port=18011, metrics_port=18012))
    assert isinstance(embedded, EmbeddedTritonServer) and embedded.grpc_url == "127.0.0.1:18011"
    for stage in ("serve", "bench"):
        source = (paths.TASKS_DIR / f"{stage}.py").read_text()
        assert "make_server(" in source and "EmbeddedTritonServer(" not in source, stage
