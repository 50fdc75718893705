"""task=rerank: a cross-encoder built, parity-checked and served, answering as
sentence-transformers' CrossEncoder.predict does, on MiniLM's real weights with a one-score
head."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks import paths
from tests.helpers.client import Client, Raw, infer
from tests.helpers.project import copy_project, doit_bench

pytestmark = pytest.mark.server

SHAPES = ("batch=1,4,8", "seq=1,32,64")
PAIRS = [
    ("what does Triton serve?", "Triton Inference Server serves models from many frameworks."),
    ("what does Triton serve?", "The quick brown fox jumps over the lazy dog."),
    ("où est Paris ?", "Paris est la capitale de la France."),
    ("東京は?", "東京は日本の首都です。"),
    ("a number", "Numbers like 3.14159 and dates like 2026-11-24 are tokenized into pieces."),
]
LONG_DOCUMENT = " ".join(["Triton batches requests of many lengths on CPUs and GPUs."] * 20)


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory, minilm_dir):
    """MiniLM with a seeded one-logit head spread wide enough that scores differ."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(5)
    model = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=1)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.5)
    target = tmp_path_factory.mktemp("cross-encoder")
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def reranking(tmp_path_factory, cross_encoder_dir):
    """rerank on the python backend's one hop and as the native backends' steps, one server."""
    from tasks.server import EmbeddedTritonServer

    project = copy_project(tmp_path_factory.mktemp("rerank") / "project")
    model = f"model={cross_encoder_dir}"
    project.doit("task=rerank", model, *SHAPES)
    project.doit("task=rerank", "name=rerank_steps", "one_hop=0", model, *SHAPES)
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        yield project, server


def pairs_of(pairs) -> dict:
    return {"QUERY": [q for q, _ in pairs], "DOCUMENT": [d for _, d in pairs]}


def cross_encoder_scores(project, pairs) -> np.ndarray:
    """sentence-transformers' CrossEncoder on the checkpoint the build used."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(project.path(paths.source_dir("rerank"))), device="cpu")
    return np.asarray(model.predict(list(pairs)), dtype=np.float32)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("name", ["rerank", "rerank_steps"])
def test_scores_equal_cross_encoder_predict(reranking, name, protocol):
    project, server = reranking
    served = infer(server, protocol, name, pairs_of(PAIRS))["SCORE"]
    expected = cross_encoder_scores(project, PAIRS)
    assert served.shape == (len(PAIRS), 1) and served.dtype == np.float32
    np.testing.assert_allclose(served[:, 0], expected, atol=1e-4)
    assert np.ptp(expected) > 0.05  # the head tells the pairs apart


def test_a_long_pair_is_cut_on_the_document_side_only(reranking):
    import torch
    import transformers

    project, server = reranking
    query = "which hardware does Triton batch the requests of many users on? " * 3  # 40 tokens
    served = infer(server, "http", "rerank", pairs_of([(query, LONG_DOCUMENT)]))["SCORE"]
    source = project.path(paths.source_dir("rerank"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(source).eval()
    scores = {}
    for strategy in ("only_second", "longest_first"):
        batch = tokenizer(
            query, LONG_DOCUMENT, truncation=strategy, max_length=64, return_tensors="pt"
        )
        with torch.inference_mode():
            scores[strategy] = float(torch.sigmoid(model(**batch).logits)[0, 0])
    assert abs(served[0, 0] - scores["only_second"]) < 1e-4
    assert abs(scores["only_second"] - scores["longest_first"]) > 1e-4  # the cut matters


def test_pairs_batched_in_one_request_get_their_alone_answers(reranking):
    _, server = reranking
    together = infer(server, "grpc", "rerank_steps", pairs_of(PAIRS))["SCORE"]
    for index, pair in enumerate(PAIRS):
        alone = infer(server, "grpc", "rerank_steps", pairs_of([pair]))["SCORE"]
        np.testing.assert_allclose(together[index], alone[0], atol=1e-5)


def test_parity_compared_the_relevance_logits_with_pytorch(reranking):
    project, _ = reranking
    report = json.loads(project.path(paths.parity_report("rerank")).read_text())
    compared = {output for runner in report["results"].values() for output in runner}
    assert compared == {"logits"}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_pairs_get_a_client_error_in_words(reranking, protocol):
    _, server = reranking
    wanted = "StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400"
    texts = np.array([[b"a query"]], dtype=object)
    bad = {
        "no document": ({"QUERY": texts}, "DOCUMENT"),
        "two queries, one document": (
            {"QUERY": ["a", "b"], "DOCUMENT": ["one document"]},
            "batch size",  # Triton refuses it before any model runs
        ),
        "an empty query": ({"QUERY": [""], "DOCUMENT": ["a document"]}, "is empty"),
        "a number for a text": (
            {"QUERY": Raw("FP32", np.ones((1, 1), np.float32)), "DOCUMENT": ["a document"]},
            "QUERY",
        ),
    }
    problems = []
    with Client(server, protocol) as client:
        for kind, (inputs, words) in bad.items():
            status, message = client.refusal("rerank", inputs)
            if status != wanted or words not in message:
                problems.append(f"{kind}: {status} {message[:300]!r} (wanted {words!r})")
        assert client.refusal("rerank", pairs_of(PAIRS[:1])) == (None, "")
    assert problems == []


@pytest.mark.slow
def test_bench_measures_rerank_served_and_in_process(reranking, cross_encoder_dir):
    project, _ = reranking
    doit_bench(project, "task=rerank", f"model={cross_encoder_dir}", *SHAPES)
    report = json.loads(project.path(paths.bench_report("rerank")).read_text())
    served = {"triton", "openai"}  # Triton's gRPC and HTTP; the API process's /rerank
    assert set(report["systems"]) == served | {"onnxruntime", "onnxruntime_batched", "pytorch"}
    assert report["errors"] == 0
    assert all(p["throughput"] > 0 for points in report["systems"].values() for p in points)
