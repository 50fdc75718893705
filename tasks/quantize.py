"""Stage `quantize`: int8, 4-bit and fp16 copies of the exported fp32 files (precision=int8,
int4, nf4, fp4, fp16), between `onnx` and `parity`.

Recipes are data (catalog.QUANT_RECIPES), with ONNX Runtime's quantization tools:
- `dynamic`: int8 weights (per channel by default), activations quantized at run time;
- `static`: QDQ, activations calibrated on tasks/data/calibration.txt;
- `nbits`: 4-bit weights of every MatMul with constant weights (MatMulNBits, `block_size`),
  Gemm layers first rewritten as MatMul + Add;
- `bnb4`: NF4 or FP4 weights, the bitsandbytes formats (MatMulBnb4);
and with NVIDIA ModelOpt's ONNX quantization, for TensorRT's explicit quantization:
- `modelopt`: Q/DQ int8 (calibrated on the same texts) or int4 weights (blocked
  DequantizeLinear, AWQ). ONNX Runtime runs these files too, which is how parity checks them
  on a host without TensorRT.
- `autocast` (tasks/autocast.py): fp16, ModelOpt's AutoCast, but for the nodes whose
  calibrated inputs or outputs or weights leave fp16's range. TensorRT builds these files
  strongly typed, with no precision flag; the onnxruntime and python backends run them as
  they are.

A part exported with external data (its weights in `<part>.onnx.data`, past 2 GiB) gets a copy
laid out the same: the quantizers are told so, and the copy is saved with its own data file.
ModelOpt's recipes refuse such a part (this build does not pass ModelOpt external data).

The fp32 file stays the reference: parity compares the copy with fp32 PyTorch on task-level
gates. Changing the precision or the recipe re-quantizes (re-casts) and never re-exports.
"""

from __future__ import annotations

from pathlib import Path

from doit.tools import config_changed

from tasks import artifacts, paths
from tasks.errors import ExportError, fails_cleanly
from tasks.settings import Settings, current

# Operators that only a quantized graph holds.
QUANTIZED_OPS = (
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "QuantizeLinear",
    "DequantizeLinear",
    "MatMulNBits",
    "MatMulBnb4",
    "DynamicQuantizeMatMul",
)
# a part's inputs the calibration texts can feed (AWQ's clip search needs every input)
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def matmul_weight_bytes(model, op_types: tuple[str, ...]) -> int:
    """Bytes of the constant inputs (weights, scales, zero points) of these operators."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    def stored(tensor) -> int:  # 4-bit tensors are packed two to a byte (unpacked by numpy)
        if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
            return (int(np.prod(tensor.dims)) + 1) // 2
        return numpy_helper.to_array(tensor).nbytes

    sizes = {i.name: stored(i) for i in model.graph.initializer}
    found = 0
    for node in model.graph.node:
        if node.op_type in op_types:
            found += sum(sizes.get(name, 0) for name in node.input)
    return int(np.int64(found))


def gemm_to_matmul(model) -> int:
    """Gemm nodes with a constant weight (alpha = beta = 1, A not transposed) become MatMul +
    Add, the same numbers, so that the 4-bit quantizers, which take MatMuls, reach them (GPT-2's
    Conv1D layers export as Gemm). Returns how many were rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    nodes, changed = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        constant = node.op_type == "Gemm" and node.input[1] in weights
        if not (constant and plain and not attrs.get("transA", 0)):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        weight = np.ascontiguousarray(weight.T if attrs.get("transB", 0) else weight)
        name = f"{node.input[1]}.as_matmul"
        model.graph.initializer.append(numpy_helper.from_array(weight, name))
        biased = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}.product" if biased else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], node.name))
        if biased:
            nodes.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], f"{node.name}.add"
                )
            )
        changed += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return changed


def quantized_ops(model) -> dict[str, int]:
    """How many quantized operators a graph holds, by type."""
    found: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    return found


def calibration_texts() -> list[str]:
    """The texts calibration reads (tasks/data/calibration.txt), one a line."""
    return artifacts.text_lines(paths.QUANT_CALIBRATION)


class CalibrationTexts:
    """ONNX Runtime's CalibrationDataReader over the calibration texts, one text per feed."""

    def __init__(self, settings: Settings, part: str) -> None:
        import numpy as np
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(paths.source_tokenizer(settings.name)))
        tokenizer.enable_truncation(max_length=settings.seq.max)
        names = [
            t["name"] for t in artifacts.read_json(paths.onnx_io(settings.name, part))["inputs"]
        ]
        self.feeds = []
        for text in calibration_texts():
            encoding = tokenizer.encode(text)
            ids = np.array([encoding.ids], np.int64)
            values = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
            }
            self.feeds.append({n: values.get(n, np.zeros_like(ids)) for n in names})
        self.position = 0

    def get_next(self):
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def get_first(self):  # ModelOpt's reader protocol: a test run before calibrating
        return self.feeds[0]

    def __iter__(self):  # ModelOpt's AWQ takes the feeds as a list
        return iter(self.feeds)

    def rewind(self) -> None:
        self.position = 0


def modelopt_calibration(settings: Settings, part: str) -> str:
    """The calibration a ModelOpt recipe runs on a part: AWQ's clip search needs every input
    fed, so a part that also takes a cache or encoder states is rounded to nearest."""
    recipe = settings.recipe
    if recipe.precision != "int4":
        return recipe.calibration
    inputs = artifacts.read_json(paths.onnx_io(settings.name, part))["inputs"]
    fed = all(t["name"] in TEXT_INPUTS for t in inputs)
    return recipe.calibration if fed else "rtn_dq"


def modelopt_quantize(settings: Settings, part: str, source, target) -> None:
    """NVIDIA ModelOpt's ONNX post-training quantization, calibrated on CPU (ONNX Runtime)."""
    import logging

    try:
        from modelopt.onnx.quantization import quantize as modelopt
    except ImportError as err:
        raise ExportError(
            f"recipe={settings.recipe.name} needs NVIDIA ModelOpt ({err}); install "
            "requirements.txt (nvidia-modelopt and its ONNX packages)"
        ) from None
    import os
    import shutil

    recipe = settings.recipe
    options = {"block_size": settings.block_size} if recipe.precision == "int4" else {}
    # ModelOpt writes intermediate files beside its output (an opset-upgraded copy, a renamed
    # one) and keeps them when it fails: it works in a folder of its own, removed after. It
    # is named after the temporary target, so a killed run's goes with the stale temporaries
    # (artifacts.atomic_target).
    work = Path(f"{target}.modelopt")
    work.mkdir(parents=True)
    here = Path.cwd()
    try:
        os.chdir(work)  # int4 compiles a C++ helper with setuptools, which scans the cwd
        modelopt(
            str(source),
            quantize_mode=recipe.precision,
            calibration_data_reader=CalibrationTexts(settings, part),
            calibration_method=modelopt_calibration(settings, part),
            calibration_eps=["cpu"],
            op_types_to_quantize=list(recipe.op_types) or None,
            nodes_to_exclude=list(recipe.exclude) or None,
            high_precision_dtype=recipe.high_precision,  # the file, not a builder flag
            op_types_to_exclude_fp16=list(recipe.fp32_ops) or None,
            output_path=str(work / "model.onnx"),
            log_level="CRITICAL",  # it reports a missing GPU (NVML) as an error
            **options,
        )
        os.replace(work / "model.onnx", target)
    finally:
        os.chdir(here)
        shutil.rmtree(work, ignore_errors=True)
    logging.getLogger().setLevel(logging.ERROR)


def quantize_into(settings: Settings, part: str, source, target) -> dict:
    """Write the recipe's copy of `source` to `target`; return what its record adds."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    recipe = settings.recipe
    op_types = list(recipe.op_types) or None
    external = paths.external_data_file(source).is_file()  # weights beside: past 2 GiB
    if recipe.method == "dynamic":
        quantize_dynamic(
            str(source),
            str(target),
            per_channel=recipe.per_channel,
            weight_type=QuantType.QInt8,  # uint8 activations, int8 weights: U8S8
            op_types_to_quantize=op_types,
            use_external_data_format=external,
        )
    elif recipe.method == "static":
        quantize_static(
            str(source),
            str(target),
            CalibrationTexts(settings, part),
            quant_format=QuantFormat.QDQ,
            per_channel=recipe.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=op_types,
            use_external_data_format=external,
        )
    elif recipe.method == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(source))
        gemm_to_matmul(model)
        quantizer = MatMulNBitsQuantizer(model, block_size=settings.block_size, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
    elif recipe.method == "modelopt":
        if external:
            raise ExportError(
                f"recipe={recipe.name}: {part}'s weights are beside it (external data, past "
                "2 GiB) and this build does not pass ModelOpt external data; use an ONNX "
                "Runtime recipe (precision=int8 recipe=int8-dynamic, precision=int4)"
            )
        modelopt_quantize(settings, part, source, target)
    elif recipe.method == "autocast":
        from tasks import autocast

        return autocast.autocast_into(settings, part, source, target)
    else:  # bnb4
        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

        kind = MatMulBnb4Quantizer.NF4 if recipe.bnb_type == "nf4" else MatMulBnb4Quantizer.FP4
        model = onnx.load(str(source))
        gemm_to_matmul(model)
        quantizer = MatMulBnb4Quantizer(model, kind, settings.block_size)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
    return {}


def quantize(settings: Settings, part: str) -> None:
    import logging
    import shutil

    import onnx

    name, recipe = settings.name, settings.recipe
    source, target = paths.onnx_file(name, part), paths.quant_file(name, part)
    external = paths.external_data_file(source).is_file()
    what = recipe.name + (f", block {settings.block_size}" if settings.block_size else "")
    print(f"quantize: {part} ({what}) from {source.relative_to(paths.ROOT)}", flush=True)
    logging.getLogger().setLevel(logging.ERROR)  # ONNX Runtime's advice on every weight
    paths.quant_record(name, part).unlink(missing_ok=True)  # the record comes back last
    staged = artifacts.staging_dir(target)  # the quantizers' files (and data files) go here
    try:
        made = staged / target.name
        try:
            added = quantize_into(settings, part, source, made)
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(
                f"quantizing {part} with recipe={recipe.name} failed: {type(err).__name__}: "
                f"{err}; try {recipe.next_try}"
            ) from None
        model = onnx.load(str(made))
        record = describe_copy(settings, part, source, model)
        artifacts.save_onnx(model, target, external)  # laid out as its source
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    record.update(added, **artifacts.onnx_record(target))
    record["size_ratio"] = round(artifacts.onnx_bytes(target) / record["fp32_bytes"], 3)
    artifacts.write_json(paths.quant_record(name, part), record)
    said = (
        f"{len(added['kept_fp32'])} of {record['fp16']['nodes']} nodes kept in fp32"
        if recipe.method == "autocast"
        else str(record["quantized_ops"])
    )
    print(
        f"quantize: {target.relative_to(paths.ROOT)} "
        f"({artifacts.onnx_bytes(target) / 2**20:.1f} MiB, "
        f"{record['size_ratio']}x the fp32 file; {said})",
        flush=True,
    )


def describe_copy(settings: Settings, part: str, source: Path, made) -> dict:
    """What the quantize record says of a copy (raises if it holds no converted weight)."""
    import onnx

    recipe = settings.recipe
    if recipe.method == "autocast":
        from tasks.autocast import fp16_summary

        summary = fp16_summary(made)
    else:
        summary = quantized_ops(made)
    if not summary or summary.get("fp16_initializers") == 0:
        raise ExportError(
            f"recipe={recipe.name} left {part} without a {recipe.precision} weight (it has "
            f"no weights this recipe converts); try {recipe.next_try}"
        )
    record = {
        "recipe": recipe.name,
        "method": recipe.method,
        "per_channel": recipe.per_channel,
        "block_size": settings.block_size,
        "calibration": modelopt_calibration(settings, part) if recipe.method == "modelopt" else "",
        "fp32_bytes": artifacts.onnx_bytes(source),
        "fp16" if recipe.method == "autocast" else "quantized_ops": summary,
    }
    if recipe.precision in ("int4", "nf4", "fp4"):  # what 4 bits buy: the MatMuls' weights
        before = matmul_weight_bytes(onnx.load(str(source)), ("MatMul", "Gemm"))
        four_bit = ("MatMulNBits", "MatMulBnb4", "DequantizeLinear", "MatMul", "Gemm")
        after = matmul_weight_bytes(made, four_bit)
        record["matmul_weight_ratio"] = round(after / before, 3) if before else None
    return record


def task_quantize():
    """Copies of the exported files in another precision (int8, int4, nf4, fp4; fp16)."""
    settings = current()
    if settings.recipe is None:
        return
    name = settings.name
    autocast = settings.recipe.method == "autocast"
    # AutoCast calibrates on padded batches (the pad id: facts); a decoder's parts on the feeds
    # of the serving loop, over every fp32 file
    facts = [paths.source_manifest(name), paths.stage_module("facts")] if autocast else []
    decoding = (
        [
            *(paths.onnx_file(name, part) for part in settings.task.onnx_parts),
            paths.stage_module("profiles"),  # its cache limit
            paths.runtime_file("generate", "decoding.py"),
            paths.runtime_helpers(),
        ]
        if settings.task.generation and autocast
        else []
    )
    for part in settings.task.onnx_parts:
        targets = [paths.quant_file(name, part), paths.quant_record(name, part)]
        data = paths.external_data_file(targets[0])  # made when its source has one
        yield {
            "name": f"{name}-{part}" if part != "model" else name,
            "actions": [(fails_cleanly(quantize), [settings, part])],
            "file_dep": [
                *dict.fromkeys([paths.onnx_file(name, part), *decoding, *facts]),
                paths.onnx_io(name, part),
                paths.QUANT_CALIBRATION,  # the texts static recipes calibrate on
                paths.stage_module("quantize"),
                *([paths.stage_module("autocast")] if autocast else []),
            ],
            "targets": targets,
            "uptodate": [
                config_changed(
                    {
                        "recipe": repr(settings.recipe),
                        "block_size": settings.block_size,
                        "versions": artifacts.versions("onnxruntime", "onnx", "nvidia-modelopt"),
                    }
                )
            ],
            "clean": [(artifacts.remove_artifacts, [[*targets, data]])],
        }
