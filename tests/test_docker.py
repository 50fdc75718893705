"""The Docker files for GPU hosts, checked as far as a machine without a Docker engine allows."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys

import pytest

from tasks import paths
from tasks.serve import DockerTritonServer
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
    assert "--model-repository=/models" in triton["command"]
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@needs_compose
def test_the_exporter_writes_into_the_same_folders():
    exporter = compose_config()["services"]["exporter"]
    workdir = re.search(r"^WORKDIR (\S+)$", (paths.ROOT / "Dockerfile").read_text(), re.M)[1]
    mounts = volumes(exporter)
    assert mounts[str(paths.MODELS)] == f"{workdir}/models"
    assert mounts[str(paths.MODEL_ZOO)] == f"{workdir}/model_zoo"


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


def test_the_server_image_installs_what_the_runtime_models_import():
    dockerfile = (paths.ROOT / "Dockerfile").read_text()
    server_stage = dockerfile.split("AS server", 1)[1].split("FROM", 1)[0]
    imports_of = {"cupy-cuda12x": "cupy"}  # distributions whose import name differs
    installed = {re.split(r"[=<>]", p)[0] for p in re.findall(r"(\S+==\S+)", server_stage)}
    installed = {imports_of.get(name, name) for name in installed}
    imported = set()
    for model in paths.TRITON_DIR.glob("*/model.py"):
        for node in ast.walk(ast.parse(model.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"triton_python_backend_utils"}
    assert third_party == installed, (third_party, installed)


def test_serve_with_docker_fails_at_the_door_without_an_engine(project):
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        pytest.skip("a Docker engine answers here")
    run = project.doit("serve", "server=docker", check=False, timeout=60)
    assert run.returncode == 3
    assert run.output.startswith("ERROR: server=docker: "), run.output
    assert "or use server=embedded" in run.output
    assert run.executed == []
