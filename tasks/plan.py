"""Stage `plan`: the TensorRT engine, built from the ONNX file with the settings' profile.

In the DAG only when the backend is `tensorrt` (settings refuse that backend where TensorRT
or a GPU is missing). Its staleness includes the TensorRT version and the GPU's compute
capability, so a plan built for another GPU or TensorRT release is rebuilt.
"""

from __future__ import annotations

import subprocess

from doit.tools import config_changed

from tasks import artifacts, catalog, paths
from tasks.errors import TensorRTError, fails_cleanly
from tasks.settings import Settings, current


def profile_shapes(settings: Settings, io: dict) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name -> (min, opt, max) shapes; every text input is (batch, seq)."""
    shapes = {}
    for tensor in io["inputs"]:
        if len(tensor["shape"]) != 2:
            raise TensorRTError(
                f"input {tensor['name']} has shape {tensor['shape']}; "
                "only (batch, sequence) inputs are supported"
            )
        shapes[tensor["name"]] = tuple(zip(settings.batch.points(), settings.seq.points()))
    return shapes


def make_profile(settings: Settings, io: dict):
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, (low, opt, high) in profile_shapes(settings, io).items():
        profile.add(name, min=low, opt=opt, max=high)
    return profile


def make_builder_config(settings: Settings, io: dict, memory_pool_limits=None):
    """Polygraphy's CreateConfig: one profile, fp16 when asked, the workspace limit."""
    from polygraphy.backend.trt import CreateConfig

    return CreateConfig(
        fp16=settings.precision == "fp16",
        profiles=[make_profile(settings, io)],
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


def build_engine(settings: Settings) -> None:
    name = settings.name
    try:
        import tensorrt as trt
        from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath
    except ImportError as err:
        raise TensorRTError(
            "TensorRT is not installed; use backend=python or build in the "
            "exporter image (Dockerfile)"
        ) from err
    artifacts.load_onnx(paths.onnx_file(name), name)  # a clear error for a broken file
    io = artifacts.read_json(paths.onnx_io(name))
    limits = {trt.MemoryPoolType.WORKSPACE: catalog.TENSORRT_WORKSPACE_MIB << 20}
    config = make_builder_config(settings, io, memory_pool_limits=limits)
    print(
        f"plan: building a {settings.precision} engine (TensorRT {trt.__version__}); "
        f"profile {profile_shapes(settings, io)}",
        flush=True,
    )
    engine = EngineBytesFromNetwork(NetworkFromOnnxPath(str(paths.onnx_file(name))), config)()
    target = paths.plan_file(name)
    with artifacts.atomic_target(target) as tmp:
        tmp.write_bytes(bytes(engine))
    artifacts.write_json(
        paths.plan_record(name), {**artifacts.file_record(target), "tensorrt": trt.__version__}
    )


def task_plan():
    """TensorRT engine from the ONNX file with the min/opt/max profile (backend=tensorrt only)."""
    settings = current()
    if settings.backend != "tensorrt":
        return
    name = settings.name
    params = {
        "batch": settings.batch.points(),
        "seq": settings.seq.points(),
        "precision": settings.precision,
        "workspace_mib": catalog.TENSORRT_WORKSPACE_MIB,
        "tensorrt": artifacts.versions("tensorrt")["tensorrt"],
        "compute_capability": gpu_compute_capability(),
    }
    targets = [paths.plan_file(name), paths.plan_record(name)]
    yield {
        "name": name,
        "actions": [(fails_cleanly(build_engine), [settings])],
        "file_dep": [paths.onnx_file(name), paths.onnx_io(name), paths.stage_module("plan")],
        "targets": targets,
        "uptodate": [config_changed(params), artifacts.file_matches_record(*targets)],
        "clean": [(artifacts.remove_artifacts, [targets])],
    }
