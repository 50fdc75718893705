"""Parity of a quantized or fp16 model: what users see, against the fp32 PyTorch model,
judged by the task's gates (catalog.GATES), on the sample texts plus the held texts
(tasks/data/held.txt, which no recipe was tuned on). Element-wise differences are recorded
here, not judged (an fp16 file's are judged by tasks/parity.py, with fp16's tolerances).

Called by tasks/parity.py for precision=int8, int4, nf4, fp4 and fp16.
"""

from __future__ import annotations

from tasks import artifacts, catalog, paths
from tasks.compare import TensorRTStep, mean_pooled
from tasks.errors import ParityError
from tasks.settings import Settings

# metric -> the ensemble output it speaks for (a failure names it)
METRIC_OUTPUTS = {
    "embedding_cosine_min": "EMBEDDING",
    "embedding_cosine_mean": "EMBEDDING",
    "label_agreement": "LABEL",
    "decided_texts": "LABEL",
    "token_label_agreement": "ENTITIES",
    "decided_tokens": "ENTITIES",
    "max_probability_change": "SCORE",
    "same_answer_span": "ANSWER",
    "token_agreement": "OUTPUT_IDS",
    "logprob_change_mean": "OUTPUT_IDS",
}
QUESTIONS = ("What is it about?", "Who is it about?", "Where is it?", "What happens?")


def gate_texts(spec: catalog.TaskSpec) -> tuple[list[str], list[str] | None]:
    """The sample texts and the held ones (with questions, for pairs)."""
    held = [t for t in paths.HELD_TEXTS.read_text().splitlines() if t.strip()]
    texts = [*catalog.SAMPLE_TEXTS, *held]
    if len(spec.text_inputs) == 1:
        return texts, None
    questions = [*catalog.SAMPLE_QUESTIONS]
    questions += [QUESTIONS[i % len(QUESTIONS)] for i in range(len(held))]
    return questions, texts


def served_outputs(settings: Settings, names: list[str], feed: dict) -> dict:
    """What the build serves on a feed: its TensorRT engine on backend=tensorrt, else ONNX
    Runtime on the quantized file; in batches the profile takes."""
    import numpy as np

    plan = settings.plan_file()
    if plan is not None:
        step = TensorRTStep(plan)
    else:  # the serving loop's own ONNX Runtime step
        step = artifacts.load_runtime("generate", "decoding.py").OnnxRuntimeStep(
            settings.model_file()
        )
    rows, size = len(next(iter(feed.values()))), settings.batch.max
    try:
        chunks = [
            step({k: v[start : start + size] for k, v in feed.items()})
            for start in range(0, rows, size)
        ]
    finally:
        getattr(step, "close", lambda: None)()
    return {n: np.concatenate([c[n] for c in chunks]) for n in names}


def softmax(x):
    import numpy as np

    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def label_agreement(p, q) -> tuple[float, int]:
    """(how often the served probabilities `p` pick fp32's label, rows where fp32 decides).
    A flip counts where fp32's top two are LABEL_MARGIN apart or more: a near-tie flips on
    any rounding (seqcls's probability change measures those)."""
    top = q.copy()
    top.sort(axis=-1)
    decided = (top[:, -1] - top[:, -2]) >= catalog.LABEL_MARGIN
    agree = p.argmax(-1) == q.argmax(-1)
    return (float(agree[decided].mean()) if decided.any() else 1.0), int(decided.sum())


def encoder_metrics(settings: Settings) -> tuple[dict, dict]:
    """(gate metrics, element-wise max abs diffs) of the quantized or fp16 model file."""
    import numpy as np
    import torch
    import transformers

    spec, source = settings.task, paths.source_dir(settings.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    first, second = gate_texts(spec)
    encoded = tokenizer(
        first,
        second,
        padding=True,
        truncation="only_second" if second else True,
        max_length=settings.seq.max,
        return_tensors="np",
        return_offsets_mapping=bool(second),
    )
    io = artifacts.read_json(paths.onnx_io(settings.name))
    feed = {t["name"]: encoded[t["name"]].astype(np.int64) for t in io["inputs"]}
    names = [o.onnx_name for o in spec.outputs]
    served = served_outputs(settings, names, feed)
    model = getattr(transformers, spec.auto_class).from_pretrained(source, dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        reference = {n: out[n].float().numpy() for n in names if n in out}
        if spec.mean_pooling:
            mask = torch.from_numpy(feed["attention_mask"])
            reference["embedding"] = mean_pooled(out["last_hidden_state"], mask).numpy()
    diffs = {n: float(np.abs(served[n] - reference[n]).max()) for n in reference}
    if spec.name == "encode":
        a, b = served["embedding"], reference["embedding"]
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        metrics = {
            "embedding_cosine_min": float(cosine.min()),
            "embedding_cosine_mean": float(cosine.mean()),
        }
    elif spec.name == "seqcls":
        p, q = softmax(served["logits"]), softmax(reference["logits"])
        agree, decided = label_agreement(p, q)
        metrics = {
            "label_agreement": agree,
            "decided_texts": decided,
            "max_probability_change": float(np.abs(p - q).max()),
        }
    elif spec.name == "ner":  # each real token's label (padding has none)
        real = feed["attention_mask"].astype(bool)
        p, q = softmax(served["logits"][real]), softmax(reference["logits"][real])
        agree, decided = label_agreement(p, q)
        metrics = {"token_label_agreement": agree, "decided_tokens": decided}
    else:  # qa: the best span, as the answer step finds it
        answer = artifacts.load_runtime("qa_answer", "answer.py")
        offsets = np.full(encoded["offset_mapping"].shape, -1, np.int64)
        for row in range(len(first)):
            for position, sequence in enumerate(encoded.sequence_ids(row)):
                if sequence == 1:
                    offsets[row, position] = encoded["offset_mapping"][row, position]
        same = []
        for row in range(len(first)):
            spans = [
                answer.best_span(
                    outputs["start_logits"][row],
                    outputs["end_logits"][row],
                    offsets[row],
                    catalog.MAX_ANSWER_TOKENS,
                )
                for outputs in (served, reference)
            ]
            same.append(None not in spans and spans[0][1:] == spans[1][1:])
        metrics = {"same_answer_span": float(np.mean(same))}
    return metrics, diffs


def judge(settings: Settings, metrics: dict, diffs: dict, texts: int) -> dict:
    """The gated parity report of a model file, or a ParityError naming what fails."""
    gates = catalog.GATES[settings.task.name]
    verdicts = [
        {
            "metric": gate.metric,
            "output": METRIC_OUTPUTS[gate.metric],
            "value": round(metrics[gate.metric], 5),
            "gate": gate.describe(),
            "pass": gate.holds(metrics[gate.metric]),
        }
        for gate in gates
    ]
    for verdict in verdicts:
        print(
            f"parity: {verdict['output']} {verdict['metric']} = {verdict['value']} "
            f"(gate {verdict['gate']}: {'pass' if verdict['pass'] else 'FAIL'})",
            flush=True,
        )
    failed = [v for v in verdicts if not v["pass"]]
    if failed:
        recipe = settings.recipe
        raise ParityError(
            f"{settings.task.name} at precision={settings.precision} (recipe={recipe.name}) "
            "fails its gate: "
            + "; ".join(
                f"{v['output']} {v['metric']} = {v['value']}, gate {v['gate']}" for v in failed
            )
            + f" (on {texts} sample and held texts); try {recipe.next_try}"
        )
    return {
        "recipe": settings.recipe.name,
        "block_size": settings.block_size,
        "texts": texts,
        "metrics": metrics,
        "gates": verdicts,
        "elementwise_max_abs_diff": diffs,  # recorded, not judged
    }


def check_encoder(settings: Settings) -> dict:
    metrics, diffs = encoder_metrics(settings)
    first, _ = gate_texts(settings.task)
    return judge(settings, metrics, diffs, len(first))
