"""Parity passes for every task head on real MiniLM weights and on a tiny random RoBERTa."""

from __future__ import annotations

import json
import shutil

import pytest

from tasks import catalog, paths


def parity_report(project, *variables: str) -> dict:
    run = project.doit(*variables, "parity")
    assert run.executed[-1].startswith("parity:"), run.output
    name = next(v.split("=", 1)[1] for v in variables if v.startswith("name="))
    return json.loads(project.path(paths.parity_report(name)).read_text())


def assert_all_outputs_pass(report: dict, task: str) -> None:
    outputs = report["results"]["onnxruntime"]
    assert set(outputs) == {o.onnx_name for o in catalog.TASKS[task].outputs}
    for output, entries in outputs.items():
        assert len(entries) == 3 and all(e["pass"] for e in entries), (output, entries)


# in suite=slow: the lean run's `served` fixture builds both heads on minilm weights (the
# build fails on parity), and test_quantize judges seqcls's again with its label gate
@pytest.mark.parametrize(
    "task", [pytest.param(t, marks=pytest.mark.slow) for t in ("seqcls", "qa")]
)
def test_task_heads_on_minilm_weights_pass_parity(project, minilm_dir, task):
    report = parity_report(
        project,
        f"task={task}",
        f"model={minilm_dir}",
        f"name=mini_{task}",
        "batch=1,4,8",
        "seq=1,64,256",
    )
    assert_all_outputs_pass(report, task)
    manifest = json.loads(project.path(paths.source_manifest(f"mini_{task}")).read_text())
    assert manifest["origin"] == str(minilm_dir)
    assert manifest["task"] == task


ENCODER_TASKS = sorted(n for n, spec in catalog.TASKS.items() if not spec.generation)


# encode and qa in the lean run; the served fixture builds seqcls and ner through parity too
LEAN_PARITY_TASKS = ("encode",)  # qa and seqcls: the `served` fixture builds them


@pytest.mark.parametrize(
    "task",
    [
        t if t in LEAN_PARITY_TASKS else pytest.param(t, marks=pytest.mark.slow)
        for t in ENCODER_TASKS
    ],
)
def test_a_tiny_random_roberta_passes_parity_for_every_task(
    project, tiny_roberta_dir, task, tmp_path
):
    model = tiny_roberta_dir
    labels = catalog.TASKS[task].labels
    if labels is not None:  # a row that says its head's labels (rerank: one score)
        model = tmp_path / "labelled"
        shutil.copytree(tiny_roberta_dir, model)
        config = json.loads((model / "config.json").read_text())
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
        (model / "config.json").write_text(json.dumps(config))
    report = parity_report(
        project,
        f"task={task}",
        f"model={model}",
        f"name=tiny_{task}",
        "batch=1,2,4",
        "seq=1,16,128",
    )
    assert_all_outputs_pass(report, task)
    assert report["shapes"] == [[1, 1], [2, 16], [4, 128]]


def test_an_export_that_differs_from_pytorch_fails_parity_naming_output_and_shape(
    project, tiny_roberta_dir
):
    """A weight changed in the exported file (as if the exporter had gone wrong, its record
    rewritten to match): parity names each output that differs and where, and no repository
    is written. (test_build's slow twin does it on MiniLM and puts the export back.)"""
    import hashlib

    import onnx
    from onnx import numpy_helper

    shapes = ("task=encode", f"model={tiny_roberta_dir}", "name=tamper", "batch=1,2,4")
    project.doit(*shapes, "seq=1,16,128", "onnx")
    onnx_file = project.path(paths.onnx_file("tamper"))
    io_file = project.path(paths.onnx_io("tamper"))
    model = onnx.load(str(onnx_file))
    weight = next(w for w in model.graph.initializer if w.name.endswith("LayerNorm.bias"))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.1, weight.name))
    onnx.save(model, str(onnx_file))
    record = json.loads(io_file.read_text())
    record["sha256"] = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    io_file.write_text(json.dumps(record))
    run = project.doit(*shapes, "seq=1,16,128", check=False)
    assert run.returncode != 0 and "onnx:tamper" not in run.executed
    assert (
        "ParityError: outputs differ from the PyTorch reference: last_hidden_state "
        "(onnxruntime): max abs diff" in run.output
    ), run.output
    assert "; embedding (onnxruntime): max abs diff" in run.output
    assert "(atol 0.0001, rtol 0.001; fails at 3 of 3 shapes)" in run.output
    assert not project.path(paths.parity_report("tamper")).exists()
    assert not [t for t in run.executed if t.startswith("repo:")]


def test_switching_a_deployment_to_another_task_removes_its_old_parts(project, tiny_roberta_dir):
    shapes = ("batch=1,2,4", "seq=1,16,128", f"model={tiny_roberta_dir}", "name=switch")
    project.doit("task=seqcls", "backend=onnxruntime", *shapes)
    assert (project.root / "models/switch_post/config.pbtxt").is_file()
    assert (project.root / "models/switch_tokenizer/config.pbtxt").is_file()
    project.doit("task=encode", *shapes)  # the python backend's one hop
    assert sorted(p.name for p in (project.root / "models").iterdir() if p.is_dir()) == [
        "switch",
        "switch_model",
    ]
