"""TensorRT 11 without TensorRT: what the plan stage hands Polygraphy (a strongly typed network,
no precision flag, for every precision and recipe TensorRT builds), and no code path using an
API TensorRT 11 removed. TensorRT cannot run here, so these read the real Polygraphy loaders
plan.py makes and the source itself; no plan is built or faked."""

from __future__ import annotations

import re

import pytest

from tasks import catalog, paths, plan, settings
from tests.helpers.stages import IO, params, settings_from, tasks_for

# Every recipe TensorRT builds (a ModelOpt Q/DQ file, or AutoCast's fp16), and fp32.
TENSORRT_BUILDS = [
    ("fp32", None),
    *((r.precision, r.name) for r in catalog.QUANT_RECIPES.values() if "tensorrt" in r.backends),
]
# CreateConfig's precision arguments: weak typing, which TensorRT 11 removed.
PRECISION_FLAGS = ("tf32", "fp16", "bf16", "fp8", "int8")
TOKENS = {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}
IO_OF = {
    "model": IO["encode"],
    **{part: {"inputs": [TOKENS], "outputs": []} for part in catalog.TASKS["causallm"].onnx_parts},
}


def on_tensorrt(monkeypatch, task: str, precision: str, recipe: str | None):
    monkeypatch.setattr(settings, "tensorrt_available", lambda: True)
    variables = {"task": task, "precision": precision, **({"recipe": recipe} if recipe else {})}
    chosen = settings_from(**variables)
    assert chosen.backend == "tensorrt"
    return chosen, variables


@pytest.mark.parametrize(("precision", "recipe"), TENSORRT_BUILDS)
@pytest.mark.parametrize("task", ["encode", "causallm"])
def test_every_plan_is_built_strongly_typed_with_no_precision_flag(
    monkeypatch, task, precision, recipe
):
    chosen, variables = on_tensorrt(monkeypatch, task, precision, recipe)
    found = tasks_for(monkeypatch, **variables)
    for part in chosen.task.onnx_parts:
        config = plan.make_builder_config(chosen, part, IO_OF[part], max_positions=128)
        assert not any(getattr(config, flag) for flag in PRECISION_FLAGS), vars(config)
        assert config.calibrator is None and config.precision_constraints is None
        network = plan.make_network(chosen, part)
        assert network.strongly_typed is True
        # the file's own types decide: the exported fp32 file, or the quantize stage's copy
        source = paths.onnx_file if precision == "fp32" else paths.quant_file
        assert network.path == str(source(chosen.name, part))
        engine = found[f"plan:{plan.plan_task_name(chosen, part)}"]
        assert source(chosen.name, part) in engine["file_dep"]
        assert params(engine)["typing"] == "strong" and "tensorrt" in params(engine)
        assert "builder" not in params(engine)


def test_fp16_on_tensorrt_builds_autocasts_file_which_the_quantize_stage_makes(monkeypatch):
    chosen, variables = on_tensorrt(monkeypatch, "encode", "fp16", None)
    assert (chosen.precision, chosen.recipe.name) == ("fp16", "fp16-autocast")  # the default
    found = tasks_for(monkeypatch, **variables)
    assert paths.quant_file("encode") in found["quantize:encode"]["targets"]
    assert paths.onnx_file("encode") not in found["plan:encode"]["file_dep"]
    # ModelOpt's int8 file carries its fp16 parts itself
    assert settings_from(precision="int8").recipe.high_precision == "fp16"


def test_generation_stays_fp32_on_tensorrt_by_default_and_says_why(monkeypatch):
    for task, kind in (("t5", "seq2seq"), ("causallm", "causal")):
        monkeypatch.setattr(settings, "tensorrt_available", lambda: True)
        defaulted = settings_from(task=task)
        assert defaulted.backend == "tensorrt"
        assert defaulted.precision == "fp32"
        assert catalog.FP16_GENERATION_BLOCKED[kind] in defaulted.precision_note
        assert "precision=fp16 tries it" in defaulted.precision_note
    assert settings_from(task="encode").precision_note == ""


# NVIDIA's list of what TensorRT 11 removed, as regular expressions over our source:
# "Removed Python APIs and Replacements", https://docs.nvidia.com/deeplearning/tensorrt/
#   latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
# "Migrating trtexec Usage from TensorRT 10.x to 11.x" (precision flags, --calib), https://
#   docs.nvidia.com/deeplearning/tensorrt/11.4.1/api/migration/tensorrt-10x-to-11x-trtexec.html
# and Polygraphy's CreateConfig arguments that set those flags (polygraphy/backend/trt/config.py).
REMOVED_IN_TENSORRT_11 = {
    "BuilderFlag precision flags": (
        r"BuilderFlag\.(FP16|INT8|FP8|BF16|INT4|FP4|OBEY_PRECISION_CONSTRAINTS"
        r"|PREFER_PRECISION_CONSTRAINTS)\b"
    ),
    "INT8 calibrators": r"\bIInt8(Legacy|Entropy|MinMax)?Calibrator2?\b|\bCalibrationAlgoType\b",
    "builder config calibration": (
        r"\bint8_calibrator\b|\b(set|get)_calibration_profile\b|\bquantization_flags?\b"
        r"|\b(set|get|clear)_quantization_flag\b"
    ),
    "platform queries": r"\bplatform_has_(fast_fp16|fast_int8|tf32)\b",
    "algorithm selectors": r"\bIAlgorithm(Selector|Context|IOInfo|Variant)?\b",
    "engine device memory size": r"\bdevice_memory_size(_v2|_for_profile)?\b",
    "Polygraphy weak typing": (
        r"CreateConfig\([^)]*\b(fp16|int8|bf16|fp8|calibrator|precision_constraints)\s*="
    ),
    "precision flags passed as keywords": r"[\"'](fp16|int8|bf16|fp8)[\"']\s*:\s*True",
    "Polygraphy calibrator": r"\bpolygraphy\.backend\.trt\b.*\bCalibrator\b|\bCalibrator\(",
    "trtexec precision flags": r"--(fp16|int8|bf16|fp8|int4|best|calib)\b(?!-)",
    "weakly typed Polygraphy network": r"strongly_typed\s*=\s*(False|None)",
}


def scanned_files() -> list:
    """Every code path: the build (tasks/), what runs in Triton (triton/), the templates and the
    images' Dockerfile and compose file."""
    files = [
        *paths.TASKS_DIR.rglob("*.py"),
        *paths.TRITON_DIR.rglob("*.py"),
        *paths.TEMPLATES_DIR.rglob("*.j2"),
        paths.DOCKERFILE,
        paths.COMPOSE_FILE,
    ]
    return [f for f in files if f.is_file()]


def removed_uses(text: str) -> list[str]:
    return [
        what
        for what, pattern in REMOVED_IN_TENSORRT_11.items()
        if re.search(pattern, text, flags=re.S if what.startswith("Polygraphy") else 0)
    ]


def test_no_code_path_uses_an_api_tensorrt_11_removed():
    found = {
        str(f.relative_to(paths.ROOT)): uses
        for f in scanned_files()
        if (uses := removed_uses(f.read_text(encoding="utf-8")))
    }
    assert found == {}
    assert paths.stage_module("plan") in scanned_files()


@pytest.mark.parametrize(
    "line",
    [
        "config.set_flag(trt.BuilderFlag.FP16)",
        "config.set_flag(trt.BuilderFlag.INT8)",
        "class Calib(trt.IInt8EntropyCalibrator2): ...",
        "config.int8_calibrator = calib",
        "if builder.platform_has_fast_fp16:",
        "CreateConfig(\n    fp16=True, profiles=[p])",
        "CreateConfig(int8=True, calibrator=Calibrator(data))",
        "NetworkFromOnnxPath(path, strongly_typed=None)",
        "trtexec --onnx=model.onnx --fp16 --saveEngine=model.plan",
        "engine.device_memory_size",
        'return ({"fp16": True} if settings.precision == "fp16" else {}), False',
    ],
)
def test_the_scan_finds_each_kind_of_removed_use(line):
    """The scan above is only as good as its patterns: each catches what it names."""
    assert removed_uses(line)


@pytest.mark.parametrize(
    "line",
    [
        "CreateConfig(profiles=[profile], memory_pool_limits=limits)",
        "NetworkFromOnnxPath(str(path), strongly_typed=True)",
        'low_precision_type="fp16"',
        'high_precision_dtype="fp16"',
        "precision=fp16",
    ],
)
def test_the_scan_leaves_what_tensorrt_11_keeps(line):
    assert removed_uses(line) == []
