"""The TensorRT path: real engines and parity against them, where TensorRT and a GPU exist."""

from __future__ import annotations

import json

import pytest

from tasks import paths
from tasks.settings import tensorrt_available

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(
        not tensorrt_available(),
        reason="needs TensorRT and an NVIDIA GPU (neither is on this machine)",
    ),
]


def test_an_fp16_engine_is_built_and_passes_parity(project):
    run = project.doit(
        "task=encode", "backend=tensorrt", "precision=fp16", "batch=1,4,8", "seq=1,64,128"
    )
    assert "plan:encode" in run.executed
    report = json.loads(project.path(paths.parity_report("encode")).read_text())
    assert set(report["results"]) == {"onnxruntime", "tensorrt"}
    assert report["tolerance"] == {"atol": 2e-2, "rtol": 2e-2}
    assert all(g["pass"] for g in report["gated"]["gates"])  # the engine, on the cosine gate
    assert (project.root / "model_zoo/encode/quant/model.onnx").is_file()  # AutoCast's file
    assert (project.root / "models/encode_model/1/model.plan").is_file()
    assert (
        'platform: "tensorrt_plan"'
        in (project.root / "models/encode_model/config.pbtxt").read_text()
    )


def test_a_plan_is_rebuilt_for_new_shapes_but_not_twice(project):
    project.doit("task=encode", "backend=tensorrt", "batch=1,4,8", "seq=1,64,128")
    again = project.doit("task=encode", "backend=tensorrt", "batch=1,4,8", "seq=1,32,128")
    assert "plan:encode" in again.executed and "onnx:encode" not in again.executed
    assert (
        project.doit("task=encode", "backend=tensorrt", "batch=1,4,8", "seq=1,32,128").executed
        == []
    )


@pytest.mark.parametrize(("task", "family"), [("causallm", "gpt2"), ("t5", "t5")])
def test_generation_builds_an_engine_per_decoder_that_decodes_as_generate(
    project, generation_models, task, family
):
    from tasks import catalog

    run = project.doit(
        f"task={task}",
        f"model={generation_models[family]}",
        "backend=tensorrt",
        "precision=fp32",
        "batch=1,4,8",
        "seq=1,16,32",
    )
    parts = catalog.TASKS[task].onnx_parts
    assert {f"plan:{task}-{part}" for part in parts} <= set(run.executed)
    report = json.loads(project.path(paths.parity_report(task)).read_text())
    assert report["generation"]["equal"] and report["generation_tensorrt"]["equal"]
    assert all(set(report["files"][part]) == {"onnxruntime", "tensorrt"} for part in parts)
    for part in parts:
        model = f"{task}{catalog.PART_SUFFIXES[part]}"
        assert (project.root / "models" / model / "1" / "model.plan").is_file()
    assert not list((project.root / "models" / f"{task}_generate" / "1").glob("*.onnx"))
