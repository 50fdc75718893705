"""Decoders optimum does not list, built by the generic exporter with the parity gate, and
Qwen2 and Mistral with a sliding window shorter than their positions, which optimum lists but
whose window its files do not keep (so `exporter=auto` takes torch's), served by a real
tritonserver: greedy output equal to generate(), token for token.

Slow (a build each); tests/test_generation.py keeps one such family (starcoder2) lean."""

from __future__ import annotations

import json

import pytest

from tasks import catalog, paths
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
    "qwen2": ("qwen2", ()),  # grouped-query attention, biased q/k/v; window 8: torch's
    "mistral": ("mistral", ()),  # grouped-query attention; window 8: torch's
}
# the same llama with its weights beside each ONNX file (external data), on both paths: the
# limit lowered for the onnx stage by its internal knob, as a model past 2 GiB would be
EXTERNAL = {"llamaexternal": "exporter=torch", "llamaexternalopt": "exporter=optimum"}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, decoder_models):
    from tasks.server import EmbeddedTritonServer

    project = copy_project(tmp_path_factory.mktemp("decoders") / "project")
    outputs = {}
    for name, (model_type, more) in DEPLOYMENTS.items():
        model = f"model={decoder_models(model_type)}"
        run = project.doit("task=causallm", model, f"name={name}", *SHAPES, *more)
        outputs[name] = run.output
    knob = {catalog.EXTERNAL_DATA_BYTES_VARIABLE: "1"}
    for name, exporter in EXTERNAL.items():
        model = f"model={decoder_models('llama')}"
        run = project.doit(
            "task=causallm", model, f"name={name}", *SHAPES, exporter, environment=knob
        )
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


@pytest.mark.parametrize("name", sorted(EXTERNAL))
def test_weights_beside_the_onnx_files_build_and_serve_the_same_answer(decoders, name):
    project, server, outputs = decoders
    assert "each part's weights go to <part>.onnx.data beside it" in outputs[name]
    for part in catalog.TASKS["causallm"].onnx_parts:
        record = json.loads(project.path(paths.onnx_io(name, part)).read_text())
        assert record["external_data"]["file"] == f"{part}.onnx.data"
        shipped = project.path(paths.repo_version_file(f"{name}_generate", f"{part}.onnx.data"))
        assert shipped.stat().st_size == record["external_data"]["size"]
    report = json.loads(project.path(paths.parity_report(name)).read_text())
    assert report["generation"]["equal"] is True
    _, ids = generate(server, name, PROMPTS, MAX_NEW_TOKENS=10)
    assert ids == generate(server, "llamatorch", PROMPTS, MAX_NEW_TOKENS=10)[1]
