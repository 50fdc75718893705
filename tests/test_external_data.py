"""Weights past protobuf's 2 GiB: the onnx stage's decision (by the checkpoint's size, before
exporting), the ONNX pair written and recorded, and the repo stage shipping the data file.
The whole build with external data, served, is in tests/test_decoders.py (slow)."""

from __future__ import annotations

import json

import pytest

from tasks import artifacts, catalog, exporters, paths, repo
from tasks.repo import Component


def checkpoint(folder, weight_bytes: int, dtype: str):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": dtype}))
    with open(folder / "model.safetensors", "wb") as handle:  # sparse: no disk taken
        handle.truncate(weight_bytes)
    return folder


@pytest.mark.parametrize(("dtype", "scale"), [("float32", 1), ("bfloat16", 2), ("float16", 2)])
def test_the_decision_reads_the_checkpoints_size_as_fp32(tmp_path, monkeypatch, dtype, scale):
    monkeypatch.delenv(catalog.EXTERNAL_DATA_BYTES_VARIABLE, raising=False)
    limit = catalog.EXTERNAL_DATA_BYTES
    under = checkpoint(tmp_path / "under", (limit - 1) // scale, dtype)
    over = checkpoint(tmp_path / "over", -(-limit // scale), dtype)
    assert exporters.fp32_weight_bytes(over) >= limit > exporters.fp32_weight_bytes(under)
    assert exporters.external_data(over) and not exporters.external_data(under)
    monkeypatch.setenv(catalog.EXTERNAL_DATA_BYTES_VARIABLE, "1000")  # the tests' knob
    assert exporters.external_data(under)


def tiny_onnx():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_an_external_pair_is_recorded_whole_and_a_changed_data_file_is_stale(tmp_path):
    onnx_file = tmp_path / "decoder_model.onnx"
    data = paths.external_data_file(onnx_file)
    artifacts.save_onnx(tiny_onnx(), onnx_file, external=True)
    assert data.stat().st_size == 4096 * 4
    assert data.stat().st_mode == onnx_file.stat().st_mode  # the server reads it too
    record = tmp_path / "decoder_model.io.json"
    artifacts.write_json(record, artifacts.onnx_record(onnx_file))
    fresh = artifacts.file_matches_record(onnx_file, record)
    assert fresh(None, {})
    weights = bytearray(data.read_bytes())
    weights[0] ^= 1
    data.write_bytes(bytes(weights))
    assert not fresh(None, {})
    artifacts.save_onnx(tiny_onnx(), onnx_file, external=False)  # inline again: no data file
    assert not data.exists()


def test_the_repo_ships_the_data_file_beside_a_renamed_onnx_file(tmp_path, monkeypatch):
    """A python-backend model serving decoder_model.onnx as model.onnx: the data keeps the name
    the graph refers to; one no longer made is removed; ONNX Runtime runs the copy."""
    import numpy as np
    import onnxruntime as ort

    monkeypatch.setattr(paths, "ROOT", tmp_path)
    monkeypatch.setattr(paths, "MODELS", tmp_path / "models")
    source = tmp_path / "zoo" / "decoder_model.onnx"
    source.parent.mkdir()
    artifacts.save_onnx(tiny_onnx(), source, external=True)
    config = tmp_path / "config.pbtxt"
    config.write_text('name: "x_decoder"\n')
    component = Component("decoder_model", "x_decoder", ((source, "model.onnx"),), (), link=True)
    assert not component.data_in_place(None, {})
    repo.install(component, config)
    shipped = paths.repo_version_file("x_decoder", "decoder_model.onnx.data")
    assert shipped.read_bytes() == paths.external_data_file(source).read_bytes()
    assert component.data_in_place(None, {})
    session = ort.InferenceSession(str(paths.repo_version_file("x_decoder", "model.onnx")))
    (y,) = session.run(None, {"x": np.ones((1, 64), np.float32)})
    assert y[0, 0] == np.arange(0, 4096, 64, dtype=np.float32).sum()
    artifacts.save_onnx(tiny_onnx(), source, external=False)
    assert not component.data_in_place(None, {})
    repo.install(component, config)
    assert not shipped.exists()


def test_a_quantized_copy_keeps_its_sources_external_layout(tmp_path, monkeypatch):
    """int8 of a part whose weights are beside it: the copy's weights are beside it too, under
    its own name, its record hashes both, and ONNX Runtime runs it."""
    import numpy as np
    import onnxruntime as ort

    from tasks import quantize
    from tests.helpers.stages import settings_from

    monkeypatch.setattr(paths, "ROOT", tmp_path)
    monkeypatch.setattr(paths, "MODEL_ZOO", tmp_path / "model_zoo")
    chosen = settings_from(task="encode", precision="int8", recipe="int8-dynamic")
    source = paths.onnx_file(chosen.name)
    source.parent.mkdir(parents=True)
    artifacts.save_onnx(tiny_onnx(), source, external=True)
    quantize.quantize(chosen, "model")
    copy = paths.quant_file(chosen.name)
    record = artifacts.read_json(paths.quant_record(chosen.name))
    assert record["external_data"]["file"] == "model.onnx.data"
    assert paths.external_data_file(copy).stat().st_size == record["external_data"]["size"]
    assert record["quantized_ops"] and record["fp32_bytes"] == artifacts.onnx_bytes(source)
    (y,) = ort.InferenceSession(str(copy)).run(None, {"x": np.ones((1, 64), np.float32)})
    assert y.shape == (1, 64) and np.isfinite(y).all()  # its numbers: the parity gates' job
