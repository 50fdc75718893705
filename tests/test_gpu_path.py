"""The TensorRT serving path, proven as far as a machine without TensorRT or a GPU allows:
the memory the engines reserve (profile arithmetic), GPU placement and portability of plans,
the builder settings, and the configs that place instances on GPUs."""

from __future__ import annotations

import math

import pytest

from tasks import catalog, plan, profiles, settings
from tasks.errors import SettingsError
from tests.helpers.stages import render_all, settings_from


def opt_125m_io(part: str) -> dict:
    """io.json of OPT-125M's exported decoders (12 layers, 12 heads of 64, vocab 50272), as
    the onnx stage writes it: logits of the last position only."""
    cache = [
        {"name": f"{kind}.{layer}.{half}", "dtype": "float32", "shape": shape}
        for layer in range(12)
        for half in ("key", "value")
        for kind, shape in (
            ("past_key_values", ["batch_size", 12, "past_sequence_length", 64]),
            ("present", ["batch_size", 12, "past_sequence_length + sequence_length", 64]),
        )
    ]
    tokens = ["batch_size", "sequence_length"]
    mask = tokens if part == "decoder_model" else ["batch_size", "past_sequence_length + 1"]
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": tokens},
        {"name": "attention_mask", "dtype": "int64", "shape": mask},
        {"name": "position_ids", "dtype": "int64", "shape": tokens},
    ]
    past = [t for t in cache if t["name"].startswith("past")]
    present = [t for t in cache if t["name"].startswith("present")]
    logits = {"name": "logits", "dtype": "float32", "shape": ["batch_size", 1, 50272]}
    return {
        "inputs": inputs + (past if part == "decoder_with_past_model" else []),
        "outputs": [logits, *present],
    }


def test_memory_reserved_at_load_is_profile_maxima_times_bindings_times_instances():
    chosen = settings_from(task="causallm", instances="2")  # batch 32, seq 512: the defaults
    positions = 2048
    first = profiles.binding_bytes(chosen, "decoder_model", opt_125m_io("decoder_model"), positions)
    with_past = profiles.binding_bytes(
        chosen, "decoder_with_past_model", opt_125m_io("decoder_with_past_model"), positions
    )
    cache = 512 + 512 - 2  # a MAX prompt and MAX new tokens, under the 2048 positions
    layer = 32 * 12 * 64 * 4  # batch x heads x head size x fp32, per cached token
    logits = 32 * 1 * 50272 * 4
    assert first == 3 * 32 * 512 * 8 + logits + 24 * layer * 512
    assert with_past == 32 * 1 * 8 * 2 + 32 * (cache + 1) * 8 + logits + 24 * layer * (
        cache + cache + 1
    )
    reserved = profiles.reserved_per_gpu(
        chosen,
        {p: opt_125m_io(p) for p in chosen.task.onnx_parts},
        {"decoder_model": 500 << 20, "decoder_with_past_model": 500 << 20},
        positions,
    )
    assert reserved == {
        "decoder_model": (500 << 20) + 2 * first,
        "decoder_with_past_model": (500 << 20) + 2 * with_past,
    }
    line = profiles.describe_reservation(chosen, reserved)
    assert line.startswith(f"reserves {sum(reserved.values()) / 2**30:.2f} GiB on each GPU")
    # what docs/gpu.md states for OPT-125M at the defaults, one instance
    assert round(first / 2**30, 2) == 1.13 and round(with_past / 2**30, 2) == 4.50


def test_the_first_steps_logits_are_one_position_not_the_whole_prompt():
    chosen = settings_from(task="causallm")
    shapes = profiles.profile_shapes(
        chosen, "decoder_model", opt_125m_io("decoder_model"), 2048, "output"
    )
    assert shapes["logits"][2] == (32, 1, 50272)  # not 32 x 512 x 50272 (3.3 GB)
    assert shapes["present.0.key"][2] == (32, 12, 512, 64)


def test_a_batch_never_needs_more_cache_than_the_profile_holds():
    """Exhaustively over small profiles: every batch the loop forms from rows the server
    accepts fits the cache the profile was built for."""
    from tasks.generation_parity import load_decoding

    decoding = load_decoding()
    for task, positions in (("causallm", 0), ("causallm", 20), ("t5", 0)):
        chosen = settings_from(task=task, seq="1,4,12")
        limit = profiles.cache_limit(chosen, positions)
        kind = chosen.task.generation
        rows = [
            (length, new)
            for length in range(1, 13)
            for new in range(1, 13)
            if not positions or length + new <= positions
        ]
        lengths = [length for length, _ in rows]
        params = [decoding.RowParams(new) for _, new in rows]
        batches = decoding.cache_batches(kind, lengths, params, limit)
        assert sorted(r for b in batches for r in b) == list(range(len(rows)))
        for batch in batches:
            width = max(lengths[r] for r in batch)
            new = max(params[r].max_new_tokens for r in batch)
            assert decoding.cache_need(kind, width, new) <= limit, (task, positions, batch)
        assert (len(batches) > 1) == bool(positions), (task, positions)


GPUS = [(0, "NVIDIA A100", "8.0"), (1, "NVIDIA A10", "8.6"), (2, "Tesla T4", "7.5")]


def test_a_plan_that_some_gpu_could_not_load_is_refused_naming_the_fix():
    assert plan.placement_problem("none", "8.0", GPUS[:1]) == ""
    problem = plan.placement_problem("none", "8.0", GPUS)
    assert "GPU 1 NVIDIA A10 (8.6), GPU 2 Tesla T4 (7.5)" in problem
    assert "gpus=0" in problem and "trt_compat=ampere_plus" in problem
    assert plan.placement_problem("same_cc", "8.0", GPUS[:2]).startswith("the plan is built")
    assert plan.placement_problem("ampere_plus", "8.0", GPUS[:2]) == ""
    problem = plan.placement_problem("ampere_plus", "8.0", GPUS)
    assert "not on GPU 2 Tesla T4 (7.5)" in problem and "gpus=" in problem


def test_the_builder_config_carries_the_hardware_compatibility_level(monkeypatch):
    chosen = settings_from(batch="1,4,16", seq="8,64,256")
    io = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "s"]}]}
    monkeypatch.setitem(catalog.PROFILE_DIMS, "model", {"batch_size": "batch", "s": "tokens"})
    level = object()  # TensorRT's enum value, which needs TensorRT to exist
    config = plan.make_builder_config(chosen, "model", io, compatibility=level)
    assert config.hardware_compatibility_level is level
    assert plan.make_builder_config(chosen, "model", io).hardware_compatibility_level is None

    class OldTensorRT:  # a TensorRT release without the level asked for
        __version__ = "10.5.0"

        class HardwareCompatibilityLevel:
            NONE, AMPERE_PLUS = 0, 1

    assert plan.compat_level(OldTensorRT, "ampere_plus") == 1
    with pytest.raises(plan.TensorRTError, match=r"trt_compat=same_cc: TensorRT 10\.5\.0 has no"):
        plan.compat_level(OldTensorRT, "same_cc")


def test_gpus_place_the_engines_instances_and_reach_the_config(monkeypatch):
    monkeypatch.setattr(settings, "tensorrt_available", lambda: True)
    chosen = settings_from(task="causallm", gpus="0,2", instances="2", trt_compat="ampere_plus")
    assert chosen.serving.gpus == (0, 2) and chosen.trt_compat == "ampere_plus"
    for part in chosen.task.onnx_parts:
        group = render_all(chosen)[part].instance_group[0]
        assert group.kind == group.KIND_GPU and list(group.gpus) == [0, 2] and group.count == 2
    generate = render_all(chosen)["generate"]
    assert generate.parameters["cache_limit"].string_value == str(
        profiles.cache_limit(chosen, pbtxt_facts_positions())
    )


def pbtxt_facts_positions() -> int:
    from tests.helpers.stages import FACTS

    return FACTS["max_positions"]


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"gpus": "0,x"}, "gpus=x: expected a whole number"),
        ({"gpus": "1,1", "backend": "onnxruntime"}, "gpus=1,1: each GPU id once"),
        ({"gpus": "0"}, "gpus=0: the python backend runs on CPU"),
        ({"trt_compat": "turing"}, "trt_compat=turing: unknown trt_compat; choose one of none"),
        ({"trt_compat": "ampere_plus"}, "trt_compat=ampere_plus: only TensorRT plans"),
    ],
)
def test_gpu_variables_are_validated_at_the_door(variables, message):
    with pytest.raises(SettingsError, match=message):
        settings_from(**variables)


def test_plan_staleness_includes_placement_and_compatibility(monkeypatch):
    from tests.helpers.stages import params, tasks_for

    monkeypatch.setattr(settings, "tensorrt_available", lambda: True)
    found = tasks_for(monkeypatch, task="encode", gpus="1", trt_compat="ampere_plus")
    assert params(found["plan:encode"])["trt_compat"] == "ampere_plus"
    # gpus= places instances and re-checks placement; it does not rebuild the engines
    assert "gpus" not in params(found["plan:encode"])
    assert params(found["plan:encode-memory"])["gpus"] == (1,)
    assert found["plan:encode-memory"]["targets"][0] in found["parity:encode"]["file_dep"]


def test_reserved_bytes_round_trip_through_io_dims():
    """A dim written 'a + 1' counts the literal; an unknown term is named."""
    chosen = settings_from(task="causallm", seq="1,4,12")
    io = opt_125m_io("decoder_with_past_model")
    shapes = profiles.profile_shapes(chosen, "decoder_with_past_model", io)
    assert shapes["attention_mask"][2] == (32, 12 + 12 - 2 + 1)
    assert math.prod(shapes["past_key_values.0.key"][2]) == 32 * 12 * 22 * 64


def test_a_bare_unnamed_dim_is_refused_and_a_number_beside_a_name_counts():
    io = {"inputs": [{"name": "x", "dtype": "int64", "shape": ["batch_size", 0]}]}
    with pytest.raises(plan.TensorRTError, match="tensor x has dim 0"):
        profiles.profile_shapes(settings_from(), "model", io)


def test_placement_names_a_build_gpu_when_no_chosen_gpu_matches(monkeypatch):
    problem = plan.placement_problem("none", "8.0", [(1, "NVIDIA A10", "8.6")])
    assert "CUDA_VISIBLE_DEVICES=1" in problem and "gpus=," not in problem
    assert "built on Ampere or later" in plan.placement_problem("ampere_plus", "7.5", GPUS[:1])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert plan.build_gpu(GPUS) == GPUS[2]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert plan.build_gpu(GPUS) == GPUS[0]


def test_gpt2_sized_positions_bound_every_batch_of_accepted_rows():
    """GPT-2: 1024 positions, seq=1,128,1000. A 1000-token prompt asking 24 tokens with a
    3-token prompt asking 1000 would need ~2000 cached tokens against a profile of 1022."""
    from tasks.generation_parity import load_decoding

    decoding = load_decoding()
    chosen = settings_from(task="causallm", seq="1,128,1000")
    limit = profiles.cache_limit(chosen, 1024)
    assert limit == 1022
    lengths, params = [1000, 3], [decoding.RowParams(24), decoding.RowParams(1000)]
    assert decoding.cache_need("causal", 1000, 1000) > limit
    batches = decoding.cache_batches("causal", lengths, params, limit)
    assert batches == [[0], [1]]
    for batch in batches:
        width = max(lengths[r] for r in batch)
        new = max(params[r].max_new_tokens for r in batch)
        assert decoding.cache_need("causal", width, new) <= limit


def test_the_gpu_docs_state_the_reserved_memory_and_the_variables():
    from tasks import paths

    docs = (paths.DOCS / "gpu.md").read_text()
    gpu = docs.split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    for fact in ("GPU memory", "GiB", "instances", "`gpus`", "trt_compat=", "PYTHON_VERSION"):
        assert fact in gpu, fact


def test_serve_refuses_plans_built_for_other_gpus_naming_the_fix(tmp_path):
    """The repo stage puts each plan's record beside it; serve reads it before starting."""
    import json

    version = tmp_path / "encode_model" / "1"
    version.mkdir(parents=True)
    (version / "model.plan").write_bytes(b"engine")
    record = {"compute_capability": "8.0", "trt_compat": "none", "gpus": []}
    (version / catalog.PLAN_RECORD_NAME).write_text(json.dumps(record))
    assert plan.served_plan_problems(tmp_path, GPUS[:1]) == []
    problems = plan.served_plan_problems(tmp_path, GPUS)
    assert len(problems) == 1 and problems[0].startswith("encode_model: the plan is built")
    assert "gpus=0" in problems[0] and "rebuild its plan on this host" in problems[0]
    record["gpus"] = [0]  # built to run on GPU 0 only
    (version / catalog.PLAN_RECORD_NAME).write_text(json.dumps(record))
    assert plan.served_plan_problems(tmp_path, GPUS) == []
    assert plan.served_plan_problems(tmp_path, []) == []  # no GPU to judge by: Triton says


def test_the_repository_ships_each_plan_with_its_record(monkeypatch):
    from tasks import paths
    from tests.helpers.stages import tasks_for

    monkeypatch.setattr(settings, "tensorrt_available", lambda: True)
    found = tasks_for(monkeypatch, task="encode")
    model = found["repo:encode_model"]
    assert paths.plan_record("encode") in model["file_dep"]
    assert paths.repo_version_file("encode_model", catalog.PLAN_RECORD_NAME) in model["targets"]
