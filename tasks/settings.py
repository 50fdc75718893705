"""Command-line variables become one frozen, validated `Settings` before any task runs.

    doit task=seqcls model=/path/to/model name=sst2 batch=1,8,32 seq=1,128,512 backend=python

This object is the one source of truth for shapes: the TensorRT profile, `max_batch_size`,
the input dims, the tokenizer's truncation and padding and the parity shapes all read it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from tasks import catalog, paths
from tasks.errors import SettingsError
from tasks.variables import DECODERS, VARIABLES, Profile, choose, default, whole

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _check_fields(values) -> None:
    """Validate a settings dataclass's fields as their variables would be on the command line."""
    for f in fields(values):
        VARIABLES[f.name].check(getattr(values, f.name))


@dataclass(frozen=True)
class ModelSource:
    """Where the checkpoint comes from: a local directory or a Hub id (+ revision)."""

    ref: str
    local: Path | None
    revision: str

    @property
    def is_local(self) -> bool:
        return self.local is not None

    def fingerprint(self) -> dict:
        """What identifies this checkpoint for `config_changed` (cheap: stat, no hashing)."""
        if self.local is None:
            return {"hub_id": self.ref, "revision": self.revision}
        files = sorted(
            (str(p.relative_to(self.local)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in self.local.rglob("*")
            if p.is_file() and ".git" not in p.parts
        )
        return {"local": str(self.local), "files": files}


def tensorrt_available() -> bool:
    """TensorRT importable and an NVIDIA GPU present (checked without importing anything)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    has_gpu = gpus.is_dir() and any(gpus.iterdir())
    return has_gpu and importlib.util.find_spec("tensorrt") is not None


@dataclass(frozen=True)
class Endpoints:
    """Which server `doit serve` runs and where it listens."""

    server: str = default("server")
    host: str = default("host")
    http_port: int = default("http_port")
    grpc_port: int = default("grpc_port")
    metrics_port: int = default("metrics_port")
    openai_port: int = default("openai_port")  # 0: no OpenAI API
    replicas: int = default("replicas")
    max_body_mb: int = default("max_body_mb")

    @property
    def faces_network(self) -> bool:
        """Whether `host` is reachable from other machines (anything but loopback)."""
        import ipaddress

        if self.host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return True

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.replicas > 1 and self.server != "embedded":
            raise SettingsError(
                f"replicas={self.replicas}: replicas are embedded servers behind nginx; "
                f"drop server={self.server}, or serve one with replicas=1"
            )
        ports = {
            "http_port": self.http_port,
            "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port,
        }
        if self.openai_port:
            ports["openai_port"] = self.openai_port
        if len(set(ports.values())) < len(ports):
            given = " ".join(f"{var}={port}" for var, port in ports.items())
            raise SettingsError(f"{given}: the ports must differ")


@dataclass(frozen=True)
class Storage:
    """Where the model repository lives (repo=), and how publish and serve treat it."""

    repo: str = default("repo")
    prune: int = default("prune")
    poll: float = default("poll")

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.poll and self.location is None:
            raise SettingsError(
                f"poll={self.poll:g}: polling watches a published repository; pass "
                "repo=s3://BUCKET/PREFIX (written by doit publish), or drop poll="
            )

    @property
    def location(self):
        """The bucket (storage.S3Location), or None for a local folder."""
        from tasks import storage

        return storage.s3_location(self.repo)


@dataclass(frozen=True)
class Serving:
    """Knobs of the generated configs, chosen by `doit bench` measurements (docs/benchmark.md)."""

    queue_delay_us: int = default("queue_delay_us")
    instances: int = default("instances")
    ort_threads: int = default("ort_threads")
    pad_multiple: int = default("pad_multiple")
    max_queue: int = default("max_queue")
    queue_timeout_ms: int = default("queue_timeout_ms")
    ort_spin: int = default("ort_spin")
    batch_waste: float = default("batch_waste")
    stream_interval: int | str = default("stream_interval")  # steps, or "auto"
    one_hop: int = default("one_hop")  # python backend, encoder tasks: see Settings.one_hop
    gpus: tuple[int, ...] = default("gpus")  # instance_group gpus of GPU models; () = every GPU

    def __post_init__(self) -> None:
        _check_fields(self)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Bench:
    """How `doit bench` drives the server: a concurrency sweep, a fixed time per point."""

    concurrency: tuple[int, ...] = default("concurrency")
    seconds: float = default("seconds")
    loadgen: str = default("loadgen")
    soak_minutes: float = default("soak_minutes")  # `doit soak`
    against: str = default("against")  # `doit bench`: another deployment measured beside this

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class Kubernetes:
    """Where `doit k8s` puts the pods and what each asks for (None: sized from the build)."""

    namespace: str = default("namespace")
    cpu: tuple[float, float] | None = default("cpu")  # cores: request, limit
    memory: tuple[int, int] | None = default("memory")  # MiB: request, limit

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) is not None:
                VARIABLES[f.name].check(getattr(self, f.name))


def _read(cls, given: Mapping[str, str]):
    """One of the dataclasses above, each field read from its variable."""
    return cls(**{f.name: VARIABLES[f.name].read(given) for f in fields(cls)})


@dataclass(frozen=True)
class Settings:
    task: catalog.TaskSpec
    source: ModelSource
    name: str
    batch: Profile
    seq: Profile
    precision: str
    backend: str  # resolved: tensorrt | onnxruntime | python
    decoder: str | None = None  # generation only: inline | models
    trt_compat: str = "none"  # catalog.TRT_COMPAT
    exporter: str = "auto"  # catalog.EXPORTERS; resolved per model type (tasks/exporters.py)
    endpoints: Endpoints = field(default_factory=Endpoints)
    serving: Serving = field(default_factory=Serving)
    storage: Storage = field(default_factory=Storage)
    bench: Bench = field(default_factory=Bench)
    kubernetes: Kubernetes = field(default_factory=Kubernetes)
    opset: int = catalog.ONNX_OPSET
    recipe: catalog.QuantRecipe | None = None  # precisions made from the fp32 file only
    block_size: int = 0  # 4-bit recipes only
    precision_note: str = ""  # why a default precision is not the obvious one (the build says)
    tolerance: catalog.Tolerance = field(init=False)

    def __post_init__(self) -> None:
        for var in ("precision", "trt_compat", "exporter"):
            VARIABLES[var].check(getattr(self, var))
        self._check_combination()
        # a quantized model's element-wise differences are recorded against fp32's tolerance,
        # and judged by its task-level gates (catalog.GATES)
        object.__setattr__(
            self, "tolerance", catalog.TOLERANCES.get(self.precision, catalog.TOLERANCES["fp32"])
        )

    def _check_combination(self) -> None:
        """Values each valid alone that do not go together."""
        backend, recipe = self.backend, self.recipe
        made = self.precision in catalog.FROM_FP32
        if made != (recipe is not None) or (made and recipe.precision != self.precision):
            raise SettingsError(
                f"precision={self.precision} with recipe={recipe.name if recipe else 'none'}: "
                f"{', '.join(catalog.FROM_FP32)} are made from the fp32 file by a recipe that "
                "makes them (settings.quantization chooses it), fp32 by none"
            )
        if self.decoder == "slots" and recipe is not None:
            raise SettingsError(
                f"decoder=slots with precision={self.precision}: the slot decoder is built in "
                "fp32 from the checkpoint; use precision=fp32, or decoder=inline"
            )
        if self.trt_compat != "none" and backend != "tensorrt":
            raise SettingsError(
                f"trt_compat={self.trt_compat}: only TensorRT plans have a hardware "
                f"compatibility; drop it for backend={backend}"
            )
        if backend == "tensorrt" and self.batch.min != 1:
            raise SettingsError(
                f"batch={self.batch.given or ','.join(map(str, self.batch.points()))}: Triton "
                "sends batches of any size from 1 to MAX, so the TensorRT profile's MIN batch "
                "must be 1"
            )
        if self.precision in catalog.QUANTIZED and self.task.name not in catalog.GATES:
            raise SettingsError(
                f"precision={self.precision}: task={self.task.name} has no quantization gate "
                "(catalog.GATES), so nothing would prove its quantized answers; use "
                "precision=fp32 or fp16"
            )
        if self.exporter == "torch" and self.task.generation not in catalog.TORCH_EXPORT_GENERATION:
            raise SettingsError(
                f"exporter=torch: the generic path exports causal LMs (task=causallm); "
                f"use exporter=optimum or exporter=auto for task={self.task.name}"
            )
        if self.serving.gpus and backend == "python":
            raise SettingsError(
                f"gpus={','.join(map(str, self.serving.gpus))}: the python backend runs on CPU; "
                "gpus= places TensorRT and ONNX Runtime models (backend=tensorrt or onnxruntime)"
            )

    @property
    def quantized(self) -> bool:
        return self.precision in catalog.QUANTIZED

    def model_file(self, part: str = "model") -> Path:
        """The ONNX file a part is served from: the exported one, or the copy the quantize
        stage made of it (quantized, or fp16)."""
        if self.recipe is not None:
            return paths.quant_file(self.name, part)
        return paths.onnx_file(self.name, part)

    def model_record(self, part: str = "model") -> Path:
        """The record of `model_file(part)`: its sha256, and its external data file's when its
        weights are beside it (a stage that reads the file depends on this record too, as the
        file's bytes alone do not change when only its weights do)."""
        if self.recipe is not None:
            return paths.quant_record(self.name, part)
        return paths.onnx_io(self.name, part)

    def plan_file(self, part: str = "model") -> Path | None:
        """The TensorRT engine a part is served from on backend=tensorrt; else None."""
        return paths.plan_file(self.name, part) if self.backend == "tensorrt" else None

    @property
    def one_hop(self) -> bool:
        """An encoder task on the python backend: one python model tokenizes, infers and
        answers (triton/pipeline/), the ensemble's only step. Native backends keep the
        tokenizer, the model and the answer step as models of their own (and so does the
        python backend with one_hop=0)."""
        return self.backend == "python" and not self.task.generation and bool(self.serving.one_hop)

    @property
    def triton_models(self) -> dict[str, str]:
        """Part -> Triton model name, in ensemble step order, the ensemble itself last."""
        if self.one_hop:
            parts = ["model"]
        elif not self.task.generation:
            parts = ["tokenizer", "model"]
        elif self.decoder == "models":  # each exported file is a model the loop calls (BLS)
            parts = ["tokenizer", *self.task.onnx_parts, "generate", "stream"]
        else:
            parts = ["tokenizer", "generate", "stream"]
        if self.task.postprocess is not None and not self.one_hop:
            parts.append("postprocess")
        names = {part: f"{self.name}{catalog.PART_SUFFIXES[part]}" for part in parts}
        names["ensemble"] = self.name
        return names

    @property
    def max_new_tokens(self) -> int:
        """Generation: the most new tokens a request may ask for (the seq profile's MAX)."""
        return self.seq.max

    @property
    def model_filename(self) -> str:
        return catalog.MODEL_FILES[self.backend]

    def shape_points(self) -> list[tuple[int, int]]:
        """(batch, seq) at the min, opt and max of the profile: where parity is checked."""
        return list(zip(self.batch.points(), self.seq.points()))


def quantization(precision: str, backend: str, variables: Mapping[str, str]):
    """The quantize recipe and 4-bit block size of a precision, checked at the door."""
    given, block = variables.get("recipe", ""), variables.get("block_size", "")
    if precision not in catalog.FROM_FP32:
        for var, value in (("recipe", given), ("block_size", block)):
            if value:
                raise SettingsError(
                    f"{var}={value}: only precisions made from the fp32 file "
                    f"({', '.join(catalog.FROM_FP32)}) take a {var}; drop it for "
                    f"precision={precision}"
                )
        return None, 0
    defaults = catalog.TENSORRT_RECIPES if backend == "tensorrt" else catalog.DEFAULT_RECIPES
    if precision not in defaults:  # nf4 and fp4 on TensorRT
        fits = " or ".join(p for p in catalog.TENSORRT_RECIPES if p in catalog.QUANTIZED)
        raise SettingsError(
            f"precision={precision}: NF4 and FP4 are ONNX Runtime's MatMulBnb4, which "
            "TensorRT cannot run; use backend=onnxruntime or backend=python, or "
            f"precision={fits} on TensorRT"
        )
    name = given or defaults[precision]
    recipe = catalog.QUANT_RECIPES.get(name)
    if recipe is None:
        raise SettingsError(
            f"recipe={name}: unknown; choose one of {', '.join(catalog.QUANT_RECIPES)}"
        )
    if recipe.precision != precision:
        fits = [r for r, q in catalog.QUANT_RECIPES.items() if q.precision == precision]
        raise SettingsError(
            f"recipe={name} makes {recipe.precision}, not precision={precision}; choose one "
            f"of {', '.join(fits)}"
        )
    if backend not in recipe.backends:
        raise SettingsError(
            f"recipe={name} makes ONNX Runtime's own quantized operators, which TensorRT "
            f"cannot build; use recipe={defaults[precision]} (ModelOpt's Q/DQ) on TensorRT"
        )
    if recipe.precision in ("int8", "fp16"):
        if block:
            raise SettingsError(f"block_size={block}: only 4-bit recipes take a block size")
        return recipe, 0
    default = {"bnb4": catalog.BNB4_BLOCK_SIZE, "modelopt": catalog.MODELOPT_BLOCK_SIZE}.get(
        recipe.method, catalog.BLOCK_SIZE
    )
    size = whole("block_size", block or str(default), 16, 4096)
    if size & (size - 1):
        raise SettingsError(f"block_size={size}: a power of two from 16, e.g. block_size=32")
    return recipe, size


def default_precision(spec: catalog.TaskSpec, backend: str) -> tuple[str, str]:
    """(precision, why) where none is given: fp16 on TensorRT, but for generation only where
    the measurement holds (catalog.FP16_GENERATION_BLOCKED: greedy parity is token for token);
    fp32 elsewhere (a CPU gains nothing from fp16)."""
    if backend != "tensorrt":
        return "fp32", ""
    why = catalog.FP16_GENERATION_BLOCKED.get(spec.generation or "", "")
    if why:
        return "fp32", (
            f"precision=fp32, not fp16, by default for {spec.name} on TensorRT: {why}; "
            "precision=fp16 tries it (parity judges)"
        )
    return "fp16", ""


def docker_engine_problem() -> str | None:
    """Why `server=docker` cannot work here, or None (asks the engine: only when chosen)."""
    import shutil
    import subprocess

    if not (shutil.which("docker-compose") or shutil.which("docker")):
        return "no docker or docker-compose on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return "`docker info` could not run"
    return None if info.returncode == 0 else "no Docker engine answers (`docker info` failed)"


def resolve_model(ref: str, revision: str) -> ModelSource:
    """A path that exists is local; a path-like ref that does not exist is an error."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SettingsError(f"model={ref}: not a directory; pass a model directory")
        if not (path / "config.json").is_file():
            raise SettingsError(
                f"model={ref}: no config.json in this directory; pass a Hugging Face model "
                "directory (as written by save_pretrained)"
            )
        return ModelSource(ref=ref, local=path.resolve(), revision=revision)
    if ref.startswith(("/", ".", "~")) or os.sep + os.sep in ref or not _HUB_ID.match(ref):
        raise SettingsError(
            f"model={ref}: this directory does not exist; pass an existing model directory "
            "or a Hugging Face Hub id such as org/name"
        )
    return ModelSource(ref=ref, local=None, revision=revision)


def model_positions(config_path: Path | None) -> int:
    """How many tokens the model takes (its position embeddings), or 0 when unknown."""
    if config_path is None or not config_path.is_file():
        return 0
    config = json.loads(config_path.read_text())
    limit = config.get("max_position_embeddings") or config.get("n_positions") or 0
    if config.get("model_type") in catalog.POSITIONS_AFTER_PADDING and limit:
        limit -= config.get("pad_token_id", 1) + 1
    return limit


def check_shapes_fit_model(
    settings: Settings, config_path: Path | None, seq_given: bool = True
) -> None:
    """Refuse a max sequence the model cannot take (its position embeddings)."""
    limit = model_positions(config_path)
    if limit and settings.seq.max > limit:
        hint = (
            f"use seq=MIN,OPT,{limit} or less"
            if seq_given
            else "run doit again: the default seq is fitted to the model once its config is here"
        )
        raise SettingsError(
            f"seq={settings.seq.min},{settings.seq.opt},{settings.seq.max}: the model takes at "
            f"most {limit} tokens (max_position_embeddings); {hint}"
        )


def fitted_seq(given: Mapping[str, str], config_path: Path | None) -> Profile:
    """`seq` as given, or the default with its MAX cut to the model's positions (and OPT with
    it), said on stderr: a default must fit the model it is for."""
    seq = VARIABLES["seq"].read(given)
    limit = model_positions(config_path)
    if "seq" in given or not limit or seq.max <= limit:
        return seq
    fitted = Profile("seq", min(seq.min, limit), min(seq.opt, limit), limit)
    print(
        f"seq: the default {seq.min},{seq.opt},{seq.max} is cut to {fitted.min},{fitted.opt},"
        f"{fitted.max}: the model takes at most {limit} tokens (max_position_embeddings); "
        "pass seq=MIN,OPT,MAX to choose",
        file=sys.stderr,
    )
    return fitted


def known_config(source: ModelSource, name: str) -> Path | None:
    """The model's config.json if it is already at hand: local, or downloaded for this ref."""
    if source.local is not None:
        return source.local / "config.json"
    manifest = paths.source_manifest(name)
    if manifest.is_file() and json.loads(manifest.read_text()).get("ref") == source.ref:
        return paths.source_config(name)
    return None  # the download stage checks it once it has the model


def choose_decoder(task_name: str, spec: catalog.TaskSpec, backend: str, given: str):
    """Where a generation task's exported files run: inside the generate model, or as models."""
    if not spec.generation:
        if given:
            raise SettingsError(
                f"decoder={given}: only generation tasks (t5, causallm) have a decoder; "
                f"drop it for task={task_name}"
            )
        return None
    decoder = choose("decoder", given or ("inline" if backend == "python" else "models"), DECODERS)
    if decoder in ("inline", "slots") and backend != "python":
        raise SettingsError(
            f"decoder={decoder}: ONNX Runtime inside the generate model is backend=python; "
            f"backend={backend} serves each exported file as a Triton model (decoder=models)"
        )
    if decoder == "slots" and spec.generation != "causal":
        raise SettingsError(
            f"decoder=slots: a causal LM's graph (task=causallm); task={task_name} takes "
            "decoder=inline or models"
        )
    return decoder


def load_settings(given: Mapping[str, str]) -> Settings:
    """Validate the command line's NAME=VALUE pairs, every one read through VARIABLES."""
    check_known(given)
    VARIABLES["suite"].read(given)  # doit test's alone (tasks/test.py), checked with the rest
    task_name = VARIABLES["task"].read(given)
    spec = catalog.TASKS[task_name]
    backend = VARIABLES["backend"].read(given)
    trt = tensorrt_available()
    if backend == "auto":
        backend = "tensorrt" if trt else "python"
    decoder = choose_decoder(task_name, spec, backend, given.get("decoder", ""))
    if backend == "tensorrt" and not trt:
        raise SettingsError(
            "backend=tensorrt: TensorRT and an NVIDIA GPU are needed and were not found; "
            "use backend=python (ONNX Runtime inside Triton) or build on a GPU host "
            "(see the Dockerfile)"
        )
    precision, note = VARIABLES["precision"].read(given), ""
    if precision is None:
        precision, note = default_precision(spec, backend)
    recipe, block_size = quantization(precision, backend, given)
    name, model = VARIABLES["name"].read(given), VARIABLES["model"].read(given)
    name = task_name if name is None else name
    source = resolve_model(
        spec.default_model if model is None else model, VARIABLES["revision"].read(given)
    )
    settings = Settings(
        task=spec,
        name=name,
        trt_compat=VARIABLES["trt_compat"].read(given),
        exporter=VARIABLES["exporter"].read(given),
        source=source,
        batch=VARIABLES["batch"].read(given),
        seq=fitted_seq(given, known_config(source, name)),
        precision=precision,
        precision_note=note,
        recipe=recipe,
        block_size=block_size,
        backend=backend,
        decoder=decoder,
        endpoints=_read(Endpoints, given),
        serving=_read(Serving, given),
        storage=_read(Storage, given),
        bench=_read(Bench, given),
        kubernetes=_read(Kubernetes, given),
    )
    if settings.endpoints.server == "docker" and (problem := docker_engine_problem()):
        raise SettingsError(
            f"server=docker: {problem}; start Docker with the NVIDIA container "
            "toolkit, or use server=embedded"
        )
    check_shapes_fit_model(settings, known_config(source, name), "seq" in given)
    return settings


def command_line() -> dict[str, str]:
    """This doit run's NAME=VALUE pairs. doit's public `get_var` reads one name at a time, and a
    misspelt name must be refused, not ignored: so the whole record is read, only here."""
    from doit import doit_cmd

    return dict(doit_cmd._CMDLINE_VARS or {})


_CURRENT: Settings | None = None


def current() -> Settings:
    """The settings of this doit run, read from the command line once."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = load_settings(command_line())
    return _CURRENT


def check_known(given: Mapping[str, str]) -> None:
    """A misspelt variable must not be silently ignored."""
    for var, value in given.items():
        if var not in VARIABLES:
            raise SettingsError(
                f"{var}={value}: unknown variable; use one of {', '.join(VARIABLES)}"
            )
