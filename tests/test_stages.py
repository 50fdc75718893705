"""Unit tests on what the stage generators yield and on the configs they render."""

from __future__ import annotations

import json

import pytest

from tasks import catalog, paths, pbtxt, plan, profiles, settings
from tasks.bench import task_bench
from tests.helpers.stages import FACTS, IO, ios_of, params, render_all, settings_from, tasks_for


def test_the_dag_without_tensorrt_has_no_plan(monkeypatch):
    found = tasks_for(monkeypatch)
    assert not [t for t in found if t.startswith("plan:")]
    assert set(found) == {
        "download:encode",
        "onnx:encode",
        "parity:encode",
        "pbtxt:encode",
        "pbtxt:encode_model",  # the one hop: tokenizer, ONNX Runtime (and answers) in one
        "pbtxt:encode-wiring",
        "repo:encode",
        "repo:encode_model",
    }


def test_every_task_has_file_targets_under_the_artifact_folders(monkeypatch):
    for name, task in tasks_for(monkeypatch).items():
        assert task["targets"], name
        for target in task["targets"]:
            assert any(root in target.parents for root in paths.ARTIFACT_ROOTS), (name, target)
            assert target.suffix or target.name.startswith("."), (name, target)  # files
        stage = name.split(":")[0]
        module = {"onnx": "export"}.get(stage, stage)
        assert paths.stage_module(module) in task["file_dep"], name
        assert task["clean"], name


@pytest.mark.parametrize("task", sorted(catalog.TASKS))
def test_each_template_is_a_dependency_of_exactly_the_task_that_renders_it(monkeypatch, task):
    found = tasks_for(monkeypatch, task=task)
    chosen = settings.current()
    for part in chosen.triton_models:
        template = paths.template(pbtxt.template_name(chosen, part))
        users = [n for n, t in found.items() if template in t["file_dep"]]
        assert users == [f"pbtxt:{settings.current().triton_models[part]}"]


def test_shapes_reach_only_the_shape_dependent_tasks(monkeypatch):
    before = tasks_for(monkeypatch)
    after = tasks_for(monkeypatch, seq="1,64,256")
    changed = {
        n for n in before if "uptodate" in before[n] and params(before[n]) != params(after[n])
    }
    assert changed == {
        "parity:encode",
        "pbtxt:encode",
        "pbtxt:encode_model",
    }


def test_repo_model_waits_for_parity_and_python_backend_ships_its_code(monkeypatch):
    found = tasks_for(monkeypatch)
    model = found["repo:encode_model"]
    assert paths.parity_report("encode") in model["file_dep"]
    assert paths.runtime_model_code("pipeline") in model["file_dep"]
    names = [t.relative_to(paths.MODELS).as_posix() for t in model["targets"]]
    assert names == [
        "encode_model/1/model.onnx",
        "encode_model/1/tokenizer.json",
        "encode_model/1/encoding.py",
        "encode_model/1/answer.py",  # triton/trim/: HIDDEN_STATE at the request's length
        "encode_model/1/llm_in_triton_runtime.py",  # the helpers every python model shares
        "encode_model/1/model.py",
        "encode_model/config.pbtxt",
    ]  # config last
    post = tasks_for(monkeypatch, task="seqcls")["repo:seqcls_model"]
    assert paths.runtime_file("label", "answer.py") in post["file_dep"]
    native = tasks_for(monkeypatch, backend="onnxruntime")
    assert {"repo:encode_tokenizer", "repo:encode_model"} <= set(native)
    assert paths.runtime_model_code("onnx_model") not in native["repo:encode_model"]["file_dep"]


@pytest.mark.parametrize(
    "variables",
    [{}, {"task": "seqcls", "backend": "onnxruntime"}, {"task": "causallm"}, {"task": "qa"}],
)
def test_every_python_model_ships_the_runtime_helpers(monkeypatch, variables):
    repo = {n: t for n, t in tasks_for(monkeypatch, **variables).items() if n.startswith("repo:")}
    python_models = [t for t in repo.values() if any(p.name == "model.py" for p in t["targets"])]
    assert python_models
    for task in python_models:
        assert "llm_in_triton_runtime.py" in [p.name for p in task["targets"]], task["name"]
        assert paths.runtime_helpers() in task["file_dep"], task["name"]  # edited: reinstalled


def test_tensorrt_profile_and_builder_config_come_from_the_settings():
    chosen = settings_from(batch="2,4,16", seq="8,64,256")
    io = IO["encode"]
    shapes = profiles.profile_shapes(chosen, "model", io)
    assert shapes == {
        name: ((2, 8), (4, 64), (16, 256))
        for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    profile = plan.make_profile(chosen, "model", io)
    assert profile["input_ids"].min == (2, 8) and profile["input_ids"].max == (16, 256)
    config = plan.make_builder_config(chosen, "model", io)
    assert config.fp16 is False
    assert [p["attention_mask"].opt for p in config.profiles] == [(4, 64)]


def test_a_dim_without_a_profile_range_is_named():
    io = {"inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["batch_size", "h"]}]}
    with pytest.raises(plan.TensorRTError, match=r"tensor pixel_values has dim 'h'.*PROFILE_DIMS"):
        profiles.profile_shapes(settings_from(), "model", io)


@pytest.mark.parametrize("task", sorted(catalog.TASKS))
def test_rendered_configs_parse_as_triton_model_configs_and_wire_up(task):
    """Native backends: tokenizer -> model -> answers; generation: tokenizer -> generate."""
    backend = "python" if catalog.TASKS[task].generation else "onnxruntime"
    chosen = settings_from(task=task, batch="1,4,16", seq="2,32,128", backend=backend)
    configs = render_all(chosen)
    parts = {c.name: c for p, c in configs.items() if p != "ensemble"}
    assert pbtxt.check_wiring(configs["ensemble"], parts) == []
    ensemble, tokenizer = configs["ensemble"], configs["tokenizer"]
    assert {c.max_batch_size for p, c in configs.items() if p != "postprocess"} == {16}
    assert [i.name for i in ensemble.input if not i.optional] == list(chosen.task.text_inputs)
    post = chosen.task.postprocess
    if chosen.task.generation:
        expected = [t.name for t in catalog.GENERATION_OUTPUTS]
        optional = [t.name for t in catalog.GENERATION_INPUTS]
    else:
        expected = [o.triton_name for o in chosen.task.outputs if o.exposed]
        expected += [t.name for t in (post.outputs if post else ())]
        expected += [out for _, out in (post.trims if post else ())]
        optional = []
    assert [o.name for o in ensemble.output] == expected
    assert [i.name for i in ensemble.input if i.optional] == optional
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        name for part, name in chosen.triton_models.items() if part not in ("ensemble", "stream")
    ]
    assert [o.name for o in tokenizer.output][:2] == ["input_ids", "attention_mask"]
    assert tokenizer.parameters["max_seq"].string_value == "128"
    assert tokenizer.parameters["min_seq"].string_value == "2"


@pytest.mark.parametrize("task", ["t5", "causallm"])
def test_with_decoder_models_the_loop_calls_each_exported_file_through_bls(task):
    chosen = settings_from(task=task, decoder="models", batch="1,4,16")
    configs = render_all(chosen)
    parts = {c.name: c for p, c in configs.items() if p != "ensemble"}
    assert pbtxt.check_wiring(configs["ensemble"], parts) == []
    assert pbtxt.check_step_models(configs["generate"], parts) == []
    steps = json.loads(configs["generate"].parameters["step_models"].string_value)
    assert list(steps) == list(chosen.task.onnx_parts)
    for part, step in steps.items():
        model = configs[part]
        assert step["model"] == model.name == chosen.triton_models[part]
        assert model.backend == "python" and model.max_batch_size == 16
        assert [i.name for i in model.input] == step["inputs"]
    # a step model that does not take what the loop sends is caught before serving
    first = configs[chosen.task.onnx_parts[0]]
    first.input[0].name = "renamed"
    problems = pbtxt.check_step_models(configs["generate"], parts)
    assert len(problems) == 1 and f"calls {first.name}" in problems[0]


def test_every_stage_that_reads_the_checkpoint_facts_lists_their_module(monkeypatch):
    monkeypatch.setattr(settings, "tensorrt_available", lambda: True)
    facts = paths.stage_module("facts")
    found = tasks_for(monkeypatch, task="t5", seq="1,32,64")
    readers = [n for n in found if n.split(":")[0] in ("plan", "pbtxt", "parity")]
    readers = [n for n in readers if not n.endswith("-wiring")]  # reads rendered configs only
    assert {n.split(":")[0] for n in readers} == {"plan", "pbtxt", "parity"}
    for name in readers:
        assert facts in found[name]["file_dep"], name
    assert paths.stage_module("pbtxt") not in found["parity:t5"]["file_dep"]
    assert facts in task_bench()["file_dep"]
    # an encoder's parity reads no checkpoint facts: editing them does not rerun it
    encoder = tasks_for(monkeypatch)
    assert facts not in encoder["parity:encode"]["file_dep"]
    assert facts in encoder["pbtxt:encode"]["file_dep"]  # the tokenizer's pad id
    assert paths.stage_module("compare") in encoder["parity:encode"]["file_dep"]


def test_on_a_tensorrt_host_generation_builds_an_engine_per_part_served_by_bls(monkeypatch):
    monkeypatch.setattr(settings, "tensorrt_available", lambda: True)
    chosen = settings_from(task="t5", seq="1,32,64")
    assert (chosen.backend, chosen.decoder, chosen.precision) == ("tensorrt", "models", "fp32")
    found = tasks_for(monkeypatch, task="t5", seq="1,32,64")
    assert sorted(t for t in found if t.startswith("plan:")) == [
        "plan:t5-decoder_model",
        "plan:t5-decoder_with_past_model",
        "plan:t5-encoder_model",
        "plan:t5-memory",  # prints the GPU memory the engines reserve
    ]
    parity = found["parity:t5"]
    assert {paths.plan_file("t5", p) for p in chosen.task.onnx_parts} <= set(parity["file_dep"])
    decoder = found["repo:t5_decoder_past"]
    assert paths.plan_file("t5", "decoder_with_past_model") in decoder["file_dep"]
    assert paths.repo_version_file("t5_decoder_past", "model.plan") in decoder["targets"]
    generate = found["repo:t5_generate"]
    assert not [f for f in generate["targets"] if f.suffix in (".onnx", ".plan")]
    configs = render_all(chosen)
    engine = configs["decoder_with_past_model"]
    assert engine.platform == "tensorrt_plan" and engine.default_model_filename == "model.plan"
    assert engine.instance_group[0].kind == engine.instance_group[0].KIND_GPU


def test_the_model_config_runs_onnx_runtime_in_the_python_backend():
    chosen = settings_from(batch="1,4,16", queue_delay_us="700", instances="2", one_hop="0")
    model = render_all(chosen)["model"]
    limits = {k: model.parameters[k].string_value for k in ("vocab_size", "max_tokens")}
    assert limits == {"vocab_size": "99", "max_tokens": str(chosen.seq.max)}  # direct requests
    assert model.backend == "python" and model.parameters["model_file"].string_value == "model.onnx"
    assert model.max_batch_size == 16 and model.dynamic_batching.max_queue_delay_microseconds == 700
    assert model.instance_group[0].count == 2


def test_the_generate_config_carries_the_checkpoint_facts():
    generate = render_all(settings_from(task="t5", seq="1,32,64"))["generate"]
    params = {k: v.string_value for k, v in generate.parameters.items()}
    assert params["parts"] == '["encoder_model", "decoder_model", "decoder_with_past_model"]'
    assert params["kind"] == "seq2seq" and params["eos_token_ids"] == "[1]"
    assert params["max_new_tokens_limit"] == "64" and params["max_positions"] == "0"
    assert [i.name for i in generate.input if not i.optional] == ["input_ids", "attention_mask"]
    stream = render_all(settings_from(task="t5", seq="1,32,64"))["stream"]
    assert stream.model_transaction_policy.decoupled
    assert [i.name for i in stream.input if not i.optional] == ["TEXT"]
    generate_params = {k: v.string_value for k, v in generate.parameters.items()}
    assert {k: v.string_value for k, v in stream.parameters.items()} == generate_params


def test_the_stream_config_declares_the_catalogs_generation_outputs(monkeypatch):
    from tritonclient.grpc import model_config_pb2

    def declared(config) -> list[tuple[str, str, list[int]]]:
        return [
            (o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims))
            for o in config.output
        ]

    # a response holds stream_interval steps: a row's text is one string, its token ids one
    # per step
    expected = [("OUTPUT_TEXT", "TYPE_STRING", [1]), ("OUTPUT_IDS", "TYPE_INT64", [-1])]
    for task in ("t5", "causallm"):
        assert declared(render_all(settings_from(task=task))["stream"]) == expected
    more = (*catalog.GENERATION_OUTPUTS, catalog.Tensor("OUTPUT_LOGPROBS", "TYPE_FP32", (-1,)))
    monkeypatch.setattr(catalog, "GENERATION_OUTPUTS", more)
    stream = render_all(settings_from(task="t5"))["stream"]
    assert declared(stream)[-1] == ("OUTPUT_LOGPROBS", "TYPE_FP32", [-1])


def test_a_catalog_fact_the_context_reads_makes_the_configs_stale(monkeypatch):
    """No hand list: PROFILE_DIMS, read by the one hop's context, was missing from it."""
    monkeypatch.setattr(pbtxt, "context_inputs", lambda chosen: (ios_of(chosen), FACTS))
    found = tasks_for(monkeypatch)
    checks = [found[n]["uptodate"][0] for n in ("pbtxt:encode", "pbtxt:encode_model")]
    saved = {}
    for check in checks:  # as doit runs it: stale at first, then up to date with its digest
        assert check(None, {}) is False
        saved[check] = {"_config_changed": check.config_digest}
        assert check(None, saved[check]) is True
    monkeypatch.setattr(catalog, "PROFILE_DIMS", {**catalog.PROFILE_DIMS, "model": {}})
    assert [check(None, saved[check]) for check in checks] == [False, False]
    monkeypatch.undo()
    monkeypatch.setattr(pbtxt, "context_inputs", lambda chosen: (ios_of(chosen), FACTS))
    assert [check(None, saved[check]) for check in checks] == [True, True]
    monkeypatch.setattr(catalog, "MAX_TEXT_BYTES", catalog.MAX_TEXT_BYTES // 2)
    assert [check(None, saved[check]) for check in checks] == [False, False]


def test_the_files_a_context_reads_come_from_the_stages_before(monkeypatch):
    """The digest reads io.json and the checkpoint when doit checks the task; they are file_dep
    so that those stages run first, and their absence means stale, not a crash."""
    found = tasks_for(monkeypatch, task="qa", backend="onnxruntime", name="never_built")
    models = settings.current().triton_models
    assert len(models) == 4  # ensemble, tokenizer, model, post
    for model in models.values():
        task = found[f"pbtxt:{model}"]
        assert paths.onnx_io("never_built", "model") in task["file_dep"]
        assert paths.source_manifest("never_built") in task["file_dep"]
        check = task["uptodate"][0]
        assert check(None, {"_config_changed": "a digest"}) is False
        assert check.config_digest.startswith("unknown: ")


def test_every_template_declares_its_tensors_with_the_shared_macros():
    for template in paths.TEMPLATES_DIR.glob("*.pbtxt.j2"):
        text = template.read_text()
        assert "data_type:" not in text, template.name  # a copied tensor block
        if "input" in text or "output" in text:
            assert '{% import "_tensors.j2" as tensors %}' in text, template.name


def test_encode_dims_come_from_the_onnx_graph():
    configs = render_all(settings_from())
    dims = {o.name: list(o.dims) for o in configs["ensemble"].output}
    assert dims == {"HIDDEN_STATE": [-1, 384], "EMBEDDING": [384]}


ENCODER_TASKS = sorted(name for name, spec in catalog.TASKS.items() if not spec.generation)


@pytest.mark.parametrize("task", ENCODER_TASKS)
def test_on_the_python_backend_one_model_answers_the_ensemble(task):
    chosen = settings_from(task=task, batch="1,4,16", seq="2,32,128")
    configs = render_all(chosen)
    assert set(configs) == {"model", "ensemble"}
    model, ensemble = configs["model"], configs["ensemble"]
    assert pbtxt.check_wiring(ensemble, {model.name: model}) == []
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [f"{task}_model"]
    assert [i.name for i in model.input] == list(chosen.task.text_inputs)
    assert [o.name for o in model.output] == list(chosen.task.answers)
    params = {k: v.string_value for k, v in model.parameters.items()}
    assert params["max_seq"] == "128" and params["min_seq"] == "2"
    assert params["batch_waste"] == str(catalog.BATCH_WASTE)
    outputs = json.loads(params["model_outputs"])
    assert outputs == [[o.onnx_name, o.triton_name] for o in chosen.task.outputs]


def test_an_answer_step_that_reads_token_ids_and_the_tokenizer_gets_them_both_ways():
    """A new row's answer step may read the token ids and ship tokenizer.json: the native post
    step is fed them from the ensemble, the one hop from its own tokenizing, and the one hop's
    folder holds tokenizer.json once."""
    from dataclasses import replace

    from tasks import repo

    base = settings_from(task="seqcls", batch="1,4,16", seq="2,32,128")
    post = base.task.postprocess
    spec = replace(
        base.task,
        postprocess=replace(
            post, inputs=(*post.inputs, "input_ids"), files=(*post.files, "tokenizer.json")
        ),
    )
    one_hop = replace(base, task=spec)
    model = render_all(one_hop)["model"]
    assert json.loads(model.parameters["token_tensors"].string_value) == ["input_ids"]
    (component, _) = repo.components(one_hop)
    filenames = [f for _, f in component.files]
    assert sorted(filenames) == sorted(set(filenames)) and "tokenizer.json" in filenames
    native = replace(base, task=spec, serving=replace(base.serving, one_hop=0))
    configs = render_all(native)
    assert "input_ids" in [i.name for i in configs["postprocess"].input]
    parts = {c.name: c for p, c in configs.items() if p != "ensemble"}
    assert pbtxt.check_wiring(configs["ensemble"], parts) == []


def test_wiring_check_names_what_is_broken():
    configs = render_all(settings_from(task="seqcls", backend="onnxruntime"))
    configs["tokenizer"].output[0].name = "input_idz"
    configs["model"].output[0].dims[:] = [3]
    parts = {c.name: c for p, c in configs.items() if p != "ensemble"}
    problems = pbtxt.check_wiring(configs["ensemble"], parts)
    assert problems == [
        "step 0 (seqcls_tokenizer): model has no output 'input_ids' (has ['attention_mask', "
        "'input_idz', 'token_type_ids'])",
        "step 1 (seqcls_model): input 'input_ids' reads 'input_ids', which nothing produces",
        "step 2 (seqcls_post): 'LOGITS' is TYPE_FP32 [-1, 3] but input 'LOGITS' wants "
        "TYPE_FP32 [-1, 2]",
        "ensemble output 'LOGITS' is declared TYPE_FP32 [-1, 2] but produced as TYPE_FP32 [-1, 3]",
    ]
    del parts["seqcls_post"]
    assert (
        "step 2 (seqcls_post): no such model in the deployment (['seqcls_model', "
        "'seqcls_tokenizer'])" in pbtxt.check_wiring(configs["ensemble"], parts)
    )


def test_a_template_typo_fails_against_the_schema():
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="not a valid Triton model config"):
        pbtxt.parse_config('name: "x"\nmax_batch_sise: 4\n', "config.pbtxt")


def test_a_missing_template_value_fails_the_render():
    from tasks.errors import ConfigError

    native = settings_from(backend="onnxruntime")
    context = pbtxt.render_context(native, {"model": IO["encode"]}, FACTS)
    del context["tokenizer_parameters"]
    with pytest.raises(ConfigError, match="'tokenizer_parameters' is undefined"):
        pbtxt.render("tokenizer", {**context, "model_name": "x"})


def test_a_broken_onnx_file_is_an_error_that_says_how_to_rebuild(tmp_path, monkeypatch):
    from tasks.artifacts import check_onnx
    from tasks.errors import ExportError

    monkeypatch.setattr(paths, "ROOT", tmp_path)
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"\x08\x07garbage that is not a protobuf")
    with pytest.raises(ExportError) as caught:
        check_onnx(broken, "encode")
    message = str(caught.value)
    assert message.startswith("model.onnx is not a valid ONNX model (")
    assert "run doit again to re-export it, or `doit forget onnx:encode` first" in message
    assert "\n" not in message


@pytest.mark.parametrize("task", ["encode", "causallm"])
def test_max_queue_bounds_every_model_that_queues(task):
    configs = render_all(settings_from(task=task, max_queue="16", backend="python"))
    queued = [c for c in configs.values() if c.HasField("dynamic_batching")]
    assert queued
    for config in queued:
        assert config.dynamic_batching.default_queue_policy.max_queue_size == 16, config.name
    unbounded = render_all(settings_from(task=task))
    for config in unbounded.values():
        assert not config.dynamic_batching.HasField("default_queue_policy"), config.name


@pytest.mark.parametrize("task", ["qa", "seqcls"])
def test_a_long_pair_is_cut_as_the_catalog_says(task, minilm_dir):
    """The tokenizer step reads the pair truncation from the rendered config: a task row that
    says only_second keeps its first text whole."""
    from tasks import artifacts

    chosen = settings_from(task=task, seq="1,16,16", one_hop="0")
    tokenizer = render_all(chosen)["tokenizer"]
    params = {k: v.string_value for k, v in tokenizer.parameters.items()}
    assert params["truncation"] == chosen.task.truncation
    encoding = artifacts.load_runtime("tokenizer", "encoding.py")
    params["stride"] = "0"  # one window: the cut itself
    runtime = artifacts.load_runtime("runtime", "runtime.py")
    encoder = encoding.TextEncoder(
        str(minilm_dir / "tokenizer.json"), runtime.Parameters(params, "t"), ["A", "B"], 4
    )
    first = "one two three four five six seven eight"
    rows = encoder.encode([encoder.items([[first], ["a b c d e f g h i j k l"]])])[0].rows
    ids = rows[0][0].ids
    assert len(ids) == 16
    kept_first = rows[0][0].sequence_ids.count(0)
    assert (kept_first == 8) == (chosen.task.truncation == "only_second")
