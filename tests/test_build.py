"""The real build: doit in a clean copy of the project, offline, on the real MiniLM.

The tests of this module share one build and run in order (each leaves a valid build).
"""

from __future__ import annotations

import json
import re

import pytest

from tasks import paths
from tests.helpers.client import infer
from tests.helpers.project import copy_project

SHAPE_TASKS = {
    "parity:encode",
    "pbtxt:encode",
    "pbtxt:encode_model",
    "pbtxt:encode-wiring",
    "repo:encode_model",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("build") / "project")
    first = project.doit("task=encode")
    project.first_run = first
    return project


def repo_files(project) -> set[str]:
    models = project.root / "models"
    return {p.relative_to(models).as_posix() for p in models.rglob("*") if p.is_file()}


def test_first_build_makes_a_parity_checked_repository(built):
    assert built.first_run.executed[0] == "download:encode"
    assert repo_files(built) == {
        "README.md",
        "encode/config.pbtxt",
        "encode/1/.keep",
        "encode_model/config.pbtxt",  # the python backend's one hop
        "encode_model/1/model.py",
        "encode_model/1/llm_in_triton_runtime.py",  # triton/runtime/: the shared helpers
        "encode_model/1/encoding.py",
        "encode_model/1/answer.py",  # triton/trim/: HIDDEN_STATE at each request's length
        "encode_model/1/tokenizer.json",
        "encode_model/1/model.onnx",
    }
    report = json.loads(built.path(paths.parity_report("encode")).read_text())
    results = report["results"]["onnxruntime"]
    assert set(results) == {"last_hidden_state", "embedding"}
    for output, entries in results.items():
        assert [(e["batch"], e["seq"]) for e in entries] == [(1, 1), (8, 128), (32, 512)], output
        assert all(e["pass"] and e["max_abs_diff"] <= 1e-3 for e in entries), output
    assert report["tolerance"] == {"atol": 1e-4, "rtol": 1e-3}
    assert report["versions"]["onnxruntime"] and report["versions"]["torch"]


def test_a_second_run_executes_nothing(built):
    assert built.doit("task=encode").executed == []


@pytest.mark.slow  # two builds, 41 s; lean: test_stages' shapes reach only these tasks' params
def test_new_shapes_rebuild_only_the_shape_dependent_tasks(built):
    run = built.doit("task=encode", "seq=1,64,256")
    assert set(run.executed) == SHAPE_TASKS
    tokenizer = (built.root / "models/encode_model/config.pbtxt").read_text()
    assert 'key: "max_seq" value { string_value: "256" }' in tokenizer
    report = json.loads(built.path(paths.parity_report("encode")).read_text())
    assert report["shapes"] == [[1, 1], [8, 64], [32, 256]]
    assert set(built.doit("task=encode").executed) == SHAPE_TASKS  # and back


def test_editing_one_template_rebuilds_only_what_it_renders(built):
    template = built.root / "templates/pipeline.pbtxt.j2"
    template.write_text(template.read_text() + "# a comment added by a test\n")
    run = built.doit("task=encode")
    assert set(run.executed) == {
        "pbtxt:encode_model",
        "pbtxt:encode-wiring",
        "repo:encode_model",
    }
    assert (
        (built.root / "models/encode_model/config.pbtxt")
        .read_text()
        .endswith("# a comment added by a test\n")
    )


TEXTS = [
    "Triton serves the model.",
    "Hi.",
    "Ce modèle encode des phrases; ça marche.",
    "東京は日本の首都です。",
    "long text " * 400,
]


def pytorch_encode(model_dir, texts: list[str], max_seq: int):
    """What a user runs in-process: the Hugging Face model and sentence-transformers pooling."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tasks.compare import mean_pooled

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_seq, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    return (
        batch["attention_mask"],
        hidden.numpy(),
        mean_pooled(hidden, batch["attention_mask"]).numpy(),
    )


@pytest.mark.server
def test_the_served_ensemble_answers_as_pytorch_does(built, minilm_dir):
    import numpy as np

    from tasks.server import EmbeddedTritonServer

    with EmbeddedTritonServer(built.root / "models") as server:
        result = infer(server, "http", "encode", {"TEXT": TEXTS})
    mask, hidden, embedding = pytorch_encode(minilm_dir, TEXTS, max_seq=512)
    served_hidden, served_embedding = result["HIDDEN_STATE"], result["EMBEDDING"]
    assert served_embedding.shape == (len(TEXTS), 384)
    assert served_hidden.shape == hidden.shape  # padded to the longest text, truncated at 512
    assert hidden.shape[1] == 512
    np.testing.assert_allclose(served_embedding, embedding, atol=1e-4, rtol=1e-3)
    real = mask.numpy().astype(bool)  # positions past a text's end are padding in both
    np.testing.assert_allclose(served_hidden[real], hidden[real], atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(served_embedding, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow  # an export again, 31 s; lean: the full disk leaves no half-written target
def test_a_corrupted_onnx_file_is_noticed_and_rebuilt(built):
    onnx_file = built.path(paths.onnx_file("encode"))
    onnx_file.write_bytes(b"not an onnx model")
    run = built.doit("task=encode")
    assert "onnx:encode" in run.executed
    record = json.loads(built.path(paths.onnx_io("encode")).read_text())
    served = built.root / "models/encode_model/1/model.onnx"
    assert served.read_bytes() == onnx_file.read_bytes()
    import hashlib

    assert hashlib.sha256(served.read_bytes()).hexdigest() == record["sha256"]


@pytest.mark.slow  # 40 s: two parity runs; test_fp16's perturbed file stops a build in the lean run
def test_a_tampered_export_fails_parity_naming_the_output(built):
    import onnx
    from onnx import numpy_helper

    onnx_file = built.path(paths.onnx_file("encode"))
    io_file = built.path(paths.onnx_io("encode"))  # as if the exporter itself had gone wrong
    true_export = {f: f.read_bytes() for f in (onnx_file, io_file)}
    model = onnx.load(str(onnx_file))
    weight = next(w for w in model.graph.initializer if w.name == "embeddings.LayerNorm.bias")
    array = numpy_helper.to_array(weight).copy()
    array += 0.1
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(onnx_file))
    record = json.loads(io_file.read_text())
    import hashlib

    record["sha256"] = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    io_file.write_text(json.dumps(record))
    run = built.doit("task=encode", check=False)
    assert run.returncode != 0
    assert (
        "ParityError: outputs differ from the PyTorch reference: last_hidden_state "
        "(onnxruntime): max abs diff" in run.output
    )
    assert "; embedding (onnxruntime): max abs diff" in run.output
    assert re.search(
        r"at batch \d+ x seq \d+ \(atol 0.0001, rtol 0.001; fails at \d of 3 shapes\)", run.output
    )
    assert not built.path(paths.parity_report("encode")).exists()
    assert not [t for t in run.executed if t.startswith("repo:")]
    # Put the true export back for the tests that follow: its bytes, as doit recorded them,
    # so that only the failed check runs again (and what reads its report)
    for path, data in true_export.items():
        path.write_bytes(data)
    again = built.doit("task=encode").executed
    assert "parity:encode" in again and "onnx:encode" not in again, again


def test_clean_leaves_the_tree_as_cloned(built):
    built.doit("clean")
    left = built.git("status", "--porcelain", "--ignored", "--untracked-files=all").splitlines()
    leftovers = [line for line in left if ".doit.db" not in line and "__pycache__" not in line]
    assert leftovers == [" M templates/pipeline.pbtxt.j2"]  # the test's own edit, nothing else
