"""Every path the build reads or writes, in one place.

No other module joins path strings: stages ask this module for the file they need.
Artifacts are files (never folders) so doit can track them and `doit clean` can remove them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = ROOT / "tasks"
TEMPLATES_DIR = ROOT / "templates"
TRITON_DIR = ROOT / "triton"
TESTS_DIR = ROOT / "tests"
MODEL_ZOO = ROOT / "model_zoo"
MODELS = ROOT / "models"
# doit's record of what was built lives beside what it built: a mounted model_zoo/ (the
# exporter image's volume) carries it from one `docker compose run --rm` to the next.
DEP_FILE = MODEL_ZOO / ".doit.db"
TREE_LOCK = MODEL_ZOO / ".doit.db.lock"  # held by the one doit running in this tree
# `doit serve`'s server log: outside the tree (not a build artifact), printed at start.
SERVER_LOG = Path(tempfile.gettempdir()) / "llm-in-triton" / "tritonserver.log"
CLIENT = ROOT / "triton" / "send_request.py"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"  # its server stage's FROM line: the image k8s/ runs
SERVER_REQUIREMENTS = ROOT / "requirements" / "server.txt"  # what python-backend models import
BUILD_REQUIREMENTS = ROOT / "requirements" / "build.txt"  # the build's pins (boto3 among them)
README = ROOT / "README.md"  # the one page; the manual is docs/, one file per subject
DOCS = ROOT / "docs"
VARIABLES_DOC = DOCS / "variables.md"  # its table of variables is made from tasks/variables.py
DECODERS_DOC = DOCS / "decoders.md"  # made by `python -m tasks.decoders`
# tiny random decoders built through parity (python -m tests.helpers.decoder_parity TYPE...)
DECODER_PARITY = TASKS_DIR / "data" / "decoder_parity.json"

# Tools fetched once for the user (not build artifacts): outside the tree, in their cache.
TOOLS_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-in-triton"
# The library that keeps secrets off tritonserver's command line, compiled once per source.
SECRET_ARGS_BUILD = TOOLS_CACHE / "secret-args"
# The admin secret of the servers `doit serve` starts from this tree (model control, shared
# memory, trace, logging): made on first use, 0600 in a 0700 folder, never in git or an image.
SECRETS_DIR = ROOT / ".secrets"
ADMIN_KEY = SECRETS_DIR / "admin-key"

# Directories the build may create below; `doit clean` prunes empty ones up to these roots.
ARTIFACT_ROOTS = (MODEL_ZOO, MODELS)


def stage_module(stage: str) -> Path:
    """The implementation module of a stage: part of its `file_dep`, so editing it rebuilds."""
    return TASKS_DIR / f"{stage}.py"


# --- model_zoo/<name>/: per-deployment intermediates -------------------------------------


def zoo_dir(name: str) -> Path:
    return MODEL_ZOO / name


def source_dir(name: str) -> Path:
    """The downloaded (or copied) Hugging Face checkpoint, task head included."""
    return zoo_dir(name) / "source"


def source_manifest(name: str) -> Path:
    """Written last by `download`: lists every file of the checkpoint."""
    return source_dir(name) / "manifest.json"


def source_file(name: str, filename: str) -> Path:
    return source_dir(name) / filename


def source_config(name: str) -> Path:
    return source_file(name, "config.json")


def source_tokenizer(name: str) -> Path:
    return source_file(name, "tokenizer.json")


CHAT_FILE = "chat.json"  # its name beside the generate model too (triton/openai_api/ reads it)


def source_chat(name: str) -> Path:
    """A causal LM's chat template and the special tokens it renders with (download)."""
    return source_file(name, CHAT_FILE)


def onnx_file(name: str, part: str = "model") -> Path:
    """An exported ONNX file; generation tasks export several parts (encoder, decoders)."""
    return zoo_dir(name) / "onnx" / f"{part}.onnx"


SLOT_DECODER_STEMS = ("decoder_slots", "decoder_slots_mixed")  # the step's graph, its twin's


def slot_decoder_files(name: str) -> list[tuple[Path, Path]]:
    """decoder=slots' graphs, each with its record (sha256, opset): the causal LM as one graph
    whose cache is written in place, then its twin that also prefills joining prompts in the
    running rows' step (tasks/slot_decoder.py)."""
    folder = zoo_dir(name) / "onnx"
    return [(folder / f"{s}.onnx", folder / f"{s}.json") for s in SLOT_DECODER_STEMS]


def external_data_file(onnx_file: Path) -> Path:
    """Where an ONNX file's weights are when they are not inside it (catalog.EXTERNAL_DATA_BYTES):
    beside it, under the name its graph refers to, wherever the pair is copied."""
    return onnx_file.with_name(f"{onnx_file.name}.data")


def quant_file(name: str, part: str = "model") -> Path:
    """A part's quantized ONNX file (int8, int4, nf4, fp4), made from `onnx_file`."""
    return zoo_dir(name) / "quant" / f"{part}.onnx"


def quant_record(name: str, part: str = "model") -> Path:
    """What the quantize stage did: recipe, sizes, quantized operators."""
    return zoo_dir(name) / "quant" / f"{part}.quant.json"


QUANT_CALIBRATION = ROOT / "tasks" / "data" / "calibration.txt"  # static int8's texts
HELD_TEXTS = ROOT / "tasks" / "data" / "held.txt"  # gates: texts no recipe was tuned on


def onnx_staging(name: str) -> Path:
    """Where optimum writes before each file is checked and moved into place."""
    return zoo_dir(name) / "onnx" / "export"


def onnx_io(name: str, part: str = "model") -> Path:
    """Inputs and outputs of one exported part (names, types, shapes) and its sha256."""
    return zoo_dir(name) / "onnx" / f"{part}.io.json"


def plan_file(name: str, part: str = "model") -> Path:
    """The TensorRT engine of one exported part."""
    return zoo_dir(name) / "plan" / f"{part}.plan"


def plan_memory(name: str) -> Path:
    """The GPU memory the deployment's engines reserve at load, per part (plan stage)."""
    return zoo_dir(name) / "plan" / "memory.json"


def plan_record(name: str, part: str = "model") -> Path:
    """Its sha256, size and mtime, and the TensorRT version that built it."""
    return zoo_dir(name) / "plan" / f"{part}.build.json"


def parity_report(name: str) -> Path:
    return zoo_dir(name) / "parity.json"


def perf_analyzer_dir(release: str) -> Path:
    """NVIDIA's perf_analyzer binary and the library links it needs (`doit bench`)."""
    return TOOLS_CACHE / f"perf_analyzer-{release}"


def bench_model_dir() -> Path:
    """`doit bench_model`: the benchmark's random Llama-family checkpoint."""
    return MODEL_ZOO / "bench-llama" / "model"


def bench_dir(name: str) -> Path:
    return zoo_dir(name) / "bench"


def bench_report(name: str) -> Path:
    return bench_dir(name) / "report.json"


def bench_markdown(name: str) -> Path:
    return bench_dir(name) / "report.md"


def bench_plot(name: str) -> Path:
    return bench_dir(name) / "throughput.png"


def soak_dir() -> Path:
    """`doit soak` covers every deployment in models/: its report is the repository's."""
    return MODEL_ZOO / "soak"


def soak_report() -> Path:
    return soak_dir() / "report.json"


def soak_markdown() -> Path:
    return soak_dir() / "report.md"


def graph_file(name: str) -> Path:
    """`doit graph`: the picture of the build's DAG for this deployment's variables."""
    return zoo_dir(name) / "graph.svg"


def rendered_config(name: str, part: str) -> Path:
    """A rendered `config.pbtxt` before it is copied into the repository."""
    return zoo_dir(name) / "pbtxt" / f"{part}.pbtxt"


def wiring_report(name: str) -> Path:
    """Written by the ensemble wiring check, only when it passes."""
    return zoo_dir(name) / "pbtxt" / "wiring.json"


# --- k8s/: the Kubernetes manifests of `doit k8s` (generated, ignored by git) ------------

K8S_DIR = ROOT / "k8s"
K8S_TEMPLATES = TEMPLATES_DIR / "k8s"


def k8s_manifest(kind: str) -> Path:
    """A rendered manifest, e.g. k8s/deployment.yaml (kustomization.yaml lists them)."""
    return K8S_DIR / f"{kind}.yaml"


def k8s_template(kind: str) -> Path:
    return K8S_TEMPLATES / f"{kind}.yaml.j2"


# --- templates/ and triton/: sources -----------------------------------------------------


def template(part: str) -> Path:
    return TEMPLATES_DIR / f"{part}.pbtxt.j2"


# The Jinja macros every template imports: the input and output entries.
TENSOR_MACROS = TEMPLATES_DIR / "_tensors.j2"
NGINX_TEMPLATE = TEMPLATES_DIR / "nginx.conf.j2"  # the balancer of replicas=N


def runtime_file(component: str, filename: str) -> Path:
    """Code that runs inside Triton (imports nothing from `tasks/`)."""
    return TRITON_DIR / component / filename


def runtime_modules(component: str) -> list[Path]:
    """Every Python module of a runtime component (triton/<component>/*.py), sorted."""
    return sorted((TRITON_DIR / component).glob("*.py"))


def runtime_model_code(component: str) -> Path:
    """A python-backend model's `model.py`."""
    return runtime_file(component, "model.py")


# the name it has beside each python model: on the stub's sys.path, taken by no package
RUNTIME_SHIPPED_AS = "llm_in_triton_runtime.py"


def runtime_helpers() -> Path:
    """The helpers shipped beside every python-backend model (`runtime.py`)."""
    return runtime_file("runtime", "runtime.py")


# --- models/: the Triton model repository -------------------------------------------------


def repo_model_dir(triton_model: str) -> Path:
    return MODELS / triton_model


def repo_config(triton_model: str) -> Path:
    return repo_model_dir(triton_model) / "config.pbtxt"


def repo_version_dir(triton_model: str) -> Path:
    return repo_model_dir(triton_model) / "1"


def repo_version_file(triton_model: str, filename: str) -> Path:
    return repo_version_dir(triton_model) / filename
