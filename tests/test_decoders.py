"""Decoders optimum does not list, built by the generic exporter with the parity gate and
served by a real tritonserver: greedy output equal to generate(), token for token.

Slow (a build each); tests/test_generation.py keeps one such family (starcoder2) lean."""

from __future__ import annotations

import json

import pytest

from tasks import paths
from tests.helpers.project import copy_project
from tests.test_generation import PROMPTS, SHAPES, generate, hf_generate

pytestmark = [pytest.mark.server, pytest.mark.slow]

DEPLOYMENTS = {  # name: (model type, more variables)
    "glm4": ("glm4", ()),
    "cohere2": ("cohere2", ()),  # sliding and full layers, window 8: passed by every prompt
    "ministral": ("ministral", ()),
    "mixtral": ("mixtral", ()),  # mixture of experts: the fixed loop over experts
    "qwen2moe": ("qwen2_moe", ()),  # ... with a gated shared expert
    "llamatorch": ("llama", ("exporter=torch",)),  # a type optimum lists, asked for torch
}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, decoder_models):
    from tasks.server import EmbeddedTritonServer

    project = copy_project(tmp_path_factory.mktemp("decoders") / "project")
    outputs = {}
    for name, (model_type, more) in DEPLOYMENTS.items():
        model = f"model={decoder_models(model_type)}"
        run = project.doit("task=causallm", model, f"name={name}", *SHAPES, *more)
        outputs[name] = run.output
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        yield project, server, outputs


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_served_greedy_output_of_any_family_equals_generate(decoders, decoder_models, name):
    project, server, outputs = decoders
    model_type, _ = DEPLOYMENTS[name]
    assert "onnx: exporter torch (" in outputs[name]  # the build says which path ran, and why
    _, ids = generate(server, name, PROMPTS, MAX_NEW_TOKENS=10)  # lengths differ: batched
    for prompt, served in zip(PROMPTS, ids):
        assert served == hf_generate(decoder_models(model_type), "causallm", prompt, 10), prompt
    report = json.loads(project.path(paths.parity_report(name)).read_text())
    assert report["generation"]["equal"] is True


def test_changing_the_exporter_exports_again(decoders, decoder_models):
    project, _, _ = decoders
    model = f"model={decoder_models('llama')}"
    run = project.doit("task=causallm", model, "name=llamatorch", *SHAPES, "exporter=auto", "onnx")
    assert "onnx:llamatorch" in run.executed
    assert "onnx: exporter optimum (optimum lists 'llama'" in run.output
