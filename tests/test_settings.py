"""Settings are validated at the door: each bad value fails with a message naming the fix."""

from __future__ import annotations

import json
import re

import pytest

from tasks import catalog, paths
from tasks.errors import SettingsError
from tasks.settings import Bench, Endpoints, Profile, Serving, Storage
from tasks.variables import VARIABLES, with_variables_table
from tests.helpers.stages import settings_from


def test_defaults_build_minilm_encode_on_the_python_backend():
    settings = settings_from()
    assert settings.task.name == "encode"
    assert settings.source.ref == "sentence-transformers/all-MiniLM-L6-v2"
    assert not settings.source.is_local
    assert settings.name == "encode"
    assert settings.backend == "python"  # no TensorRT here
    assert settings.precision == "fp32"
    assert settings.batch.points() == (1, 8, 32)
    assert settings.seq.points() == (1, 128, 512)
    assert settings.shape_points() == [(1, 1), (8, 128), (32, 512)]
    assert settings.one_hop  # the python backend: one model tokenizes, infers, answers
    assert settings.triton_models == {"ensemble": "encode", "model": "encode_model"}


@pytest.mark.parametrize("task", sorted(catalog.TASKS))
def test_each_task_has_its_default_model_and_name(task):
    settings = settings_from(task=task)
    assert settings.source.ref == catalog.TASKS[task].default_model
    assert settings.name == task


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"task": "summarize"}, "task=summarize: unknown task; choose one of seqcls, qa, t5, "),
        ({"seq": "1,512,128"}, "seq=1,512,128: MIN,OPT,MAX must satisfy MIN <= OPT <= MAX"),
        ({"batch": "0"}, "batch=0: sizes must be at least 1"),
        ({"batch": "1,8"}, "batch=1,8: expected MIN,OPT,MAX as three whole numbers"),
        ({"seq": "a,b,c"}, "seq=a,b,c: expected MIN,OPT,MAX"),
        (
            {"precision": "fp16", "recipe": "int8-dynamic"},
            "recipe=int8-dynamic makes int8, not precision=fp16; choose one of fp16-autocast",
        ),
        ({"precision": "int3"}, "precision=int3: unknown precision; choose one of fp32, fp16"),
        ({"backend": "tensorrt"}, "backend=tensorrt: TensorRT and an NVIDIA GPU are needed"),
        ({"backend": "tflite"}, "backend=tflite: unknown backend"),
        ({"model": "/no/such/model"}, "model=/no/such/model: this directory does not exist"),
        ({"model": "./missing"}, "model=./missing: this directory does not exist"),
        ({"name": "my model"}, "name=my model: use letters, digits"),
        ({"name": "qa_post"}, "name=qa_post: names ending in _tokenizer, _model, _generate, _post"),
        (
            {"task": "t5", "backend": "onnxruntime", "decoder": "inline"},
            "decoder=inline: ONNX Runtime inside the generate model is backend=python; "
            "backend=onnxruntime serves each exported file as a Triton model (decoder=models)",
        ),
        ({"task": "t5", "decoder": "bls"}, "decoder=bls: unknown decoder; choose one of inline"),
        ({"decoder": "models"}, "decoder=models: only generation tasks (t5, causallm) have"),
        ({"task": "t5", "decoder": "slots"}, "decoder=slots: a causal LM's graph (task=causallm)"),
        (
            {"task": "causallm", "decoder": "slots", "precision": "int8"},
            "decoder=slots with precision=int8: the slot decoder is built in fp32",
        ),
        ({"loadgen": "locust"}, "loadgen=locust: unknown loadgen; choose one of python, perf_"),
        ({"suite": "quick"}, "suite=quick: unknown suite; choose one of lean, slow, all"),
        ({"replicas": "0"}, "replicas=0: expected a whole number from 1 to 16"),
        (
            {"replicas": "2", "server": "docker"},
            "replicas=2: replicas are embedded servers behind nginx; drop server=docker",
        ),
    ],
)
def test_bad_values_fail_with_a_message_naming_value_and_fix(variables, message):
    with pytest.raises(SettingsError) as caught:
        settings_from(**variables)
    assert str(caught.value).startswith(message)


def test_a_directory_without_config_json_is_refused(tmp_path):
    with pytest.raises(SettingsError, match=r"no config\.json"):
        settings_from(model=str(tmp_path))


def test_local_model_is_used_as_is_and_fingerprinted(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    settings = settings_from(model=str(tmp_path), task="seqcls", name="mine")
    assert settings.source.local == tmp_path
    before = settings.source.fingerprint()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "x": 1}))
    assert settings.source.fingerprint() != before  # a changed model rebuilds


def test_a_max_sequence_beyond_the_position_embeddings_is_impossible(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "roberta", "max_position_embeddings": 130, "pad_token_id": 1})
    )
    with pytest.raises(SettingsError, match=r"seq=1,64,256: the model takes at most 128 tokens"):
        settings_from(model=str(tmp_path), seq="1,64,256")
    assert settings_from(model=str(tmp_path), seq="1,64,128").seq.max == 128


def test_the_default_seq_is_fitted_to_the_model_and_says_so(tmp_path, capsys):
    for model_type, positions, fitted in (
        ("llama", 256, 256),
        ("opt", 300, 300),
        ("gpt2", 2048, 512),
    ):
        (tmp_path / "config.json").write_text(
            json.dumps({"model_type": model_type, "max_position_embeddings": positions})
        )
        seq = settings_from(model=str(tmp_path), task="causallm").seq
        assert seq.points() == (1, min(128, fitted), fitted), model_type
    said = capsys.readouterr().err
    assert "seq: the default 1,128,512 is cut to 1,128,256: the model takes at most 256" in said
    assert "1,128,300" in said and "to 1,128,512" not in said
    roberta = {"model_type": "roberta", "max_position_embeddings": 66, "pad_token_id": 1}
    (tmp_path / "config.json").write_text(json.dumps(roberta))
    assert settings_from(model=str(tmp_path)).seq.points() == (1, 64, 64)


def test_a_single_number_is_a_fixed_size():
    assert Profile.parse("batch", "4").points() == (4, 4, 4)


def test_serving_and_bench_knobs_are_validated_at_the_door():
    chosen = settings_from(
        queue_delay_us="2000",
        instances="2",
        ort_threads="1",
        pad_multiple="16",
        stream_interval="4",
        concurrency="1,4",
        seconds="0.5",
    )
    assert chosen.serving.as_dict() == {
        "queue_delay_us": 2000,
        "instances": 2,
        "ort_threads": 1,
        "pad_multiple": 16,
        "gpus": (),
        "ort_spin": 1,
        "batch_waste": 2.0,
        "max_queue": 0,
        "queue_timeout_ms": 0,
        "stream_interval": 4,
        "one_hop": 1,
    }
    assert chosen.bench.concurrency == (1, 4) and chosen.bench.seconds == 0.5
    for variables, message in [
        ({"instances": "0"}, "instances=0: expected a whole number from 1 to 64"),
        ({"concurrency": "1,x"}, "concurrency=x: expected a whole number from 1 to 256"),
        ({"seconds": "-2"}, "seconds=-2: expected seconds per point"),
        ({"pad_multiple": "0"}, "pad_multiple=0: expected a whole number from 1 to 512"),
        ({"one_hop": "2"}, "one_hop=2: expected a whole number from 0 to 1"),
        (
            {"stream_interval": "0"},
            "stream_interval=0: expected auto or a whole number from 1 to 1024",
        ),
    ]:
        with pytest.raises(SettingsError, match=message):
            settings_from(**variables)


@pytest.mark.parametrize(
    ("variables", "decoder", "models"),
    [
        ({}, "inline", ["t5_tokenizer", "t5_generate", "t5_stream", "t5"]),
        (
            {"decoder": "models"},
            "models",
            [
                "t5_tokenizer",
                "t5_encoder",
                "t5_decoder",
                "t5_decoder_past",
                "t5_generate",
                "t5_stream",
                "t5",
            ],
        ),
        ({"backend": "onnxruntime"}, "models", None),
    ],
)
def test_generation_decodes_inline_on_python_and_through_models_elsewhere(
    variables, decoder, models
):
    settings = settings_from(task="t5", **variables)
    assert settings.decoder == decoder
    if models is not None:
        assert list(settings.triton_models.values()) == models


def test_python_backend_batching_knobs_are_validated_at_the_door():
    assert settings_from(ort_spin="0", batch_waste="1.5").serving.batch_waste == 1.5
    for variables, message in [
        ({"ort_spin": "2"}, "ort_spin=2: expected a whole number from 0 to 1"),
        ({"max_queue": "-1"}, "max_queue=-1: expected a whole number from 0"),
        ({"batch_waste": "0.5"}, "batch_waste=0.5: expected a factor from 1"),
        ({"batch_waste": "lots"}, "batch_waste=lots: expected a factor from 1"),
    ]:
        with pytest.raises(SettingsError, match=message):
            settings_from(**variables)


@pytest.mark.parametrize(
    ("backend", "precision", "variables", "message"),
    [
        (
            "tensorrt",
            "nf4",
            {},
            "NF4 and FP4 are ONNX Runtime's MatMulBnb4",
        ),
        ("tensorrt", "fp4", {}, "use backend=onnxruntime or backend=python, or precision=int8"),
        (
            "tensorrt",
            "int8",
            {"recipe": "int8-dynamic"},
            "recipe=int8-dynamic makes ONNX Runtime's own quantized operators, which TensorRT "
            "cannot build; use recipe=int8-modelopt",
        ),
        ("tensorrt", "int4", {"recipe": "int4"}, "use recipe=int4-awq (ModelOpt's Q/DQ)"),
        ("tensorrt", "int8", {"block_size": "64"}, "only 4-bit recipes take a block size"),
        ("python", "int8", {"recipe": "nf4"}, "recipe=nf4 makes nf4, not precision=int8"),
        ("python", "int8", {"recipe": "best"}, "recipe=best: unknown; choose one of"),
        ("python", "int4", {"block_size": "20"}, "block_size=20: a power of two"),
        ("python", "fp32", {"recipe": "int8-dynamic"}, "only precisions made from the fp32 file"),
        ("python", "int8", {"block_size": "32"}, "only 4-bit recipes take a block size"),
    ],
)
def test_quantization_settings_fail_at_the_door_naming_the_fix(
    backend, precision, variables, message
):
    from tasks.settings import quantization

    with pytest.raises(SettingsError, match=re.escape(message)):
        quantization(precision, backend, variables)


def test_a_quantized_precision_of_a_task_without_gates_fails_at_the_door(monkeypatch):
    """Parity judges a quantized model by its task's gates: a task with none is refused."""
    monkeypatch.delitem(catalog.GATES, "seqcls")
    for precision in catalog.QUANTIZED:
        with pytest.raises(SettingsError) as caught:
            settings_from(task="seqcls", precision=precision, backend="python")
        message = str(caught.value)
        assert message.startswith(f"precision={precision}: task=seqcls has no quantization gate")
        assert "use precision=fp32" in message and "\n" not in message
    assert settings_from(task="seqcls").precision == "fp32"


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(SettingsError, match=r"precision=int2: .*fp32, fp16, int8, int4, nf4, fp4"):
        settings_from(precision="int2")


def test_quantized_precisions_choose_their_recipe_and_block():
    chosen = settings_from(precision="int4", task="causallm")
    assert chosen.recipe.name == "int4" and chosen.block_size == 32 and chosen.quantized
    assert chosen.model_file("decoder_model").parent.name == "quant"
    assert settings_from(precision="nf4", task="causallm").block_size == 64
    assert settings_from(precision="int8").recipe.method == "dynamic"


def test_tensorrt_takes_modelopt_recipes_and_its_block_size():
    from tasks.settings import quantization

    def on_tensorrt(precision, **variables):
        return quantization(precision, "tensorrt", variables)

    recipe, block = on_tensorrt("int8")
    assert (recipe.name, recipe.method, block) == ("int8-modelopt", "modelopt", 0)
    assert recipe.high_precision == "fp16"  # ModelOpt's fp16, not a builder flag
    recipe, block = on_tensorrt("int4")
    assert (recipe.name, block) == ("int4-awq", 128)
    assert on_tensorrt("int4", block_size="64")[1] == 64
    # ModelOpt's Q/DQ files also run on ONNX Runtime: how they are checked on a CPU host
    assert quantization("int8", "python", {"recipe": "int8-modelopt"})[0].method == "modelopt"


def test_the_docs_table_of_variables_is_made_from_the_table():
    text = paths.VARIABLES_DOC.read_text()
    assert text == with_variables_table(text), "run: python -m tasks.variables"
    for var in VARIABLES.values():
        assert f"| `{var.name}` | {var.shown_default} | {var.help} |" in text
        assert "|" not in var.help + var.shown_default, var.name  # one cell each


def test_doit_test_leaves_out_the_slow_tests_unless_told(monkeypatch):
    from tasks import test as stage

    for given, marks in (({}, "'not slow'"), ({"suite": "slow"}, "slow"), ({"suite": "all"}, "''")):
        monkeypatch.setattr(stage, "command_line", lambda given=given: given)
        assert f" -m {marks} " in stage.task_test()["actions"][0]


def test_dodo_lists_every_variable_in_the_tables_order():
    import ast

    doc = ast.get_docstring(ast.parse((paths.ROOT / "dodo.py").read_text()))
    listed = re.search(
        r"Variables \(NAME=VALUE\): (.*?)\.\s+See\s+docs/variables", doc, re.S
    ).group(1)
    assert [n.split("=")[0] for n in re.split(r",\s+", listed)] == list(VARIABLES)


def test_every_default_parses_and_a_field_default_is_its_variables():
    for var in VARIABLES.values():
        if var.default is not None:
            var.parse(var.name, var.default)
    for cls in (Endpoints, Serving, Storage, Bench):
        for name, value in cls().__dict__.items():
            assert value == VARIABLES[name].read({}), name


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Serving(instances=0), "instances=0: expected a whole number from 1 to 64"),
        (lambda: Serving(batch_waste=0.5), "batch_waste=0.5: expected a factor from 1"),
        (lambda: Serving(gpus=(1, 1)), "gpus=1,1: each GPU id once"),
        (lambda: Bench(seconds=-2.0), "seconds=-2: expected seconds per point"),
        (lambda: Bench(concurrency=(1, 0)), "concurrency=0: expected a whole number from 1"),
        (lambda: Bench(loadgen="locust"), "loadgen=locust: unknown loadgen"),
        (lambda: Endpoints(http_port=0), "http_port=0: a port is a number from 1 to 65535"),
        (lambda: Endpoints(grpc_port=8000), "http_port=8000 grpc_port=8000 metrics_port=8002"),
    ],
)
def test_a_dataclass_built_in_code_fails_as_the_command_line_does(build, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        build()


def test_values_that_do_not_go_together_fail_when_built_in_code():
    from dataclasses import replace

    chosen = settings_from()
    with pytest.raises(SettingsError, match="precision=fp16 with recipe=none: int8, int4"):
        replace(chosen, precision="fp16")
    with pytest.raises(SettingsError, match="gpus=0: the python backend runs on CPU"):
        replace(chosen, serving=Serving(gpus=(0,)))


def test_a_misspelt_variable_is_refused_naming_the_known_ones():
    with pytest.raises(SettingsError, match="tsk=qa: unknown variable; use one of task, model"):
        settings_from(tsk="qa")


@pytest.mark.parametrize(
    ("repo", "message"),
    [
        ("gs://b/p", "repo=gs://b/p: only S3 is supported; pass repo=s3://BUCKET/PREFIX"),
        ("s3://B_ad/p", "repo=s3://B_ad/p: 'B_ad' is not an S3 bucket name"),
        ("s3://ok-bucket/a b", "repo=s3://ok-bucket/a b: Triton reads prefixes of letters"),
    ],
)
def test_a_bad_repo_is_refused_at_the_door(repo, message):
    with pytest.raises(SettingsError, match="^" + re.escape(message)):
        settings_from(repo=repo)


def test_an_s3_repo_is_translated_for_a_custom_endpoint():
    location = settings_from(repo="s3://models/prod/v1/").storage.location
    assert (location.bucket, location.prefix) == ("models", "prod/v1")
    assert location.triton_path(None) == "s3://models/prod/v1"
    assert location.triton_path("http://127.0.0.1:9000") == "s3://127.0.0.1:9000/models/prod/v1"
    assert (
        location.triton_path("https://s3.example") == "s3://https://s3.example:443/models/prod/v1"
    )


def test_poll_needs_a_published_repository():
    with pytest.raises(SettingsError, match=r"^poll=5: polling watches a published repository"):
        settings_from(poll="5")
    assert settings_from(repo="s3://models/prod", poll="5").storage.poll == 5


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_fp16_is_made_from_the_fp32_file_on_every_backend(backend):
    chosen = settings_from(precision="fp16", backend=backend, task="ner")
    assert (chosen.recipe.name, chosen.recipe.method) == ("fp16-autocast", "autocast")
    assert chosen.model_file().parent.name == "quant" and not chosen.quantized
    assert chosen.tolerance == catalog.TOLERANCES["fp16"]
    with pytest.raises(SettingsError, match="block_size=32: only 4-bit recipes take"):
        settings_from(precision="fp16", block_size="32")
