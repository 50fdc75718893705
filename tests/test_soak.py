"""`doit soak`, short: mixed traffic on every deployment, a stub killed halfway, a report."""

from __future__ import annotations

import json

import pytest

from tasks import paths
from tests.helpers.project import copy_project

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_a_short_soak_survives_its_stub_kill_and_reports_memory_and_latency(
    tmp_path, generation_models
):
    project = copy_project(tmp_path / "project")
    project.doit("task=encode", "batch=1,4,8", "seq=1,32,64")
    project.doit("task=causallm", f"model={generation_models['gpt2']}", "seq=1,16,32")
    run = project.doit("soak", "soak_minutes=0.5", "concurrency=1,3")
    assert "soak: passed" in run.output, run.output
    report = json.loads(project.path(paths.soak_report()).read_text())
    assert sorted(report["deployments"]) == ["causallm", "encode"]
    assert report["outcomes"]["ok"] > 50 and report["outcomes"]["refused"] > 0
    assert "unexpected" not in report["outcomes"] and report["unexpected_errors"] == []
    kill = report["stub_kill"]
    assert kill["model"] == "causallm_generate" and kill["recovered"]
    assert kill["seconds_to_recover"] < 30
    for moment in ("warm", "middle", "end"):
        assert report["resident_kib"][moment]["tritonserver"] > 0
        assert report["resident_kib"][moment]["encode_model"] > 0
    assert report["leaks"] == {}
    assert set(report["latency"]) == {"1", "3"}
    assert "| concurrency | p50 first (ms)" in project.path(paths.soak_markdown()).read_text()
