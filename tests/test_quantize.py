"""Quantized deployments (precision=int8, int4, nf4, fp4): built from the fp32 file by the
quantize stage, gated on task-level agreement with fp32 PyTorch, served by a real server."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tasks import paths
from tests.conftest import copy_project, generation_tokenizer

pytestmark = pytest.mark.server


def record(project, name: str, part: str = "model") -> dict:
    return json.loads(project.path(paths.quant_record(name, part)).read_text())


def ops(project, name: str, part: str = "model") -> set[str]:
    model = onnx.load(str(project.path(paths.quant_file(name, part))))
    return {node.op_type for node in model.graph.node}


def parity(project, name: str) -> dict:
    return json.loads(project.path(paths.parity_report(name)).read_text())


@pytest.fixture(scope="module")
def int8_project(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("int8") / "project")
    project.doit("task=encode", "batch=1,4,8", "seq=1,32,64", "precision=int8")
    return project


def test_encode_int8_builds_passes_its_cosine_gate_and_serves(int8_project):
    from tasks.serve import EmbeddedTritonServer

    project = int8_project
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops(project, "encode")
    quant = record(project, "encode")
    assert quant["recipe"] == "int8-dynamic" and quant["size_ratio"] <= 0.3
    gates = {g["metric"]: g for g in parity(project, "encode")["results"]["gates"]}
    assert gates["embedding_cosine_min"]["pass"] and gates["embedding_cosine_min"]["value"] >= 0.98
    assert gates["embedding_cosine_mean"]["value"] >= 0.99
    served = (project.root / "models/encode_model/1/model.onnx").read_bytes()
    assert served == project.path(paths.quant_file("encode")).read_bytes()  # int8 is served
    import tritonclient.http as httpclient

    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        text = httpclient.InferInput("TEXT", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"Triton serves the int8 model."]], dtype=object))
        embedding = client.infer("encode", [text]).as_numpy("EMBEDDING")
        client.close()
    assert embedding.shape == (1, 384) and abs(np.linalg.norm(embedding) - 1) < 1e-3


def test_a_bad_recipe_fails_its_gate_naming_the_metric_and_never_re_exports(int8_project):
    project = int8_project
    run = project.doit(
        "task=encode", "batch=1,4,8", "seq=1,32,64", "precision=int8",
        "recipe=int8-dynamic-per-tensor", check=False,
    )  # fmt: skip
    assert run.returncode != 0
    assert "quantize:encode" in run.executed and "onnx:encode" not in run.executed
    assert "ParityError: encode at precision=int8 (recipe=int8-dynamic-per-tensor) fails its " in (
        run.output
    )
    assert "EMBEDDING embedding_cosine_min = 0.9" in run.output
    assert "gate >= 0.98" in run.output and "try recipe=int8-dynamic" in run.output
    assert not project.path(paths.parity_report("encode")).exists()  # nothing passes as good


def test_seqcls_int8_on_minilm_weights_passes_its_label_gate(tmp_path, labelled_minilm_dir):
    project = copy_project(tmp_path / "project")
    project.doit(
        "task=seqcls", f"model={labelled_minilm_dir}", "batch=1,4,8", "seq=1,32,64",
        "precision=int8",
    )  # fmt: skip
    gates = {g["metric"]: g for g in parity(project, "seqcls")["results"]["gates"]}
    assert gates["label_agreement"]["pass"] and gates["max_probability_change"]["pass"]
    assert "MatMulInteger" in ops(project, "seqcls")


def save_gpt2(target, width: int = 128, layers: int = 2):
    """A random GPT-2 initialised as GPT-2 is (std 0.02): the tiny fixture's spread weights
    (std 0.3, 32 wide) make its greedy tokens hinge on rounding, which no 4-bit format keeps."""
    import torch
    import transformers

    tokenizer = generation_tokenizer("causal")
    config = transformers.GPT2Config(
        n_embd=width, n_layer=layers, n_head=2, n_positions=128, vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02,
    )  # fmt: skip
    torch.manual_seed(3)
    transformers.GPT2LMHeadModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def four_bit(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("int4") / "project")
    model = f"model={save_gpt2(tmp_path_factory.mktemp('gpt2-128'))}"
    project.doit("task=causallm", model, "seq=1,16,32", "precision=int4")
    project.doit("task=causallm", model, "seq=1,16,32", "precision=nf4", "name=gptnf4")
    return project


def test_causallm_int4_serves_four_bit_weights_and_records_token_agreement(four_bit):
    from tasks.serve import EmbeddedTritonServer

    project = four_bit
    for part in ("decoder_model", "decoder_with_past_model"):
        quant = record(project, "causallm", part)
        # every linear layer: GPT-2's Conv1D exports as Gemm, rewritten as MatMul first
        assert quant["quantized_ops"]["MatMulNBits"] > 2 * 2  # 2 layers, and the head
        assert quant["block_size"] == 32 and quant["matmul_weight_ratio"] <= 0.2
    report = parity(project, "causallm")["generation"]
    metrics = {g["metric"]: g for g in report["gates"]}
    assert 0 <= metrics["token_agreement"]["value"] <= 1 and metrics["token_agreement"]["pass"]
    assert "logprob_change_mean" in metrics
    served = project.root / "models/causallm_generate/1/decoder_model.onnx"
    assert (
        served.read_bytes()
        == project.path(paths.quant_file("causallm", "decoder_model")).read_bytes()
    )
    import tritonclient.http as httpclient

    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        for name in ("causallm", "gptnf4"):
            text = httpclient.InferInput("TEXT", [1, 1], "BYTES")
            text.set_data_from_numpy(np.array([[b"The quick brown fox"]], dtype=object))
            ids = client.infer(name, [text]).as_numpy("OUTPUT_IDS")
            assert ids.shape[0] == 1 and (ids >= 0).any(), name
        client.close()


def test_nf4_holds_bitsandbytes_four_bit_weights(four_bit):
    for part in ("decoder_model", "decoder_with_past_model"):
        assert "MatMulBnb4" in ops(four_bit, "gptnf4", part)
        assert record(four_bit, "gptnf4", part)["block_size"] == 64


def test_one_bench_measures_int8_beside_fp32_with_speedup_and_accuracy(int8_project):
    project = int8_project
    shapes = ("batch=1,4,8", "seq=1,32,64")
    project.doit("task=encode", "name=encode32", *shapes)  # the fp32 deployment beside it
    project.doit(
        "bench", "task=encode", *shapes, "precision=int8", "against=encode32",
        "seconds=0.3", "concurrency=1,2",
    )  # fmt: skip
    report = json.loads(project.path(paths.bench_report("encode")).read_text())
    comparison = report["comparison"]
    assert comparison["deployment"] == "encode32" and comparison["speedup"] > 0
    assert set(comparison["best_throughput"]) == {"encode", "encode32"}
    accuracy = comparison["accuracy"]
    assert accuracy["encode"]["precision"] == "int8" and accuracy["encode32"]["precision"] == "fp32"
    assert [g["metric"] for g in accuracy["encode"]["gates"]] == [
        "embedding_cosine_min",
        "embedding_cosine_mean",
    ]
    markdown = project.path(paths.bench_markdown("encode")).read_text()
    assert "Speedup of encode over encode32" in markdown and "embedding_cosine_min" in markdown
    missing = project.doit("bench", "task=encode", *shapes, "precision=int8", "against=nope",
                           "seconds=0.3", "concurrency=1", check=False)  # fmt: skip
    assert "against=nope: no such deployment is served from models/" in missing.output
