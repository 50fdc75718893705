"""Settings and stage output without a build: the task dicts the stages yield and the
configs they render, on synthetic descriptions of the exported files; and the tokenizing that
runs inside Triton, in-process."""

from __future__ import annotations

from tasks import artifacts, catalog, graph, pbtxt, settings
from tasks.settings import load_settings


def settings_from(**variables):
    """Settings as `doit NAME=VALUE ...` would make them."""
    return load_settings(variables)


def tasks_for(monkeypatch, **variables) -> dict[str, dict]:
    """Every task dict the build stages yield for these variables, by 'stage:name'."""
    monkeypatch.setattr(settings, "_CURRENT", settings_from(**variables))
    return graph.build_tasks()


def params(task: dict) -> dict | str:
    """The config_changed parameters of a task (its first uptodate check); for a pbtxt task,
    the digest of the context it renders from (here from the fake graphs and facts below)."""
    check = task["uptodate"][0]
    if isinstance(check, pbtxt.ContextChanged):
        return check.digest(ios_of(check.settings), FACTS)
    return check.config


# Synthetic description of an exported BERT, as the onnx stage writes it to io.json.
def fake_io(outputs: list[tuple[str, list]]) -> dict:
    inputs = [
        {"name": n, "dtype": "int64", "shape": ["batch_size", "sequence_length"]}
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    return {
        "inputs": inputs,
        "outputs": [{"name": n, "dtype": "float32", "shape": s} for n, s in outputs],
    }


IO = {
    "encode": fake_io(
        [
            ("last_hidden_state", ["batch_size", "sequence_length", 384]),
            ("embedding", ["batch_size", 384]),
        ]
    ),
    "seqcls": fake_io([("logits", ["batch_size", 2])]),
    "causallm": {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch_size", "total"]},
            {"name": "position_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
            {
                "name": "past_key_values.0.key",
                "dtype": "float32",
                "shape": ["batch_size", 2, "past_sequence_length", 16],
            },
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch_size", "sequence_length", 300]}
        ],
    },
    "t5": {  # the encoder part
        "inputs": [
            {"name": n, "dtype": "int64", "shape": ["batch_size", "encoder_sequence_length"]}
            for n in ("input_ids", "attention_mask")
        ],
        "outputs": [
            {
                "name": "last_hidden_state",
                "dtype": "float32",
                "shape": ["batch_size", "encoder_sequence_length", 32],
            }
        ],
    },
    "qa": fake_io(
        [
            ("start_logits", ["batch_size", "sequence_length"]),
            ("end_logits", ["batch_size", "sequence_length"]),
        ]
    ),
}


def io_of(spec: catalog.TaskSpec) -> dict:
    """The exported file of a task as `IO` describes it; a task without an entry gets its
    catalog outputs with a per-token shape, so that a new row renders before it has one."""
    if spec.name in IO:
        return IO[spec.name]
    return fake_io([(o.onnx_name, ["batch_size", "sequence_length", 2]) for o in spec.outputs])


# Checkpoint facts of a synthetic model (what pbtxt reads from the downloaded files).
FACTS = {"pad_id": 0, "eos_ids": [1], "decoder_start_id": 0, "max_positions": 128, "vocab_size": 99}


def ios_of(chosen) -> dict:
    """Every exported part described alike (the render only needs names, types and dims)."""
    return {part: io_of(chosen.task) for part in chosen.task.onnx_parts}


def render_all(chosen) -> dict:
    """Each Triton model's config of a deployment, rendered and parsed by Triton's schema."""
    configs = {}
    for part in chosen.triton_models:
        context = pbtxt.part_context(chosen, part, ios_of(chosen), FACTS)
        text = pbtxt.render(pbtxt.template_name(chosen, part), context)
        configs[part] = pbtxt.parse_config(text, part)
    return configs


def text_encoder(tokenizer_file, text_inputs: list[str], max_seq: int, stride: int):
    """triton/tokenizer/encoding.py's TextEncoder, as a deployment of this max seq and
    window stride (0: no windows) configures it (up to 64 rows a request); a pair keeps its
    first text whole, as qa's row says."""
    encoding = artifacts.load_runtime("tokenizer", "encoding.py")
    runtime = artifacts.load_runtime("runtime", "runtime.py")
    params = {
        "max_seq": max_seq,
        "min_seq": 1,
        "pad_id": 0,
        "stride": stride,
        "truncation": "only_second" if len(text_inputs) == 2 else "longest_first",
        "pad_multiple": 1,
        "overflow": "truncate",
        "max_text_bytes": catalog.MAX_TEXT_BYTES,
    }
    values = runtime.Parameters({k: str(v) for k, v in params.items()}, "test")
    return encoding.TextEncoder(str(tokenizer_file), values, text_inputs, 64)
