"""Shape arithmetic of the TensorRT profiles: the one place that turns `batch` and `seq` into
the (min, opt, max) of every dim an exported file has, and what that reserves: on a GPU
(engines' bindings), in a pod (the generation loops' caches, tasks/k8s.py).

Pure arithmetic on the settings and an io.json (no TensorRT, no project state): the plan
stage builds engines with it, pbtxt tells the decoding loop the cache it may grow, and the
tests check it against every shape a real decoding loop feeds.
"""

from __future__ import annotations

import math

from tasks import catalog
from tasks.errors import TensorRTError
from tasks.settings import Settings

Range = tuple[int, int, int]
DTYPE_BYTES = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1}


def dim_ranges(settings: Settings, max_positions: int = 0) -> dict[str, Range]:
    """(min, opt, max) of each kind of dim (catalog.PROFILE_DIMS names them).

    Encoder tasks: the tokenizer pads to the `seq` profile's MIN, so `tokens` is that profile.
    Generation: the loop sends prompts as they are (padded to the longest of the batch), so a
    `prompt` may be shorter than MIN. Decoding a batch padded to W tokens into at most N new
    ones: the first step (decoder_model) makes token 1; token n > 1 comes from
    decoder_with_past_model reading a cache of W + n - 2 tokens (causal: prompt and new
    tokens) or n - 1 tokens (seq2seq: new tokens; the prompt is in the encoder's cache).
    W and N are at most the `seq` profile's MAX; a causal model's cache is also capped at its
    `max_positions` - 2, and the decoding loop splits any batch that would need more
    (decoding.cache_batches, told the cap by `cache_limit`)."""

    def span(low: int, opt: int, high: int) -> Range:
        high = max(high, low)
        return (low, min(max(opt, low), high), high)

    seq, new = settings.seq, settings.max_new_tokens
    causal_cache = seq.max + new - 2
    if max_positions:
        causal_cache = min(causal_cache, max_positions - 2)
    return {
        "batch": settings.batch.points(),
        "tokens": seq.points(),
        "prompt": span(1, seq.opt, seq.max),
        "one": (1, 1, 1),
        "none": (0, 0, 0),
        "causal_past": span(1, seq.opt, causal_cache),
        "seq2seq_past": span(1, min(seq.opt, new - 1), new - 1),
    }


def cache_limit(settings: Settings, max_positions: int = 0) -> int:
    """The longest cache the decoding loop may grow for a batch: the profile's maximum."""
    past = "causal_past" if settings.task.generation == "causal" else "seq2seq_past"
    return dim_ranges(settings, max_positions)[past][2]


def slot_positions(settings: Settings, max_positions: int = 0) -> int:
    """decoder=slots: the positions a row's slot holds, the longest cache the loop grows and
    the token a step writes after it, with one to spare."""
    return cache_limit(settings, max_positions) + 2


def _dim_range(part: str, tensor: str, dim, table: dict, ranges: dict) -> Range:
    if isinstance(dim, int) and dim > 0:
        return (dim, dim, dim)
    terms = [term.strip() for term in str(dim).split("+")]
    # a number counts as itself only beside a named dim ('past_sequence_length + 1'): a bare
    # 0 is a dynamic dim the export left unnamed
    unknown = [t for t in terms if t not in table and not (t.isdigit() and len(terms) > 1)]
    if unknown:
        raise TensorRTError(
            f"{part}.onnx tensor {tensor} has dim {dim!r}: no profile range for "
            f"{', '.join(map(repr, unknown))} (add it to catalog.PROFILE_DIMS['{part}'])"
        )
    return tuple(
        sum(int(t) if t.isdigit() else ranges[table[t]][i] for t in terms) for i in range(3)
    )


def profile_shapes(
    settings: Settings, part: str, io: dict, max_positions: int = 0, direction: str = "input"
) -> dict[str, tuple[tuple, ...]]:
    """Tensor name -> (min, opt, max) shapes of one exported part's inputs (or outputs, as
    the engine computes them from its inputs), from its symbolic dims."""
    table, ranges = catalog.PROFILE_DIMS.get(part, {}), dim_ranges(settings, max_positions)
    shapes = {}
    for tensor in io[f"{direction}s"]:
        per_dim = [_dim_range(part, tensor["name"], d, table, ranges) for d in tensor["shape"]]
        shapes[tensor["name"]] = tuple(tuple(d[i] for d in per_dim) for i in range(3))
    return shapes


def binding_bytes(
    settings: Settings,
    part: str,
    io: dict,
    max_positions: int = 0,
    directions: tuple[str, ...] = ("input", "output"),
) -> int:
    """What Triton's tensorrt backend allocates for one instance of this engine when it loads:
    every input and output binding at the profile's maximum shape."""
    dtypes = {t["name"]: t["dtype"] for t in io["inputs"] + io["outputs"]}
    total = 0
    for direction in directions:
        for name, (_, _, high) in profile_shapes(
            settings, part, io, max_positions, direction
        ).items():
            total += math.prod(high) * DTYPE_BYTES[dtypes[name]]
    return total


def loop_bytes(settings: Settings, io: dict, max_positions: int = 0) -> int:
    """What one generation loop (a model instance) holds at the profile's maxima, from
    decoder_with_past_model's inputs and outputs: a step's (the batch's cache in and out,
    the logits); with decoder=slots, its buffers, written in place: each cache tensor once,
    `slot_positions` long where a step's cache is `cache_limit` long."""
    part = "decoder_with_past_model"
    if settings.decoder != "slots":
        return binding_bytes(settings, part, io, max_positions)
    cache = {**io, "inputs": [t for t in io["inputs"] if t["name"].startswith("past_key_values")]}
    per_limit = binding_bytes(settings, part, cache, max_positions, ("input",))
    return (
        per_limit * slot_positions(settings, max_positions) // cache_limit(settings, max_positions)
    )


def reserved_per_gpu(
    settings: Settings, ios: dict[str, dict], plan_bytes: dict[str, int], max_positions: int = 0
) -> dict[str, int]:
    """GPU memory each engine of the deployment takes on each GPU it runs on, once loaded:
    its weights (the plan) plus its bindings at the profile's maxima for each of the
    `instances`. TensorRT's own workspace and CUDA's context come on top."""
    return {
        part: plan_bytes.get(part, 0)
        + settings.serving.instances * binding_bytes(settings, part, io, max_positions)
        for part, io in ios.items()
    }


def describe_reservation(settings: Settings, per_part: dict[str, int]) -> str:
    total = sum(per_part.values())
    gpus = ",".join(map(str, settings.serving.gpus)) if settings.serving.gpus else "every GPU"
    parts = ", ".join(f"{part} {size / 2**30:.2f} GiB" for part, size in per_part.items())
    return (
        f"reserves {total / 2**30:.2f} GiB on each GPU it runs on ({gpus}; "
        f"{settings.serving.instances} instance(s): {parts}); lower batch or seq MAX, or "
        "instances, to reserve less"
    )
