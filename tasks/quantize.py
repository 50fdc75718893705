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
- `autocast`: fp16 (ModelOpt's AutoCast), but the nodes whose calibrated inputs or outputs
  (the texts; a decoder's parts: the serving loop's feeds on them) or weights leave fp16's
  range. TensorRT builds these files strongly typed, with no precision flag; the onnxruntime
  and python backends run them as they are.

The fp32 file stays the reference: parity compares the copy with fp32 PyTorch on task-level
gates. Changing the precision or the recipe re-quantizes (re-casts) and never re-exports.
"""

from __future__ import annotations

from pathlib import Path

from doit.tools import config_changed

from tasks import artifacts, catalog, paths
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


class RecordingStep:
    """A decoding step that keeps each feed it runs (the serving loop's own inputs)."""

    def __init__(self, step, feeds: list) -> None:
        self.step, self.feeds, self.inputs = step, feeds, step.inputs

    def __call__(self, feed: dict) -> dict:
        self.feeds.append(dict(feed))
        return self.step(feed)


def decoding_feeds(settings: Settings) -> dict[str, list[dict]]:
    """Each decoder part's real inputs: the feeds the serving loop (triton/generate/) gives
    the exported fp32 files while it decodes the calibration texts greedily, in padded
    batches; the cache and encoder states included, which no tokenizer alone can give."""
    from tasks import profiles
    from tasks.facts import checkpoint_facts

    decoding = artifacts.load_runtime("generate", "decoding.py")
    facts, parts = checkpoint_facts(settings.name), settings.task.onnx_parts
    feeds: dict[str, list[dict]] = {part: [] for part in parts}
    fp32 = decoding.onnxruntime_steps({p: paths.onnx_file(settings.name, p) for p in parts})
    generator = decoding.Generator(
        settings.task.generation,
        {part: RecordingStep(fp32[part], feeds[part]) for part in parts},
        eos_ids=facts["eos_ids"],
        pad_id=facts["pad_id"],
        start_id=int(facts["decoder_start_id"]),
        cache_limit=profiles.cache_limit(settings, facts["max_positions"]),
    )
    for batch in padded_batches(settings, ("input_ids", "attention_mask")):
        rows = len(batch["input_ids"])
        params = [decoding.RowParams(max_new_tokens=catalog.GATE_NEW_TOKENS)] * rows
        generator.generate(batch["input_ids"], batch["attention_mask"], params)
    return feeds


def padded_batches(settings: Settings, names) -> list[dict]:
    """The calibration texts tokenized in batches of AUTOCAST_BATCH, right-padded to each
    batch's longest, as the server batches requests: padding drives attention masks to
    their extremes (a mask of -3.4e38 is -inf in fp16), which single texts never show. Row r
    of a batch keeps (r + 1) / AUTOCAST_BATCH of the seq MAX tokens at most, so that every
    batch is padded even where every text fills the MAX."""
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(paths.source_tokenizer(settings.name)))
    tokenizer.enable_truncation(max_length=settings.seq.max)
    pad = checkpoint_pad_id(settings)
    texts, size = calibration_texts(), catalog.AUTOCAST_BATCH
    batches = []
    for start in range(0, len(texts), size):
        encoded = [
            tokenizer.encode(text).ids[: max(settings.seq.max * (row + 1) // size, 1)]
            for row, text in enumerate(texts[start : start + size])
        ]
        width = max(len(ids) for ids in encoded)
        ids = np.full((len(encoded), width), pad, np.int64)
        mask = np.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
        values = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy(),
        }
        batches.append({n: values.get(n, np.zeros_like(ids)) for n in names})
    return batches


def checkpoint_pad_id(settings: Settings) -> int:
    from tasks.facts import checkpoint_facts

    return int(checkpoint_facts(settings.name)["pad_id"] or 0)


def calibration_texts() -> list[str]:
    return [t for t in paths.QUANT_CALIBRATION.read_text().splitlines() if t.strip()]


def autocast_into(settings: Settings, part: str, source, target) -> dict:
    """ModelOpt's AutoCast: an fp16 copy of `source`, but for the nodes that calibration on real
    inputs (or their initializers) shows out of fp16's range, which stay fp32. The inputs and
    outputs keep their types, so every consumer of the file is unchanged. Returns the nodes
    kept in fp32, each with AutoCast's reason."""
    import logging
    import shutil

    import numpy as np
    import onnx

    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as err:
        raise ExportError(
            f"precision=fp16 needs NVIDIA ModelOpt's AutoCast ({err}); install "
            "requirements.txt (nvidia-modelopt and its ONNX packages)"
        ) from None
    if settings.task.generation:
        feeds = decoding_feeds(settings)[part]
    else:
        names = [
            t["name"] for t in artifacts.read_json(paths.onnx_io(settings.name, part))["inputs"]
        ]
        feeds = padded_batches(settings, names)
    work = Path(f"{target}.autocast")  # goes with the stale temporaries (atomic_target)
    work.mkdir(parents=True)
    kept: dict[str, str] = {}

    class KeptNodes(logging.Handler):  # AutoCast says why it keeps a node only in its log
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Skipping node "):
                node, _, why = message[len("Skipping node ") :].partition(": ")
                kept[node] = why

    log = logging.getLogger("modelopt.onnx.autocast")
    handler, before = KeptNodes(), (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for index, feed in enumerate(feeds):
            np.savez(work / f"{index:05d}.npz", **feed)
        model = convert_to_mixed_precision(
            onnx_path=str(source),
            low_precision_type="fp16",
            keep_io_types=True,
            calibration_data=str(work),
        )
        onnx.save(model, str(target))
    finally:
        log.removeHandler(handler)
        log.setLevel(before[0])
        log.propagate = before[1]
        shutil.rmtree(work, ignore_errors=True)
    return {"kept_fp32": kept, "calibration_feeds": len(feeds)}


def fp16_summary(model) -> dict[str, int]:
    """How much of a graph is fp16: its weights (initializers) and its Cast nodes."""
    from onnx import TensorProto

    weights = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16]
    fp32 = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT]
    return {
        "fp16_initializers": len(weights),
        "fp32_initializers": len(fp32),
        "nodes": len(model.graph.node),
        "casts": sum(node.op_type == "Cast" for node in model.graph.node),
    }


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
    if recipe.method == "dynamic":
        quantize_dynamic(
            str(source),
            str(target),
            per_channel=recipe.per_channel,
            weight_type=QuantType.QInt8,  # uint8 activations, int8 weights: U8S8
            op_types_to_quantize=op_types,
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
        )
    elif recipe.method == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(source))
        gemm_to_matmul(model)
        quantizer = MatMulNBitsQuantizer(model, block_size=settings.block_size, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target))
    elif recipe.method == "modelopt":
        modelopt_quantize(settings, part, source, target)
    elif recipe.method == "autocast":
        return autocast_into(settings, part, source, target)
    else:  # bnb4
        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

        kind = MatMulBnb4Quantizer.NF4 if recipe.bnb_type == "nf4" else MatMulBnb4Quantizer.FP4
        model = onnx.load(str(source))
        gemm_to_matmul(model)
        quantizer = MatMulBnb4Quantizer(model, kind, settings.block_size)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target))
    return {}


def quantize(settings: Settings, part: str) -> None:
    import logging

    import onnx

    name, recipe = settings.name, settings.recipe
    source, target = paths.onnx_file(name, part), paths.quant_file(name, part)
    what = recipe.name + (f", block {settings.block_size}" if settings.block_size else "")
    print(f"quantize: {part} ({what}) from {source.relative_to(paths.ROOT)}", flush=True)
    logging.getLogger().setLevel(logging.ERROR)  # ONNX Runtime's advice on every weight
    with artifacts.atomic_target(target) as tmp:
        try:
            added = quantize_into(settings, part, source, tmp)
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(
                f"quantizing {part} with recipe={recipe.name} failed: {type(err).__name__}: "
                f"{err}; try {recipe.next_try}"
            ) from None
        made = onnx.load(str(tmp))
        summary = fp16_summary(made) if recipe.method == "autocast" else quantized_ops(made)
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
        "fp32_bytes": source.stat().st_size,
        **added,
        **artifacts.file_record(target),
    }
    if recipe.method == "autocast":
        record["fp16"] = summary
        said = f"{len(added['kept_fp32'])} of {summary['nodes']} nodes kept in fp32"
    else:
        record["quantized_ops"] = summary
        said = str(summary)
    record["size_ratio"] = round(target.stat().st_size / source.stat().st_size, 3)
    if recipe.precision in ("int4", "nf4", "fp4"):  # what 4 bits buy: the MatMuls' weights
        before = matmul_weight_bytes(onnx.load(str(source)), ("MatMul", "Gemm"))
        four_bit = ("MatMulNBits", "MatMulBnb4", "DequantizeLinear", "MatMul", "Gemm")
        after = matmul_weight_bytes(made, four_bit)
        record["matmul_weight_ratio"] = round(after / before, 3) if before else None
    artifacts.write_json(paths.quant_record(name, part), record)
    print(
        f"quantize: {target.relative_to(paths.ROOT)} ({target.stat().st_size / 2**20:.1f} MiB, "
        f"{record['size_ratio']}x the fp32 file; {said})",
        flush=True,
    )


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
        yield {
            "name": f"{name}-{part}" if part != "model" else name,
            "actions": [(fails_cleanly(quantize), [settings, part])],
            "file_dep": [
                *dict.fromkeys([paths.onnx_file(name, part), *decoding, *facts]),
                paths.onnx_io(name, part),
                paths.QUANT_CALIBRATION,  # the texts static recipes calibrate on
                paths.stage_module("quantize"),
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
            "clean": [(artifacts.remove_artifacts, [targets])],
        }
