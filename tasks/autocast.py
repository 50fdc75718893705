"""fp16 as a file: ModelOpt's AutoCast for the quantize stage's `fp16-autocast` recipe.

AutoCast casts a graph to fp16 but for the nodes whose weights, or whose inputs and outputs on
calibration data, leave what fp16 holds; those stay fp32, and the record says why. The
calibration data are real: the calibration texts in padded batches, as the server batches
requests (padding takes attention masks to -3.4e38, -inf in fp16); a decoder's files get the
feeds the serving loop gives them while it decodes those texts with the fp32 files.
"""

from __future__ import annotations

from pathlib import Path

from tasks import artifacts, catalog, paths, profiles
from tasks.errors import ExportError
from tasks.facts import checkpoint_facts
from tasks.settings import Settings


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
    pad = int(checkpoint_facts(settings.name)["pad_id"] or 0)
    texts = artifacts.text_lines(paths.QUANT_CALIBRATION)
    size = catalog.AUTOCAST_BATCH
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
        external = paths.external_data_file(Path(source)).is_file()  # past 2 GiB
        data = f"{Path(target).name}.data"
        onnx.save(model, str(target), save_as_external_data=external, location=data)
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
