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
from dataclasses import dataclass, field
from pathlib import Path

from tasks import catalog, paths
from tasks.errors import SettingsError

VARIABLES = {
    "task": f"one of {', '.join(catalog.TASKS)} (default {catalog.DEFAULT_TASK})",
    "model": "a Hugging Face Hub id or a local model directory (default: per task)",
    "name": "deployment name in models/ (default: the task)",
    "revision": "Hub revision to download (default main)",
    "batch": "MIN,OPT,MAX batch sizes (default 1,8,32)",
    "seq": "MIN,OPT,MAX sequence lengths in tokens (default 1,128,512)",
    "precision": "fp32 | fp16 | int8 | int4 | nf4 | fp4 (default fp16 on TensorRT for encoder "
    "tasks, else fp32); int8 and the 4-bit ones are made from the fp32 file by the quantize "
    "stage and gated on task-level agreement",
    "recipe": "quantize: "
    + " | ".join(catalog.QUANT_RECIPES)
    + " (default: "
    + ", ".join(f"{p}: {r}" for p, r in catalog.DEFAULT_RECIPES.items())
    + "; on tensorrt "
    + ", ".join(f"{p}: {r}" for p, r in catalog.TENSORRT_RECIPES.items())
    + ")",
    "block_size": f"4-bit weights: values per scale (default {catalog.BLOCK_SIZE}; nf4/fp4 "
    f"{catalog.BNB4_BLOCK_SIZE}, int4-awq {catalog.MODELOPT_BLOCK_SIZE})",
    "backend": "auto | tensorrt | onnxruntime | python (default auto)",
    "decoder": "generation: inline (ONNX Runtime inside the generate model; backend=python) | "
    "models (each exported file a Triton model, called through BLS; the only choice on "
    "tensorrt and onnxruntime) (default: inline on python)",
    "server": "embedded (tritonserver from the nvidia-pytriton wheel) | docker (default embedded)",
    "queue_delay_us": f"dynamic batching delay in microseconds (default {catalog.QUEUE_DELAY_US})",
    "instances": "instances of the model step (default 1)",
    "queue_timeout_ms": "a request that waited this long in a model's queue is rejected "
    f"(UNAVAILABLE, HTTP 503); 0 = never (default {catalog.QUEUE_TIMEOUT_MS})",
    "max_queue": "requests each model queues before it rejects more at once (UNAVAILABLE, "
    f"HTTP 503); 0 = no bound (default {catalog.MAX_QUEUE})",
    "gpus": "GPU ids the engines' instances run on, e.g. gpus=0,1 (default: every GPU)",
    "trt_compat": "none | same_cc | ampere_plus: which GPUs a TensorRT plan loads on "
    "(default none: the GPU model it was built on)",
    "ort_threads": "ONNX Runtime intra-op threads per instance, 0 = its own choice "
    f"(default {catalog.INTRA_OP_THREADS})",
    "ort_spin": "1 | 0: ONNX Runtime's threads spin while waiting for work "
    f"(default {catalog.ORT_SPINNING})",
    "batch_waste": "encoder tasks: requests of different lengths share a padded batch while "
    f"padding adds at most this factor of tokens (default {catalog.BATCH_WASTE})",
    "one_hop": "1 | 0: on the python backend one model tokenizes, infers and answers; 0 keeps "
    "the tokenizer, model and answer steps of the native backends (default 1)",
    "pad_multiple": "pad token lengths up to a multiple, so requests batch (default 1: off)",
    "concurrency": "`doit bench`: concurrency levels (default 1,2,4,8,16)",
    "seconds": "`doit bench`: seconds per point (default 5)",
    "against": "`doit bench`: another deployment of the same task to measure beside this one "
    "(e.g. name=encode8 against=encode: int8 beside fp32), speedup and accuracy side by side",
    "soak_minutes": "`doit soak`: minutes of mixed traffic, a stub killed halfway (default 10)",
    "loadgen": "`doit bench`: python (ours, every answer checked) | perf_analyzer (NVIDIA's, "
    "C++, fetched once) (default python)",
    "host": "address `doit serve` binds (default 127.0.0.1)",
    "http_port": "HTTP port of `doit serve` (default 8000)",
    "grpc_port": "gRPC port of `doit serve` (default 8001)",
    "metrics_port": "metrics port of `doit serve` (default 8002)",
}

SERVERS = ("embedded", "docker")
DECODERS = ("inline", "models")
LOADGENS = ("python", "perf_analyzer")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class Profile:
    """A MIN,OPT,MAX triple: one dimension of the shape profile."""

    var: str
    min: int
    opt: int
    max: int
    given: str = field(default="", compare=False)  # as typed, for error messages

    def __post_init__(self) -> None:
        text = f"{self.var}={self.given or f'{self.min},{self.opt},{self.max}'}"
        if self.min < 1:
            raise SettingsError(f"{text}: sizes must be at least 1, e.g. {self.var}=1,8,32")
        if not self.min <= self.opt <= self.max:
            raise SettingsError(f"{text}: MIN,OPT,MAX must satisfy MIN <= OPT <= MAX")

    @classmethod
    def parse(cls, var: str, text: str) -> Profile:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) == 1:
            parts = parts * 3  # batch=8 means a fixed size
        if len(parts) != 3 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
            raise SettingsError(
                f"{var}={text}: expected MIN,OPT,MAX as three whole numbers, e.g. {var}=1,8,32"
            )
        return cls(var, *(int(p) for p in parts), given=text)

    def points(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)


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

    server: str = "embedded"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    def __post_init__(self) -> None:
        _choose("server", self.server, SERVERS)
        ports = {
            "http_port": self.http_port,
            "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port,
        }
        for var, port in ports.items():
            if not 1 <= port <= 65535:
                raise SettingsError(f"{var}={port}: a port is a number from 1 to 65535")
        if len(set(ports.values())) < 3:
            given = " ".join(f"{var}={port}" for var, port in ports.items())
            raise SettingsError(f"{given}: the three ports must differ")

    @classmethod
    def parse(cls, get_var) -> Endpoints:
        values = {}
        for field_ in ("http_port", "grpc_port", "metrics_port"):
            text = get_var(field_, str(getattr(cls, field_)))
            if not re.fullmatch(r"\d+", text):
                raise SettingsError(f"{field_}={text}: a port is a number from 1 to 65535")
            values[field_] = int(text)
        return cls(server=get_var("server", cls.server), host=get_var("host", cls.host), **values)


def _whole(var: str, text: str, low: int, high: int) -> int:
    if not re.fullmatch(r"\d+", text) or not low <= int(text) <= high:
        raise SettingsError(f"{var}={text}: expected a whole number from {low} to {high}")
    return int(text)


@dataclass(frozen=True)
class Serving:
    """Knobs of the generated configs, chosen by `doit bench` measurements (see README)."""

    queue_delay_us: int = catalog.QUEUE_DELAY_US
    instances: int = catalog.MODEL_INSTANCES
    ort_threads: int = catalog.INTRA_OP_THREADS
    pad_multiple: int = catalog.PAD_MULTIPLE
    max_queue: int = catalog.MAX_QUEUE
    queue_timeout_ms: int = catalog.QUEUE_TIMEOUT_MS
    ort_spin: int = catalog.ORT_SPINNING
    batch_waste: float = catalog.BATCH_WASTE
    one_hop: int = 1  # python backend, encoder tasks: see Settings.one_hop
    gpus: tuple[int, ...] = ()  # instance_group gpus of GPU models; () = every GPU

    @classmethod
    def parse(cls, get_var) -> Serving:
        given = get_var("gpus", "")
        gpus = tuple(_whole("gpus", g.strip(), 0, 63) for g in given.split(",")) if given else ()
        if len(set(gpus)) != len(gpus):
            raise SettingsError(f"gpus={given}: each GPU id once, e.g. gpus=0,1")
        waste_text = get_var("batch_waste", str(cls.batch_waste))
        try:
            waste = float(waste_text)
        except ValueError:
            waste = 0.0
        if not 1 <= waste <= 100:
            raise SettingsError(
                f"batch_waste={waste_text}: expected a factor from 1 (only equal lengths share "
                "a call) to 100, e.g. batch_waste=2"
            )
        return cls(
            gpus=gpus,
            ort_spin=_whole("ort_spin", get_var("ort_spin", str(cls.ort_spin)), 0, 1),
            one_hop=_whole("one_hop", get_var("one_hop", str(cls.one_hop)), 0, 1),
            max_queue=_whole("max_queue", get_var("max_queue", str(cls.max_queue)), 0, 10**6),
            queue_timeout_ms=_whole(
                "queue_timeout_ms", get_var("queue_timeout_ms", str(cls.queue_timeout_ms)), 0, 10**6
            ),
            batch_waste=waste,
            queue_delay_us=_whole(
                "queue_delay_us", get_var("queue_delay_us", str(cls.queue_delay_us)), 0, 10**6
            ),
            instances=_whole("instances", get_var("instances", str(cls.instances)), 1, 64),
            ort_threads=_whole("ort_threads", get_var("ort_threads", str(cls.ort_threads)), 0, 256),
            pad_multiple=_whole(
                "pad_multiple", get_var("pad_multiple", str(cls.pad_multiple)), 1, 512
            ),
        )

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Bench:
    """How `doit bench` drives the server: a concurrency sweep, a fixed time per point."""

    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    seconds: float = 5.0
    loadgen: str = "python"  # or perf_analyzer
    soak_minutes: float = 10.0  # `doit soak`
    against: str = ""  # `doit bench`: another deployment measured beside this one

    @classmethod
    def parse(cls, get_var) -> Bench:
        levels = get_var("concurrency", ",".join(map(str, cls.concurrency)))
        concurrency = tuple(_whole("concurrency", p.strip(), 1, 256) for p in levels.split(","))
        text = get_var("seconds", str(cls.seconds))
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 3600:
            raise SettingsError(f"seconds={text}: expected seconds per point, e.g. seconds=2")
        loadgen = _choose("loadgen", get_var("loadgen", cls.loadgen), LOADGENS)
        text = get_var("soak_minutes", str(cls.soak_minutes))
        try:
            minutes = float(text)
        except ValueError:
            minutes = -1.0
        if not 0.1 <= minutes <= 24 * 60:
            raise SettingsError(
                f"soak_minutes={text}: expected minutes from 0.1 to 1440, e.g. soak_minutes=10"
            )
        against = get_var("against", "")
        if against and not _NAME.match(against):
            raise SettingsError(f"against={against}: a deployment name, e.g. against=encode")
        return cls(
            concurrency=concurrency,
            seconds=seconds,
            loadgen=loadgen,
            soak_minutes=minutes,
            against=against,
        )


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
    endpoints: Endpoints = field(default_factory=Endpoints)
    serving: Serving = field(default_factory=Serving)
    bench: Bench = field(default_factory=Bench)
    opset: int = catalog.ONNX_OPSET
    recipe: catalog.QuantRecipe | None = None  # quantized precisions only
    block_size: int = 0  # 4-bit recipes only
    tolerance: catalog.Tolerance = field(init=False)

    def __post_init__(self) -> None:
        # a quantized model's element-wise differences are recorded against fp32's tolerance,
        # and judged by its task-level gates (catalog.GATES)
        object.__setattr__(
            self, "tolerance", catalog.TOLERANCES.get(self.precision, catalog.TOLERANCES["fp32"])
        )

    @property
    def quantized(self) -> bool:
        return self.precision in catalog.QUANTIZED

    def model_file(self, part: str = "model") -> Path:
        """The ONNX file a part is served from: the exported one, or its quantized copy."""
        if self.quantized:
            return paths.quant_file(self.name, part)
        return paths.onnx_file(self.name, part)

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


def quantization(precision: str, backend: str, get_var):
    """The quantize recipe and 4-bit block size of a precision, checked at the door."""
    given, block = get_var("recipe", ""), get_var("block_size", "")
    if precision not in catalog.QUANTIZED:
        for var, value in (("recipe", given), ("block_size", block)):
            if value:
                raise SettingsError(
                    f"{var}={value}: only quantized precisions ({', '.join(catalog.QUANTIZED)}) "
                    f"take a {var}; drop it for precision={precision}"
                )
        return None, 0
    defaults = catalog.TENSORRT_RECIPES if backend == "tensorrt" else catalog.DEFAULT_RECIPES
    if precision not in defaults:  # nf4 and fp4 on TensorRT
        raise SettingsError(
            f"precision={precision}: NF4 and FP4 are ONNX Runtime's MatMulBnb4, which "
            "TensorRT cannot run; use backend=onnxruntime or backend=python, or "
            f"precision={' or '.join(catalog.TENSORRT_RECIPES)} on TensorRT"
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
    if recipe.precision == "int8":
        if block:
            raise SettingsError(f"block_size={block}: only 4-bit recipes take a block size")
        return recipe, 0
    default = {"bnb4": catalog.BNB4_BLOCK_SIZE, "modelopt": catalog.MODELOPT_BLOCK_SIZE}.get(
        recipe.method, catalog.BLOCK_SIZE
    )
    size = _whole("block_size", block or str(default), 16, 4096)
    if size & (size - 1):
        raise SettingsError(f"block_size={size}: a power of two from 16, e.g. block_size=32")
    return recipe, size


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


def _choose(var: str, value: str, choices) -> str:
    if value not in choices:
        raise SettingsError(f"{var}={value}: unknown {var}; choose one of {', '.join(choices)}")
    return value


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


def check_shapes_fit_model(settings: Settings, config_path: Path | None) -> None:
    """Refuse a max sequence the model cannot take (its position embeddings)."""
    if config_path is None or not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if config.get("model_type") in catalog.POSITIONS_AFTER_PADDING and limit:
        limit -= config.get("pad_token_id", 1) + 1
    if limit and settings.seq.max > limit:
        raise SettingsError(
            f"seq={settings.seq.min},{settings.seq.opt},{settings.seq.max}: the model takes at "
            f"most {limit} tokens (max_position_embeddings); use seq=MIN,OPT,{limit} or less"
        )


def known_config(settings: Settings) -> Path | None:
    """The model's config.json if it is already at hand: local, or downloaded for this ref."""
    if settings.source.local is not None:
        return settings.source.local / "config.json"
    manifest = paths.source_manifest(settings.name)
    if manifest.is_file() and json.loads(manifest.read_text()).get("ref") == settings.source.ref:
        return paths.source_config(settings.name)
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
    decoder = _choose("decoder", given or ("inline" if backend == "python" else "models"), DECODERS)
    if decoder == "inline" and backend != "python":
        raise SettingsError(
            f"decoder=inline: ONNX Runtime inside the generate model is backend=python; "
            f"backend={backend} serves each exported file as a Triton model (decoder=models)"
        )
    return decoder


def load_settings(get_var) -> Settings:
    """Read every variable once through doit's `get_var` and validate it."""
    task_name = _choose("task", get_var("task", catalog.DEFAULT_TASK), catalog.TASKS)
    spec = catalog.TASKS[task_name]
    backend = _choose("backend", get_var("backend", "auto"), catalog.BACKENDS)
    trt = tensorrt_available()
    if backend == "auto":
        backend = "tensorrt" if trt else "python"
    decoder = choose_decoder(task_name, spec, backend, get_var("decoder", ""))
    if backend == "tensorrt" and not trt:
        raise SettingsError(
            "backend=tensorrt: TensorRT and an NVIDIA GPU are needed and were not found; "
            "use backend=python (ONNX Runtime inside Triton) or build on a GPU host "
            "(see the Dockerfile)"
        )
    # fp16 engines by default, but not for generation: greedy parity is token for token, and
    # fp16 flips near-ties (and overflows in T5); ask for precision=fp16 to try it
    precision = get_var(
        "precision", "fp16" if backend == "tensorrt" and not spec.generation else "fp32"
    )
    _choose("precision", precision, catalog.PRECISIONS)
    if precision == "fp16" and backend != "tensorrt":
        raise SettingsError(
            f"precision=fp16: fp16 engines need TensorRT, and backend={backend}; "
            "use precision=fp32, or backend=tensorrt on a host with TensorRT and a GPU"
        )
    recipe, block_size = quantization(precision, backend, get_var)
    name = get_var("name", task_name)
    if not _NAME.match(name):
        raise SettingsError(
            f"name={name}: use letters, digits, '_' and '-', starting with a letter"
        )
    if name.endswith(tuple(catalog.PART_SUFFIXES.values())):
        raise SettingsError(
            f"name={name}: names ending in {', '.join(catalog.PART_SUFFIXES.values())} name the "
            "parts of a deployment; choose another name"
        )
    trt_compat = _choose("trt_compat", get_var("trt_compat", "none"), catalog.TRT_COMPAT)
    if trt_compat != "none" and backend != "tensorrt":
        raise SettingsError(
            f"trt_compat={trt_compat}: only TensorRT plans have a hardware compatibility; "
            f"drop it for backend={backend}"
        )
    settings = Settings(
        task=spec,
        trt_compat=trt_compat,
        source=resolve_model(get_var("model", spec.default_model), get_var("revision", "main")),
        name=name,
        batch=Profile.parse("batch", get_var("batch", "1,8,32")),
        seq=Profile.parse("seq", get_var("seq", "1,128,512")),
        precision=precision,
        recipe=recipe,
        block_size=block_size,
        backend=backend,
        decoder=decoder,
        endpoints=Endpoints.parse(get_var),
        serving=Serving.parse(get_var),
        bench=Bench.parse(get_var),
    )
    if settings.endpoints.server == "docker" and (problem := docker_engine_problem()):
        raise SettingsError(
            f"server=docker: {problem}; start Docker with the NVIDIA container "
            "toolkit, or use server=embedded"
        )
    if backend == "tensorrt" and settings.batch.min != 1:
        raise SettingsError(
            f"batch={settings.batch.given}: Triton sends batches of any size from 1 to MAX, so "
            "the TensorRT profile's MIN batch must be 1"
        )
    if settings.serving.gpus and backend == "python":
        raise SettingsError(
            f"gpus={get_var('gpus', '')}: the python backend runs on CPU; gpus= places "
            "TensorRT and ONNX Runtime models (backend=tensorrt or onnxruntime)"
        )
    check_shapes_fit_model(settings, known_config(settings))
    return settings


_CURRENT: Settings | None = None


def current() -> Settings:
    """The settings of this doit run, read from the command line once."""
    global _CURRENT
    if _CURRENT is None:
        from doit import doit_cmd, get_var

        check_known(doit_cmd._CMDLINE_VARS or {})
        _CURRENT = load_settings(get_var)
    return _CURRENT


def check_known(given: dict) -> None:
    """A misspelt variable must not be silently ignored."""
    for var, value in given.items():
        if var not in VARIABLES:
            raise SettingsError(
                f"{var}={value}: unknown variable; use one of {', '.join(VARIABLES)}"
            )
