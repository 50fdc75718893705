"""Copies of the project that tests run doit in, as a user's clone would be."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tasks import paths

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
EXECUTED = re.compile(r"^\.  (\S+)$", re.M)


@dataclass
class DoitRun:
    returncode: int
    output: str

    @property
    def executed(self) -> list[str]:
        """Tasks doit ran (it marks them '.  name'; up-to-date ones are '-- name')."""
        return EXECUTED.findall(self.output)


@dataclass
class Project:
    root: Path

    def doit(
        self, *args: str, check: bool = True, timeout: float = 900, environment=None
    ) -> DoitRun:
        proc = subprocess.run(
            [sys.executable, "-m", "doit", *args],
            cwd=self.root,
            env={**os.environ, **OFFLINE_ENV, **(environment or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        run = DoitRun(proc.returncode, proc.stdout + proc.stderr)
        if check and run.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({run.returncode}):\n{run.output}")
        return run

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=self.root, check=True, capture_output=True, text=True
        ).stdout

    def path(self, absolute: Path) -> Path:
        """The same file as `absolute` (under the real project) inside this copy."""
        return self.root / absolute.relative_to(paths.ROOT)


def project_files() -> list[str]:
    """What a clone holds: the files git tracks here, and the new ones it does not ignore
    (what the next commit will hold), if they exist (a deletion is already gone)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=paths.ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [name for name in listed.split("\0") if name and (paths.ROOT / name).is_file()]


def copy_project(target: Path) -> Project:
    """A fresh clone-like copy of the project, committed to its own git repository."""
    target.mkdir(parents=True, exist_ok=True)
    for name in project_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(paths.ROOT / name, target / name)
    project = Project(target)
    project.git("init", "-q")
    project.git("add", "-A")
    project.git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone")
    return project


def free_ports() -> tuple[tuple[int, int, int], list[str]]:
    """Three different free ports (HTTP, gRPC, metrics), and the variables giving them to doit
    (with a fourth for the OpenAI API)."""
    from tasks.server import free_port

    found = sorted({free_port() for _ in range(8)})[:4]
    ports = tuple(found[:3])
    kinds = ("http", "grpc", "metrics", "openai")
    return ports, [f"{k}_port={p}" for k, p in zip(kinds, found)]


def doit_bench(project, *variables: str, environment=None):
    """A short `doit bench` on free ports."""
    _, ports = free_ports()
    # defaults first: a variable given twice takes its last value
    return project.doit(
        "seconds=0.5", "concurrency=1", *variables, *ports, "bench", environment=environment
    )
