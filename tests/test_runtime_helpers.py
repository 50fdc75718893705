"""The helpers every python-backend model shares (triton/runtime/runtime.py), outside Triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from tasks import artifacts, paths


@pytest.fixture
def runtime():
    return artifacts.load_runtime("runtime", "runtime.py")


def test_it_loads_without_triton_utilities(runtime):
    assert "triton_python_backend_utils" not in sys.modules
    assert sys.modules[runtime.MODULE] is runtime


def config_of(**values) -> dict:
    """A model config as Triton hands it to `initialize`: every parameter a string."""
    return {
        "name": "encode_model",
        "parameters": {k: {"string_value": v} for k, v in values.items()},
    }


def test_parameters_read_typed_values(runtime):
    params = runtime.Parameters.of(
        config_of(max_seq="128", batch_waste="1.5", trims='[["a", "b"]]', overflow="reject")
    )
    assert params.read("max_seq", int) == 128
    assert params.read("batch_waste", float) == 1.5
    assert params.read("trims", json.loads) == [["a", "b"]]
    assert params.read("overflow") == "reject"
    assert params.read("pad_multiple", default="") == ""


def test_a_missing_parameter_names_itself_the_model_and_the_fix(runtime):
    params = runtime.Parameters.of(config_of(max_seq="128"))
    with pytest.raises(runtime.ConfigError) as caught:
        params.read("stride", int)
    message = str(caught.value)
    assert "model 'encode_model'" in message
    assert "no parameter 'stride'" in message
    assert "rebuild the repository with doit" in message


@pytest.mark.parametrize(
    ("value", "kind", "wanted"),
    [("12x", int, "an integer"), ("fast", float, "a number"), ("[1,", json.loads, "JSON")],
)
def test_a_bad_parameter_names_its_value_and_the_kind_wanted(runtime, value, kind, wanted):
    params = runtime.Parameters.of(config_of(key=value))
    with pytest.raises(runtime.ConfigError) as caught:
        params.read("key", kind)
    message = str(caught.value)
    assert f"parameter 'key' is {value!r}, not {wanted}" in message
    assert "model 'encode_model'" in message and "config.pbtxt" in message


def test_softmax_is_stable_for_large_scores_and_gives_minus_inf_nothing(runtime):
    probabilities = runtime.softmax(np.array([1000.0, 1001.0, -np.inf]))
    assert np.isfinite(probabilities).all()
    expected = np.array([1.0, np.e, 0.0]) / (1.0 + np.e)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-12)
    assert probabilities.dtype == np.float64
    assert runtime.softmax(np.float32([3e38, 3e38])).tolist() == [0.5, 0.5]


def test_softmax_runs_along_the_last_axis(runtime):
    logits = np.random.default_rng(0).normal(0, 5, size=(4, 7)).astype(np.float32)
    probabilities = runtime.softmax(logits)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-12)
    row = np.exp(logits[2].astype(np.float64))
    np.testing.assert_allclose(probabilities[2], row / row.sum(), rtol=1e-9)


def test_load_registers_a_sibling_under_the_prefix(runtime, tmp_path):
    (tmp_path / "sibling.py").write_text(
        "from dataclasses import dataclass\n"
        "from llm_in_triton_runtime import softmax\n\n"
        "@dataclass(frozen=True)\n"
        "class Row:\n"
        "    value: int\n"
    )
    module = runtime.load(tmp_path, "sibling")
    assert sys.modules["llm_in_triton_sibling"] is module
    assert module.Row(3).value == 3  # dataclasses find the module it is registered as
    assert module.softmax is runtime.softmax


def test_the_runtime_modules_use_the_shared_softmax(runtime):
    decoding = artifacts.load_runtime("generate", "decoding.py")
    qa = artifacts.load_runtime("qa_answer", "answer.py")
    label = artifacts.load_runtime("label", "answer.py")
    for module in (decoding, qa, label):
        assert module.softmax.__module__ == runtime.MODULE, module.__file__


def test_an_answer_step_reads_its_parameters_through_the_reader(runtime, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "NO", "1": "YES"}}))
    label = artifacts.load_runtime("label", "answer.py")
    answer = label.make(tmp_path, runtime.Parameters({}, "seqcls_post"))
    out = answer({"LOGITS": np.float32([[0.0, 2.0], [1e4, 0.0]])})
    assert out["LABEL"].reshape(-1).tolist() == [b"YES", b"NO"]
    np.testing.assert_allclose(out["SCORE"].reshape(-1), [1 / (1 + np.exp(-2.0)), 1.0], rtol=1e-6)
    qa = artifacts.load_runtime("qa_answer", "answer.py")
    with pytest.raises(runtime.ConfigError, match="no parameter 'max_answer_tokens'"):
        qa.make(tmp_path, runtime.Parameters({}, "qa_model"))


def fake_triton_utilities(with_codes: bool) -> types.ModuleType:
    """Just the part of triton_python_backend_utils the error helpers touch."""

    class TritonError:
        if with_codes:
            INVALID_ARG = 3

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, error=None):
            self.error = error

    return types.SimpleNamespace(TritonError=TritonError, InferenceResponse=InferenceResponse)


@pytest.mark.parametrize("with_codes", [True, False])
def test_a_bad_request_is_a_client_error_where_triton_has_codes(runtime, monkeypatch, with_codes):
    fake = fake_triton_utilities(with_codes)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    refused = runtime.bad_request("TEXT is empty")
    assert refused.error.message == "TEXT is empty"
    assert refused.error.code == (3 if with_codes else None)
    failed = runtime.failed("ONNX Runtime failed: boom")
    assert failed.error.message == "ONNX Runtime failed: boom" and failed.error.code is None


def test_model_args_parses_what_triton_hands_initialize(runtime, tmp_path):
    config = config_of(max_seq="64")
    args = {
        "model_config": json.dumps(config),
        "model_repository": str(tmp_path / "encode_model"),
        "model_version": "1",
    }
    parsed, params, version_dir = runtime.model_args(args)
    assert parsed == config
    assert params.read("max_seq", int) == 64 and params.model == "encode_model"
    assert version_dir == tmp_path / "encode_model" / "1"


HEAP_PROBE = """
import resource, sys, threading
import numpy as np
from tasks import artifacts
runtime = artifacts.load_runtime("runtime", "runtime.py")
if sys.argv[1] == "session":  # as every model's step does when it makes its session
    runtime.session_options(1, 0)
    assert runtime.keep_heap() is True  # glibc: its mallopt took both settings
faults = []
# A cache growing a position a step, 16 arrays of about 1 MiB, as decoding's: sizes that grow
# keep glibc's adapting threshold from reusing the blocks (one size over and over would not
# fault without keep_heap either).
def steps():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for width in range(64, 114):
        cache = [np.ones((16, 2, width, 64), np.float32) for _ in range(16)]
        del cache
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
loop = threading.Thread(target=steps)  # not the main thread: the stub's loop is not either
loop.start(); loop.join()
print(faults[0])
"""


def test_a_session_keeps_the_heap_so_a_step_does_not_fault_its_cache_in_anew():
    """Freed large blocks are reused: a decoding step's fresh output arrays no longer cost a
    page fault per 4 KiB (runtime.keep_heap)."""
    # malloc's own settings from the environment would decide the plain run instead
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}

    def faults(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", HEAP_PROBE, mode],
            cwd=paths.ROOT, env=env, capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        return int(run.stdout.split()[-1])

    plain, kept = faults("plain"), faults("session")
    assert plain > 100_000  # 50 steps of 16 MiB, faulted in each time
    assert kept < plain / 10, (plain, kept)


def test_ids_outside_the_vocabulary_are_named_with_the_fix(runtime):
    """One check for the encoder step and the decoding loop's door: the offending id, the
    range, and what to send instead; in range, empty, or an unknown vocabulary: nothing."""
    ids = np.array([[3, 1_000_000, 2]], dtype=np.int64)
    assert runtime.outside_vocabulary(ids, 100) == (
        "input_ids holds 1000000, outside the vocabulary of 100 tokens (0 to 99): send ids "
        "from this model's tokenizer"
    )
    assert runtime.outside_vocabulary(np.array([1, -3, 99]), 100).startswith("input_ids holds -3")
    assert runtime.outside_vocabulary(np.array([0, 99]), 100) is None
    assert runtime.outside_vocabulary(np.array([], dtype=np.int64), 100) is None
    assert runtime.outside_vocabulary(ids, 0) is None  # unknown: unchecked
