"""task=ner: the entities Hugging Face's token-classification pipeline finds
(aggregation_strategy="simple"), from the answer step alone and served through the ensemble
(one hop, and the native backends' steps), long texts read in windows."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tasks import artifacts, catalog, paths
from tests.helpers.client import infer, raw_request, text_array
from tests.helpers.stages import text_encoder

MAX_SEQ = 128  # SERVED_SHAPES
STRIDE = catalog.window_stride(MAX_SEQ)
FILLER = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)
TEXTS = [
    "Ann Smith met the French team at Google in Paris.",
    "New York hosts the Olympics; the United Nations too.",
    "Nothing to find here.",
    "smith alone, then Ann Ann and Parisian nations [SEP] 🦒 Paris",
    f"{FILLER} and at the very end Ann Smith flew to New York.",  # 3 windows: 8 rows in all
    "東京は日本の首都です。",
]


def hf_pipeline(directory):
    """Hugging Face's pipeline on the checkpoint, reading windows of the served max seq."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(directory, model_max_length=MAX_SEQ)
    model = AutoModelForTokenClassification.from_pretrained(directory).eval()
    run = pipeline(
        "token-classification",
        model=model,
        tokenizer=tokenizer,
        aggregation_strategy="simple",
        stride=STRIDE,
        device="cpu",
    )
    return lambda text: [{**e, "score": float(e["score"])} for e in run(text)]


def assert_same_entities(got: list[dict], expected: list[dict], text: str) -> None:
    keys = ("entity_group", "word", "start", "end")
    assert [tuple(e[k] for k in keys) for e in got] == [
        tuple(e[k] for k in keys) for e in expected
    ], text[-80:]
    np.testing.assert_allclose(
        [e["score"] for e in got], [e["score"] for e in expected], atol=1e-3, err_msg=text[-80:]
    )


def test_the_answer_step_finds_the_pipelines_entities_on_pytorch_logits(ner_dir):
    """The runtime code alone (tokenizing and answer step) on the PyTorch model's logits."""
    import torch
    from transformers import AutoModelForTokenClassification

    encoder = text_encoder(ner_dir / "tokenizer.json", ["TEXT"], MAX_SEQ, STRIDE)
    (encoded,) = encoder.encode([TEXTS])
    names = [*catalog.TOKEN_INPUTS, "offsets", "window_item", "seq_length"]
    arrays = encoder.arrays(encoded, [(n, np.int64) for n in names])
    model = AutoModelForTokenClassification.from_pretrained(ner_dir).eval()
    with torch.inference_mode():
        feed = {n: torch.from_numpy(arrays[n]) for n in catalog.TOKEN_INPUTS}
        logits = model(**feed).logits.numpy()
    assert len(logits) > len(TEXTS) + 1  # the long text takes several windows
    answer = artifacts.load_runtime("ner_entities", "answer.py").make(ner_dir, {})
    text = np.array([[t.encode()] for t in TEXTS], dtype=object)
    out = answer({**arrays, "window_logits": logits, "TEXT": text})
    reference = hf_pipeline(ner_dir)
    found = [json.loads(value[0]) for value in out["ENTITIES"]]
    for text, entities in zip(TEXTS, found):
        assert_same_entities(entities, reference(text), text)
    assert {"ann smith", "french", "google", "paris"} <= {e["word"] for e in found[0]}
    assert out["LOGITS"].shape == (len(TEXTS), arrays["input_ids"].shape[1], 9)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("deployment", ["ner", "ner_steps"], ids=["one_hop", "steps"])
def test_served_entities_are_the_pipelines_for_a_batch_with_a_long_text(
    served, deployment, protocol
):
    """One request of several texts, one of them three windows long: each text's entities
    are the pipeline's, the late ones of the long text too, and the logits PyTorch's."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    project, server = served
    source = project.path(paths.source_dir(deployment))
    out = infer(server, protocol, deployment, {"TEXT": TEXTS})
    found = [json.loads(value[0]) for value in out["ENTITIES"]]
    reference = hf_pipeline(source)
    for text, entities in zip(TEXTS, found):
        assert_same_entities(entities, reference(text), text)
    tail = TEXTS[4].index("at the very end")
    late = [(e["entity_group"], e["word"]) for e in found[4] if e["start"] > tail]
    assert late == [("PER", "ann smith"), ("LOC", "new york")]
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert len(tokenizer(TEXTS[4])["input_ids"]) > 2 * MAX_SEQ
    short = [t for t in TEXTS if t != TEXTS[4]]
    batch = tokenizer(short, padding=True, return_tensors="pt")
    with torch.inference_mode():
        model = AutoModelForTokenClassification.from_pretrained(source).eval()
        logits = model(**batch).logits.numpy()
    served_logits = np.delete(out["LOGITS"], 4, axis=0)[:, : logits.shape[1]]
    mask = batch["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(served_logits[mask], logits[mask], atol=1e-4, rtol=1e-3)


@pytest.mark.server
@pytest.mark.parametrize("deployment", ["ner", "ner_steps"], ids=["one_hop", "steps"])
def test_requests_sent_together_get_the_entities_they_get_alone(served, deployment):
    _, server = served
    requests = [{"TEXT": [t]} for t in TEXTS] * 2
    alone = [infer(server, "grpc", deployment, r)["ENTITIES"].tolist() for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: infer(server, "grpc", deployment, r), requests))
    assert [t["ENTITIES"].tolist() for t in together] == alone


@pytest.mark.server
@pytest.mark.parametrize("deployment", ["ner", "ner_steps"], ids=["one_hop", "steps"])
def test_texts_whose_windows_overflow_the_max_batch_are_a_bad_request(served, deployment):
    _, server = served
    long = np.array([[TEXTS[4].encode()]] * 3, dtype=object)  # 3 texts x 3 windows > 8
    error = raw_request(server, deployment, [("TEXT", [3, 1], "BYTES", long)])
    assert "[400]" in error and "windows of 128 tokens" in error and "at most 8" in error
    assert raw_request(server, deployment, [("TEXT", [1, 1], "BYTES", text_array(1))]) == ""


@pytest.fixture(scope="module")
def minilm_ner(tmp_path_factory, minilm_dir):
    """MiniLM's real weights with a seeded token-classification head (dslim's labels), built
    and served: a head that fits, on weights that were trained."""
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification

    from tasks.server import EmbeddedTritonServer
    from tests.helpers.models import NER_LABELS
    from tests.helpers.project import copy_project

    torch.manual_seed(6)
    labels = dict(enumerate(NER_LABELS))
    model = BertForTokenClassification.from_pretrained(
        minilm_dir, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.3)  # spread: several labels win somewhere
    checkpoint = tmp_path_factory.mktemp("minilm-ner")
    model.save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(checkpoint)
    project = copy_project(tmp_path_factory.mktemp("ner-minilm") / "project")
    project.doit("task=ner", f"model={checkpoint}", "batch=1,4,8", f"seq=1,64,{MAX_SEQ}")
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        yield project, server


@pytest.mark.server
def test_on_minilms_real_weights_the_served_entities_are_the_pipelines(minilm_ner):
    project, server = minilm_ner
    out = infer(server, "grpc", "ner", {"TEXT": TEXTS})
    found = [json.loads(value[0]) for value in out["ENTITIES"]]
    reference = hf_pipeline(project.path(paths.source_dir("ner")))
    for text, entities in zip(TEXTS, found):
        assert_same_entities(entities, reference(text), text)
    assert sum(len(e) for e in found) > len(TEXTS)  # the head finds groups to compare
