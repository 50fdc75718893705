"""Stage `plan`: a TensorRT engine per exported part, each with the settings' profile.

In the DAG only when the backend is `tensorrt` (settings refuse that backend where TensorRT
or a GPU is missing). Encoder tasks build one engine; generation tasks one per unmerged
decoder file, with profiles for the cache lengths decoding feeds (`profiles.dim_ranges`).
Staleness includes the TensorRT version, the GPUs' compute capabilities and the hardware
compatibility (`trt_compat`), so a plan built for another GPU or TensorRT release is rebuilt,
and a plan that could not load on every GPU the deployment runs on is refused at build time.
Each build prints (and records) the GPU memory the deployment reserves when Triton loads it.

Every network is strongly typed and no builder config carries a precision flag (TensorRT 11
removed weak typing; 10.12 deprecated it): fp16 is a property of the file (ModelOpt's
AutoCast, made by the quantize stage), int8 and int4 are Q/DQ nodes in it (ModelOpt), so one
code path builds on TensorRT 10 and 11.
"""

from __future__ import annotations

import subprocess

from doit.tools import config_changed

from tasks import artifacts, catalog, paths, profiles
from tasks.errors import TensorRTError, fails_cleanly
from tasks.facts import checkpoint_facts
from tasks.settings import Settings, current


def make_profile(settings: Settings, part: str, io: dict, max_positions: int = 0):
    from polygraphy.backend.trt import Profile

    profile = Profile()
    shapes = profiles.profile_shapes(settings, part, io, max_positions)
    for name, (low, opt, high) in shapes.items():
        profile.add(name, min=low, opt=opt, max=high)
    return profile


def compat_level(trt, compat: str):
    """TensorRT's HardwareCompatibilityLevel for `trt_compat`, or a clear error."""
    level = getattr(trt.HardwareCompatibilityLevel, catalog.TRT_COMPAT[compat], None)
    if level is None:
        raise TensorRTError(
            f"trt_compat={compat}: TensorRT {trt.__version__} has no "
            f"{catalog.TRT_COMPAT[compat]} level; use trt_compat=ampere_plus or none"
        )
    return level


def make_builder_config(
    settings: Settings,
    part: str,
    io: dict,
    max_positions: int = 0,
    memory_pool_limits=None,
    compatibility=None,
):
    """Polygraphy's CreateConfig: one profile, the workspace limit, and the hardware
    compatibility level (None: TensorRT's default, this GPU model only). No precision flag, for
    any precision: TensorRT 11 removed them (weak typing), and the network is strongly typed
    (`make_network`), so the file's own types decide where each layer runs."""
    from polygraphy.backend.trt import CreateConfig

    return CreateConfig(
        profiles=[make_profile(settings, part, io, max_positions)],
        memory_pool_limits=memory_pool_limits,
        hardware_compatibility_level=compatibility,
    )


def make_network(settings: Settings, part: str):
    """Polygraphy's loader of a part's strongly typed network, from the file it is served from:
    the exported fp32 one, AutoCast's fp16 copy, or a ModelOpt Q/DQ copy (quantize stage).
    Required on TensorRT 11, accepted since 10.0: one code path for both."""
    from polygraphy.backend.trt import NetworkFromOnnxPath

    return NetworkFromOnnxPath(str(settings.model_file(part)), strongly_typed=True)


def gpus() -> list[tuple[int, str, str]]:
    """(index, name, compute capability) of each NVIDIA GPU here; [] without nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[field.strip() for field in line.split(",")] for line in out.stdout.splitlines()]
    return [(int(row[0]), row[1], row[2]) for row in rows if len(row) == 3]


def gpu_compute_capability() -> str | None:
    return ",".join(sorted({cc for _, _, cc in gpus()})) or None


def placement_problem(compat: str, built_on: str, serving: list[tuple[int, str, str]]) -> str:
    """Why a plan built on a GPU of compute capability `built_on` with `trt_compat` cannot
    load on every GPU of `serving` (index, name, compute capability), or ''."""
    if compat == "ampere_plus":
        if float(built_on) < 8.0:
            return (
                f"trt_compat=ampere_plus plans are built on Ampere or later GPUs; this one has "
                f"compute capability {built_on}: build on another (CUDA_VISIBLE_DEVICES=...), "
                "or use trt_compat=none"
            )
        old = [g for g in serving if float(g[2]) < 8.0]
        if old:
            shown = ", ".join(f"GPU {i} {n} ({cc})" for i, n, cc in old)
            return (
                f"trt_compat=ampere_plus plans load on GPUs of compute capability 8.0 and later, "
                f"not on {shown}: leave those out with gpus=, or use trt_compat=none"
            )
        return ""
    other = [g for g in serving if g[2] != built_on]
    if not other:
        return ""
    shown = ", ".join(f"GPU {i} {n} ({cc})" for i, n, cc in other)
    keep = ",".join(str(i) for i, _, cc in serving if cc == built_on)
    where = (
        f"serve it on gpus={keep}"
        if keep
        else f"build on one of them (CUDA_VISIBLE_DEVICES={serving[0][0]})"
    )
    return (
        f"the plan is built on a GPU of compute capability {built_on} (trt_compat={compat}) "
        f"and would not load on {shown}: {where}, or build portable plans with "
        "trt_compat=ampere_plus"
    )


def build_gpu(found: list[tuple[int, str, str]]) -> tuple[int, str, str]:
    """The GPU TensorRT builds on: CUDA's device 0, the first of CUDA_VISIBLE_DEVICES when it
    names GPUs by index (nvidia-smi lists them in PCI order; the compose files and this
    build set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA agrees)."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    by_index = {gpu[0]: gpu for gpu in found}
    return by_index.get(int(visible), found[0]) if visible.isdigit() else found[0]


def check_placement(settings: Settings, found: list[tuple[int, str, str]]) -> None:
    """Refuse a plan that some GPU of the deployment (of `found`, nvidia-smi's) could not load."""
    if not found:
        return
    chosen = settings.serving.gpus
    if missing := sorted(set(chosen) - {index for index, _, _ in found}):
        raise TensorRTError(
            f"gpus={','.join(map(str, chosen))}: no GPU {missing} here "
            f"(nvidia-smi lists {', '.join(str(i) for i, _, _ in found)})"
        )
    serving = [g for g in found if not chosen or g[0] in chosen]
    if problem := placement_problem(settings.trt_compat, build_gpu(found)[2], serving):
        raise TensorRTError(problem)


def served_plan_problems(models_dir, found: list[tuple[int, str, str]]) -> list[str]:
    """Why plans in a model repository could not load on these GPUs: each plan's record
    (`plan.json` beside it, copied by the repo stage) says where it was built and for what."""
    problems = []
    for record_file in sorted(models_dir.glob(f"*/*/{catalog.PLAN_RECORD_NAME}")):
        record = artifacts.read_json(record_file)
        built_on, compat = record.get("compute_capability"), record.get("trt_compat", "none")
        if not built_on or not found:
            continue
        chosen = record.get("gpus") or []
        serving = [g for g in found if not chosen or g[0] in chosen]
        if problem := placement_problem(compat, built_on, serving):
            model = record_file.parent.parent.name
            problems.append(
                f"{model}: {problem}; or rebuild its plan on this host (backend=tensorrt)"
            )
    return problems


def check_served_plans(models_dir) -> None:
    """Before serving: refuse plans that some GPU here could not load, naming the fix,
    rather than leave Triton to fail with TensorRT's own message."""
    found = gpus()
    if problems := served_plan_problems(models_dir, found):
        raise TensorRTError("plans built for other GPUs: " + " | ".join(problems))


def build_engine(settings: Settings, part: str) -> None:
    name = settings.name
    try:
        import tensorrt as trt
        from polygraphy.backend.trt import EngineBytesFromNetwork
    except ImportError as err:
        raise TensorRTError(
            "TensorRT is not installed; use backend=python or build in the "
            "exporter image (Dockerfile)"
        ) from err
    import os

    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's order = nvidia-smi's
    found = gpus()
    check_placement(settings, found)
    source = settings.model_file(part)  # the exported file, or its fp16 or Q/DQ copy
    artifacts.check_onnx(source, name)  # a clear error for a broken file
    io = artifacts.read_json(paths.onnx_io(name, part))
    positions = checkpoint_facts(name)["max_positions"] if settings.task.generation else 0
    limits = {trt.MemoryPoolType.WORKSPACE: catalog.TENSORRT_WORKSPACE_MIB << 20}
    compatibility = None
    if settings.trt_compat != "none":
        compatibility = compat_level(trt, settings.trt_compat)
    config = make_builder_config(
        settings, part, io, positions, memory_pool_limits=limits, compatibility=compatibility
    )
    print(
        f"plan: building a {settings.precision} engine of {part} (TensorRT {trt.__version__}, "
        f"trt_compat={settings.trt_compat}); "
        f"profile {profiles.profile_shapes(settings, part, io, positions)}",
        flush=True,
    )
    try:
        engine = EngineBytesFromNetwork(make_network(settings, part), config)()
    except Exception as err:  # Polygraphy raises its own exception, with TensorRT's log above
        raise TensorRTError(
            f"TensorRT could not build an engine of {part}.onnx: {' '.join(str(err).split())[:500]}"
            " "
            "(TensorRT's log is above; a smaller batch or seq MAX, or precision=fp32, may help)"
        ) from err
    target = paths.plan_file(name, part)
    with artifacts.atomic_target(target) as tmp:
        tmp.write_bytes(bytes(engine))
    bindings = profiles.binding_bytes(settings, part, io, positions)
    artifacts.write_json(
        paths.plan_record(name, part),
        {
            **artifacts.file_record(target),
            "tensorrt": trt.__version__,
            "trt_compat": settings.trt_compat,
            "compute_capability": build_gpu(found)[2] if found else None,
            "binding_bytes_per_instance": bindings,
            "gpus": list(settings.serving.gpus),
        },
    )
    print(
        f"plan: {part} holds {bindings / 2**30:.2f} GiB of bindings per instance "
        f"(profile maxima) and {target.stat().st_size / 2**30:.2f} GiB of weights",
        flush=True,
    )


def report_reservation(settings: Settings) -> None:
    """The GPU memory the deployment's engines reserve once Triton loads them (README); and
    the placement check again, since `gpus` may change without the plans."""
    check_placement(settings, gpus())
    name, parts = settings.name, settings.task.onnx_parts
    ios = {part: artifacts.read_json(paths.onnx_io(name, part)) for part in parts}
    positions = checkpoint_facts(name)["max_positions"] if settings.task.generation else 0
    plans = {part: paths.plan_file(name, part).stat().st_size for part in parts}
    per_part = profiles.reserved_per_gpu(settings, ios, plans, positions)
    print(f"plan: deployment '{name}' {profiles.describe_reservation(settings, per_part)}")
    artifacts.write_json(
        paths.plan_memory(name), {"bytes_per_gpu": per_part, "gpus": settings.serving.gpus}
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
        "ranges": profiles.dim_ranges(settings),
        "dims": catalog.PROFILE_DIMS,
        "precision": settings.precision,
        "typing": "strong",  # no precision flags: the file's types (make_network)
        "workspace_mib": catalog.TENSORRT_WORKSPACE_MIB,
        # the whole version: a plan loads only on the TensorRT release that built it
        "tensorrt": artifacts.versions("tensorrt")["tensorrt"],
        "compute_capability": gpu_compute_capability(),
        "trt_compat": settings.trt_compat,
    }
    records = []
    for part in settings.task.onnx_parts:
        targets = [paths.plan_file(name, part), paths.plan_record(name, part)]
        records.append(targets[1])
        yield {
            "name": plan_task_name(settings, part),
            "actions": [(fails_cleanly(build_engine), [settings, part])],
            "file_dep": [
                settings.model_file(part),  # TensorRT's parser reads its .data beside it
                *dict.fromkeys([settings.model_record(part), paths.onnx_io(name, part)]),
                paths.source_manifest(name),  # max_positions caps a causal LM's cache
                paths.stage_module("facts"),  # which reads it
                paths.stage_module("plan"),
                paths.stage_module("profiles"),
            ],
            "targets": targets,
            "uptodate": [config_changed(params), artifacts.file_matches_record(*targets)],
            "clean": [(artifacts.remove_artifacts, [targets])],
        }
    memory = paths.plan_memory(name)
    yield {  # parity depends on its file, so every build prints it
        "name": f"{name}-memory",
        "actions": [(fails_cleanly(report_reservation), [settings])],
        "file_dep": [
            *records,
            paths.stage_module("plan"),
            paths.stage_module("facts"),  # max_positions: the cache the engines reserve
            paths.stage_module("profiles"),
        ],
        "targets": [memory],
        "uptodate": [
            config_changed({"instances": settings.serving.instances, "gpus": settings.serving.gpus})
        ],
        "clean": [(artifacts.remove_artifacts, [[memory]])],
        "verbosity": 2,
    }
