"""checkov, the infrastructure-as-code scanner, over what `doit k8s` writes, the Dockerfile and
docker-compose.yml: every check passes, or is skipped in the file itself with a reason.

checkov lives in a venv of its own (requirements/checkov.txt: its pins conflict with the
project's). It runs offline (--skip-download). Frameworks: `kubernetes` (k8s/), `dockerfile`
and `secrets` (hard-coded credentials in any file: checkov has no docker-compose framework,
so compose is checked for secrets here and for its security settings in test_docker.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks import k8s, paths

# Skipped in the manifests themselves, each with its reason (templates/k8s/deployment.yaml.j2)
K8S_SKIPS = {"CKV_K8S_43", "CKV_K8S_40"}
PLANTED_KEY = "AKIAIOSFODNN7EXAMPLA"  # a fake AWS key id checkov must find where it is planted


def checkov() -> str:
    """The checkov executable: $CHECKOV, the project's .venv-checkov, or checkov on PATH."""
    for candidate in (
        os.environ.get("CHECKOV"),
        str(paths.ROOT / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip(
        "checkov is not installed: python3 -m venv .venv-checkov && "
        ".venv-checkov/bin/pip install -r requirements/checkov.txt (as .ci/run does)"
    )


def scan(directory: Path) -> dict[str, dict]:
    """checkov over a directory: check type -> its report."""
    run = subprocess.run(
        [checkov(), "--skip-download", "-d", str(directory), "-o", "json",
         "--framework", "kubernetes", "dockerfile", "secrets"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode in (0, 1), run.stderr[-2000:]  # 1: something failed
    reports = json.loads(run.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    return {r["check_type"]: r for r in reports if "check_type" in r}


def findings(report: dict | None, kind: str) -> list[tuple[str, str]]:
    """(check id, file) of each failed or skipped check of a report."""
    if report is None:
        return []
    return [(c["check_id"], c["file_path"].lstrip("/")) for c in report["results"][kind]]


def without_hardening(deployment: dict) -> dict:
    """The deployment as it was before it was locked down: no security context, the token."""
    spec = deployment["spec"]["template"]["spec"]
    del spec["securityContext"], spec["automountServiceAccountToken"]
    for container in spec["containers"] + spec["initContainers"]:
        del container["securityContext"]
    return deployment


def test_checkov_passes_what_doit_k8s_writes_the_dockerfile_and_compose(project, tmp_path):
    project.doit("k8s", "repo=s3://bucket/prod")
    scanned = tmp_path / "scanned"
    shutil.copytree(project.path(paths.K8S_DIR), scanned / "k8s")
    for source in (paths.DOCKERFILE, paths.COMPOSE_FILE):
        shutil.copy(source, scanned / source.name)
    # controls, so a check that silently stopped running fails this test: a deployment
    # without its security context, and a compose file with a key written in it
    deployment = yaml.safe_load((scanned / "k8s" / "deployment.yaml").read_text())
    (scanned / "planted").mkdir()
    (scanned / "planted" / "deployment.yaml").write_text(
        yaml.safe_dump(without_hardening(deployment))
    )
    (scanned / "planted" / "docker-compose.yml").write_text(
        f"services:\n  x:\n    image: x\n    environment:\n      AWS_ACCESS_KEY_ID: {PLANTED_KEY}\n"
    )

    reports = scan(scanned)

    failed = {kind: findings(reports.get(kind), "failed_checks") for kind in
              ("kubernetes", "dockerfile", "secrets")}  # fmt: skip
    ours = {
        kind: [f for f in found if not f[1].startswith("planted/")]
        for kind, found in failed.items()
    }
    assert ours == {"kubernetes": [], "dockerfile": [], "secrets": []}
    assert reports["kubernetes"]["summary"]["resource_count"] >= len(k8s.MANIFESTS)
    assert reports["dockerfile"]["summary"]["passed"] > 0
    # the controls were caught
    planted = {check for check, file in failed["kubernetes"] if file == "planted/deployment.yaml"}
    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_28", "CKV_K8S_38"} <= planted
    assert ("CKV_SECRET_2", "planted/docker-compose.yml") in failed["secrets"]
    # skipped only in the deployment, each with its reason written beside it
    skipped = findings(reports["kubernetes"], "skipped_checks")
    ours_skipped = [check for check, file in skipped if file == "k8s/deployment.yaml"]
    assert sorted(ours_skipped) == sorted(K8S_SKIPS)
    annotations = deployment["metadata"]["annotations"]
    reasons = dict(
        v.split("=", 1) for k, v in annotations.items() if k.startswith("checkov.io/skip")
    )
    assert set(reasons) == K8S_SKIPS
    assert all(len(reason.split()) >= 12 for reason in reasons.values()), reasons
    assert not findings(reports["dockerfile"], "skipped_checks")
