"""precision=fp16 on every backend: the quantize stage's AutoCast copy of the exported file,
proven on ONNX Runtime here (fp16 tolerances and the task's gates), served by a real server;
and generation in fp16 against fp32, which decides the default on TensorRT."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tasks import catalog, paths
from tests.helpers.client import infer
from tests.helpers.project import copy_project

pytestmark = pytest.mark.server

SHAPES = ("batch=1,4,8", "seq=1,32,64")


def record(project, name: str, part: str = "model") -> dict:
    return json.loads(project.path(paths.quant_record(name, part)).read_text())


def parity(project, name: str) -> dict:
    return json.loads(project.path(paths.parity_report(name)).read_text())


def fp32_weights_of_fp16_nodes(project, name: str, part: str = "model") -> list[str]:
    """The file's fp32 weights that some node AutoCast made fp16 reads: none, if every weight
    is fp16 but those of the nodes it kept in fp32 (its record names them)."""
    model = onnx.load(str(project.path(paths.quant_file(name, part))))
    kept = set(record(project, name, part)["kept_fp32"])
    readers: dict[str, set] = {}
    for node in model.graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, set()).add(node.name)
    return [
        init.name
        for init in model.graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT and readers.get(init.name, set()) - kept
    ]


def held_texts(count: int) -> list[str]:
    return [t for t in paths.HELD_TEXTS.read_text().splitlines() if t.strip()][:count]


def assert_gated(project, name: str) -> dict:
    report = parity(project, name)
    assert report["precision"] == "fp16"
    assert report["tolerance"] == {"atol": 2e-2, "rtol": 2e-2}  # element-wise, judged
    assert set(report["results"]) == {"onnxruntime"}
    gates = {g["metric"]: g for g in report["gated"]["gates"]}
    assert gates and all(g["pass"] for g in gates.values()), gates
    return gates


@pytest.fixture(scope="module")
def fp16_encode(tmp_path_factory, tiny_roberta_dir):
    """A tiny RoBERTa's encode built in fp16 (MiniLM's: the slow test below)."""
    project = copy_project(tmp_path_factory.mktemp("fp16") / "project")
    run = project.doit("task=encode", f"model={tiny_roberta_dir}", *SHAPES, "precision=fp16")
    return project, run


def test_changing_the_precision_to_fp16_re_casts_and_never_re_exports(monkeypatch):
    from tests.helpers.stages import params, tasks_for

    before = tasks_for(monkeypatch)
    after = tasks_for(monkeypatch, precision="fp16")
    assert "quantize:encode" in after and "quantize:encode" not in before
    assert params(after["onnx:encode"]) == params(before["onnx:encode"])
    assert after["onnx:encode"]["file_dep"] == before["onnx:encode"]["file_dep"]
    assert paths.quant_file("encode") in after["repo:encode_model"]["file_dep"]


def test_encode_fp16_is_an_autocast_file_that_passes_parity_and_its_gate(fp16_encode):
    project, run = fp16_encode
    assert "quantize:encode" in run.executed
    quant = record(project, "encode")
    assert (quant["recipe"], quant["method"]) == ("fp16-autocast", "autocast")
    # what stayed fp32, and why, in AutoCast's words: the attention mask's -3.4e38, which
    # only padded batches show, and what reads it
    kept = quant["kept_fp32"]
    assert any(node.endswith("attention/self/Softmax") for node in kept), kept
    assert all("out of range" in why for why in kept.values())
    assert quant["calibration_feeds"] == 6  # 24 texts in padded batches of 4
    assert quant["fp16"]["fp16_initializers"] > 10
    assert fp32_weights_of_fp16_nodes(project, "encode") == []  # the rest holds fp16 weights
    gates = assert_gated(project, "encode")
    assert gates["embedding_cosine_min"]["value"] >= 0.99
    served = (project.root / "models/encode_model/1/model.onnx").read_bytes()
    assert served == project.path(paths.quant_file("encode")).read_bytes()  # fp16 is served


def test_bench_sets_fp16s_gates_beside_its_speed(fp16_encode, monkeypatch):
    from tasks import bench

    project, _ = fp16_encode
    report = project.path(paths.parity_report("encode"))
    monkeypatch.setattr(paths, "parity_report", lambda name: report)
    accuracy = bench.accuracy("encode")
    assert accuracy["precision"] == "fp16"
    assert [g["metric"] for g in accuracy["gates"]] == [g.metric for g in catalog.GATES["encode"]]


@pytest.mark.slow
def test_minilm_encode_fp16_keeps_in_fp32_what_autocast_finds(tmp_path):
    project = copy_project(tmp_path / "project")
    project.doit("task=encode", *SHAPES, "precision=fp16")
    kept = record(project, "encode")["kept_fp32"]
    # AutoCast's range rule reads the token ids too (to 29461): the embedding table stays fp32
    assert "/embeddings/word_embeddings/Gather" in kept
    assert {f"/encoder/layer.{i}/attention/self/Softmax" for i in range(6)} <= set(kept)
    assert len(kept) < 20 and fp32_weights_of_fp16_nodes(project, "encode") == []
    gates = assert_gated(project, "encode")
    assert gates["embedding_cosine_min"]["value"] >= 0.999


def test_served_fp16_embeddings_pass_the_gate_against_fp32(fp16_encode, tiny_roberta_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tasks.compare import mean_pooled
    from tasks.server import EmbeddedTritonServer

    project, _ = fp16_encode
    texts = held_texts(8)
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        served = infer(server, "http", "encode", {"TEXT": texts})["EMBEDDING"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_roberta_dir)
    model = AutoModel.from_pretrained(tiny_roberta_dir).eval()
    with torch.inference_mode():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        reference = mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"]).numpy()
    cosine = (served * reference).sum(1) / (
        np.linalg.norm(served, axis=1) * np.linalg.norm(reference, axis=1)
    )
    (minimum,) = [g.minimum for g in catalog.GATES["encode"] if g.metric == "embedding_cosine_min"]
    assert cosine.min() >= minimum, cosine


def test_a_perturbed_fp16_file_fails_the_gate(fp16_encode, tiny_roberta_dir):
    """A weight scaled in the fp16 file (as a bad cast would): parity stops the build, naming
    the gate, and leaves no report that passes it as good."""
    from onnx import numpy_helper

    project, _ = fp16_encode
    target = project.path(paths.quant_file("encode"))
    model = onnx.load(str(target))
    for init in model.graph.initializer:  # the first fp16 weight matrix, times 8
        array = numpy_helper.to_array(init)
        if init.data_type == onnx.TensorProto.FLOAT16 and array.ndim == 2 and array.shape[0] > 1:
            init.CopyFrom(numpy_helper.from_array((array * 8).astype(array.dtype), init.name))
            break
    else:
        raise AssertionError("no fp16 weight matrix found to perturb")
    onnx.save(model, str(target))
    given = f"model={tiny_roberta_dir}"
    run = project.doit("task=encode", given, *SHAPES, "precision=fp16", check=False)
    assert run.returncode != 0
    assert "parity:encode" in run.executed and "quantize:encode" not in run.executed
    assert "ParityError: encode at precision=fp16 (recipe=fp16-autocast) fails its gate" in (
        run.output
    )
    assert "EMBEDDING embedding_cosine_min = " in run.output and "gate >= 0.98" in run.output
    assert not project.path(paths.parity_report("encode")).exists()


def served_pair(tmp_path, task: str, model_dir, answer: str, texts: list[str]):
    """The same model built in fp32 (name=<task>32) and fp16 (name=<task>) in one project,
    parity passed by both; each one's answers to `texts` from one server."""
    from tasks.server import EmbeddedTritonServer

    project = copy_project(tmp_path / "project")
    model = f"model={model_dir}"
    project.doit(f"task={task}", model, f"name={task}32", *SHAPES)
    project.doit(f"task={task}", model, *SHAPES, "precision=fp16")
    gates = assert_gated(project, task)
    assert record(project, task)["fp16"]["fp16_initializers"] > 10
    assert fp32_weights_of_fp16_nodes(project, task) == []
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        answers = {  # a text per request: a long one takes the batch's windows
            name: np.concatenate(
                [infer(server, "http", name, {"TEXT": [t]})[answer] for t in texts]
            )
            for name in (task, f"{task}32")
        }
    return gates, answers[task], answers[f"{task}32"]


@pytest.mark.slow
def test_seqcls_fp16_serves_the_labels_fp32_serves(tmp_path, labelled_minilm_dir):
    texts = [*catalog.SAMPLE_TEXTS, *held_texts(8)]
    gates, fp16, fp32 = served_pair(tmp_path, "seqcls", labelled_minilm_dir, "LABEL", texts)
    assert gates["label_agreement"]["value"] >= 0.95
    assert np.mean(fp16 == fp32) >= 0.95


@pytest.mark.slow
def test_ner_fp16_serves_the_entities_fp32_serves(tmp_path, ner_dir):
    from tests.test_ner import TEXTS

    texts = [*catalog.SAMPLE_TEXTS, *TEXTS]
    gates, fp16, fp32 = served_pair(tmp_path, "ner", ner_dir, "ENTITIES", texts)
    assert gates["token_label_agreement"]["value"] >= 0.95
    words = [[e["word"] for e in json.loads(row[0])] for row in (*fp16, *fp32)]
    assert any(words)  # the texts hold entities
    found16 = [[(e["word"], e["entity_group"]) for e in json.loads(row[0])] for row in fp16]
    found32 = [[(e["word"], e["entity_group"]) for e in json.loads(row[0])] for row in fp32]
    assert found16 == found32


def greedy_tokens(settings, files: dict) -> list[list[int]]:
    """The serving loop's greedy tokens on these files, for the generation prompts and held
    texts (16 prompts x 8 new tokens), in one padded batch (paths.MODEL_ZOO: the project's)."""
    import transformers

    from tasks import artifacts, profiles
    from tasks.facts import checkpoint_facts

    decoding = artifacts.load_runtime("generate", "decoding.py")
    facts = checkpoint_facts(settings.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths.source_dir(settings.name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token_id = facts["pad_id"]
    tokenizer.padding_side = "right"
    prompts = [*catalog.GENERATION_PROMPTS, *held_texts(12)]
    encoded = tokenizer(prompts, padding=True, truncation=True, max_length=16, return_tensors="np")
    generator = decoding.Generator(
        settings.task.generation,
        decoding.onnxruntime_steps(files),
        eos_ids=facts["eos_ids"],
        pad_id=facts["pad_id"],
        start_id=int(facts["decoder_start_id"]),
        cache_limit=profiles.cache_limit(settings, facts["max_positions"]),
    )
    params = [decoding.RowParams(catalog.GATE_NEW_TOKENS)] * len(prompts)
    return generator.generate(
        encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64), params
    )


@pytest.mark.slow
def test_generation_in_fp16_against_fp32_decides_the_tensorrt_default(
    tmp_path, generation_models, monkeypatch
):
    """T5 and two causal LMs (the tiny test models) built in fp16: parity (every file within
    fp16's tolerances, greedy tokens equal to fp32 generate()) holds or not, and the greedy
    tokens of the fp16 files against the fp32 files are measured. fp16 is the default on
    TensorRT for a kind only where every model of that kind held (FP16_GENERATION_BLOCKED)."""
    from tasks.settings import load_settings

    held: dict[str, list[bool]] = {}
    measured = {}
    for family, task in (("t5", "t5"), ("gpt2", "causallm"), ("opt", "causallm")):
        project = copy_project(tmp_path / family)
        variables = [f"task={task}", f"model={generation_models[family]}", "seq=1,16,32"]
        run = project.doit(*variables, "batch=1,4,8", "precision=fp16", check=False)
        assert "quantize:" in run.output and "parity:" in run.output
        assert run.returncode == 0 or "ParityError" in run.output
        monkeypatch.setattr(paths, "MODEL_ZOO", project.root / "model_zoo")
        chosen = load_settings(dict(v.split("=", 1) for v in [*variables, "precision=fp16"]))
        parts = chosen.task.onnx_parts
        fp32 = greedy_tokens(chosen, {p: paths.onnx_file(task, p) for p in parts})
        fp16 = greedy_tokens(chosen, {p: paths.quant_file(task, p) for p in parts})
        measured[family] = sum(a == b for a, b in zip(fp32, fp16))
        held.setdefault(chosen.task.generation, []).append(run.returncode == 0)
    print(f"fp16 greedy sequences equal to fp32's, of 16: {measured}")
    for kind, results in held.items():
        assert bool(catalog.FP16_GENERATION_BLOCKED[kind]) == (not all(results)), (kind, results)
    assert measured["opt"] == 16 and measured["t5"] == 16 and measured["gpt2"] < 16
