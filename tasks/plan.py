"""Stage `plan`: a TensorRT engine per exported part, each with the settings' profile.

In the DAG only when the backend is `tensorrt` (settings refuse that backend where TensorRT
or a GPU is missing). Encoder tasks build one engine; generation tasks one per unmerged
decoder file, with profiles for the cache lengths decoding feeds (`dim_ranges`). Staleness
includes the TensorRT version and the GPU's compute capability, so a plan built for another
GPU or TensorRT release is rebuilt.
"""

from __future__ import annotations

import subprocess

from doit.tools import config_changed

from tasks import artifacts, catalog, paths
from tasks.errors import TensorRTError, fails_cleanly
from tasks.pbtxt import checkpoint_facts
from tasks.settings import Settings, current

Range = tuple[int, int, int]


def dim_ranges(settings: Settings, max_positions: int = 0) -> dict[str, Range]:
    """(min, opt, max) of each kind of dim (catalog.PROFILE_DIMS names them).

    Encoder tasks: the tokenizer pads to the `seq` profile's MIN, so `tokens` is that profile.
    Generation: the loop sends prompts as they are (padded to the longest of the batch), so a
    `prompt` may be shorter than MIN. Decoding a prompt of W tokens into N new ones: the first
    step (decoder_model) makes token 1; token n > 1 comes from decoder_with_past_model reading
    a cache of W + n - 2 tokens (causal: prompt and new tokens) or n - 1 tokens (seq2seq: new
    tokens; the prompt is in the encoder's cache). W and N are at most the `seq` profile's
    MAX, and a causal model's W + N at most its `max_positions` (the server refuses more)."""

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
        "causal_past": span(1, seq.opt, causal_cache),
        "seq2seq_past": span(1, min(seq.opt, new - 1), new - 1),
    }


def profile_shapes(
    settings: Settings, part: str, io: dict, max_positions: int = 0
) -> dict[str, tuple[tuple, ...]]:
    """Input name -> (min, opt, max) shapes of one exported part, from its symbolic dims."""
    table, ranges = catalog.PROFILE_DIMS.get(part, {}), dim_ranges(settings, max_positions)
    shapes = {}
    for tensor in io["inputs"]:
        per_dim = []
        for dim in tensor["shape"]:
            if isinstance(dim, int) and dim > 0:
                per_dim.append((dim, dim, dim))
                continue
            terms = [term.strip() for term in str(dim).split("+")]
            unknown = [term for term in terms if term not in table]
            if unknown:
                raise TensorRTError(
                    f"{part}.onnx input {tensor['name']} has dim {dim!r}: no profile range for "
                    f"{', '.join(map(repr, unknown))} (add it to catalog.PROFILE_DIMS['{part}'])"
                )
            per_dim.append(tuple(sum(ranges[table[t]][i] for t in terms) for i in range(3)))
        shapes[tensor["name"]] = tuple(tuple(d[i] for d in per_dim) for i in range(3))
    return shapes


def make_profile(settings: Settings, part: str, io: dict, max_positions: int = 0):
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, (low, opt, high) in profile_shapes(settings, part, io, max_positions).items():
        profile.add(name, min=low, opt=opt, max=high)
    return profile


def make_builder_config(
    settings: Settings, part: str, io: dict, max_positions: int = 0, memory_pool_limits=None
):
    """Polygraphy's CreateConfig: one profile, fp16 when asked, the workspace limit."""
    from polygraphy.backend.trt import CreateConfig

    return CreateConfig(
        fp16=settings.precision == "fp16",
        profiles=[make_profile(settings, part, io, max_positions)],
        memory_pool_limits=memory_pool_limits,
    )


def gpu_compute_capability() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return ",".join(sorted(set(out.stdout.split()))) or None


def build_engine(settings: Settings, part: str) -> None:
    name = settings.name
    try:
        import tensorrt as trt
        from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath
    except ImportError as err:
        raise TensorRTError(
            "TensorRT is not installed; use backend=python or build in the "
            "exporter image (Dockerfile)"
        ) from err
    source = paths.onnx_file(name, part)
    artifacts.load_onnx(source, name)  # a clear error for a broken file
    io = artifacts.read_json(paths.onnx_io(name, part))
    positions = checkpoint_facts(name)["max_positions"] if settings.task.generation else 0
    limits = {trt.MemoryPoolType.WORKSPACE: catalog.TENSORRT_WORKSPACE_MIB << 20}
    config = make_builder_config(settings, part, io, positions, memory_pool_limits=limits)
    print(
        f"plan: building a {settings.precision} engine of {part} (TensorRT {trt.__version__}); "
        f"profile {profile_shapes(settings, part, io, positions)}",
        flush=True,
    )
    engine = EngineBytesFromNetwork(NetworkFromOnnxPath(str(source)), config)()
    target = paths.plan_file(name, part)
    with artifacts.atomic_target(target) as tmp:
        tmp.write_bytes(bytes(engine))
    artifacts.write_json(
        paths.plan_record(name, part),
        {**artifacts.file_record(target), "tensorrt": trt.__version__},
    )


def plan_task_name(settings: Settings, part: str) -> str:
    return settings.name if part == "model" else f"{settings.name}-{part}"


def task_plan():
    """TensorRT engines from the ONNX files with their profiles (backend=tensorrt only)."""
    settings = current()
    if settings.backend != "tensorrt":
        return
    name = settings.name
    params = {
        "ranges": dim_ranges(settings),
        "dims": catalog.PROFILE_DIMS,
        "precision": settings.precision,
        "workspace_mib": catalog.TENSORRT_WORKSPACE_MIB,
        "tensorrt": artifacts.versions("tensorrt")["tensorrt"],
        "compute_capability": gpu_compute_capability(),
    }
    for part in settings.task.onnx_parts:
        targets = [paths.plan_file(name, part), paths.plan_record(name, part)]
        yield {
            "name": plan_task_name(settings, part),
            "actions": [(fails_cleanly(build_engine), [settings, part])],
            "file_dep": [
                paths.onnx_file(name, part),
                paths.onnx_io(name, part),
                paths.source_manifest(name),  # max_positions caps a causal LM's cache
                paths.stage_module("plan"),
            ],
            "targets": targets,
            "uptodate": [config_changed(params), artifacts.file_matches_record(*targets)],
            "clean": [(artifacts.remove_artifacts, [targets])],
        }
