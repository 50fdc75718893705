"""Stage `pbtxt`: Jinja templates render the config.pbtxt files of a deployment.

Templates are strict (StrictUndefined): a missing value fails the render. Each rendered file
is parsed back into Triton's own protobuf (tritonclient's `model_config_pb2.ModelConfig`)
before it counts as built. A separate check proves the ensemble's wiring: each step's model
and tensors exist, and data types and dims agree from producer to consumer.

A config is stale when the context it renders from changes: the task's config_changed is a
digest of that context (`ContextChanged`), so no fact has to be listed by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, is_dataclass, replace

from doit.tools import config_changed

from tasks import artifacts, catalog, paths, profiles
from tasks.errors import ConfigError, fails_cleanly
from tasks.facts import checkpoint_facts
from tasks.settings import Settings, current


def triton_dims(shape: list) -> list[int]:
    """ONNX dims after the batch axis; symbolic ones become -1."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]


def render_context(settings: Settings, ios: dict[str, dict], facts: dict) -> dict:
    """Everything the templates may use; one context renders every part (`file_context`
    adds the tensors of an exported file's own model).

    Tensors and ensemble steps are built from the task's facts and the exported graphs
    (`ios`: part -> its io.json), so the configs agree with the model and with each other by
    construction. Inputs are (tensor, optional) pairs and outputs tensors, as
    templates/_tensors.j2 declares them. What the configs are rendered from is exactly this
    context: its digest is what makes them stale (`ContextChanged`)."""
    spec = settings.task
    pipeline = generation_pipeline if spec.generation else encoder_pipeline
    return {
        "summary": spec.summary,
        "task": spec.name,
        "backend": settings.backend,
        "platform": catalog.PLATFORMS.get(settings.backend, ""),
        "model_filename": settings.model_filename,
        "max_batch_size": settings.batch.max,
        "seq": settings.seq,
        "queue_delay_us": settings.serving.queue_delay_us,
        "max_queue": settings.serving.max_queue,
        "queue_timeout_ms": settings.serving.queue_timeout_ms,
        "intra_op_threads": settings.serving.ort_threads,
        "instances": settings.serving.instances,
        "gpus": settings.serving.gpus,
        "text_inputs": text_tensors(spec),
        "tokenizer_parameters": tokenizer_parameters(settings, facts),
        **pipeline(settings, ios, facts),
    }


def tokenizer_parameters(settings: Settings, facts: dict) -> list[tuple[str, object]]:
    """What triton/tokenizer/encoding.py reads (tokenizer and pipeline models alike, and the
    bench's in-process batching)."""
    spec = settings.task
    return [
        ("max_seq", settings.seq.max),  # at most MAX tokens: cut, or a prompt refused
        ("overflow", "reject" if spec.generation else "truncate"),
        ("min_seq", settings.seq.min),  # padding to at least MIN
        ("pad_id", facts["pad_id"]),
        ("pad_multiple", settings.serving.pad_multiple),
        # > 0: a long last text is read in overlapping windows of MAX tokens
        ("stride", catalog.window_stride(settings.seq.max) if spec.windows else 0),
        ("truncation", spec.truncation),  # of a pair (windows keep the second text whole)
        # requests of different lengths share a padded batch (a prompt is never padded
        # further: the decoding loop batches its own way)
        ("batch_waste", 1.0 if spec.generation else settings.serving.batch_waste),
        ("max_text_bytes", catalog.MAX_TEXT_BYTES),
    ]


def text_tensors(spec: catalog.TaskSpec) -> list[tuple[catalog.Tensor, bool]]:
    """The texts a deployment takes (BYTES, one per batch item), none optional."""
    return [(catalog.Tensor(n, "TYPE_STRING", (1,)), False) for n in spec.text_inputs]


def file_context(io: dict) -> dict:
    """A model serving one exported file (model.pbtxt.j2): its tensors, from its io.json."""
    types = _types(io)
    inputs, outputs = (
        [catalog.Tensor(t["name"], types[t["name"]], tuple(triton_dims(t["shape"]))) for t in ts]
        for ts in (io["inputs"], io["outputs"])
    )
    return {"model_inputs": [(t, False) for t in inputs], "model_outputs": outputs}


def template_name(settings: Settings, part: str) -> str:
    """Exported files render with model.pbtxt.j2 (or, as the python backend's one hop,
    pipeline.pbtxt.j2); every other part has a template of its own."""
    if part == "model" and settings.one_hop:
        return "pipeline"
    return "model" if part in settings.task.onnx_parts else part


def _types(io: dict) -> dict[str, str]:
    return {t["name"]: catalog.TRITON_DTYPES[t["dtype"]] for t in io["inputs"] + io["outputs"]}


def _step(model: str, inputs, outputs) -> dict:
    return {"model": model, "inputs": list(inputs), "outputs": list(outputs)}


def _same(names) -> list[tuple[str, str]]:
    return [(n, n) for n in names]


def token_tensors(spec: catalog.TaskSpec) -> list[catalog.Tensor]:
    """The tokenizer's tensors beyond the model's inputs that the answer step reads."""
    reads = spec.postprocess.inputs if spec.postprocess else ()
    extra = list(catalog.WINDOW_TENSORS) if spec.windows else []
    return extra + ([catalog.SEQ_LENGTH] if catalog.SEQ_LENGTH.name in reads else [])


def answer_token_names(spec: catalog.TaskSpec) -> list[str]:
    """Every tokenizer tensor the answer step reads: those above and the model inputs it
    names (token ids: a native post step reads them from the ensemble, the one hop from its
    own tokenizing)."""
    reads = spec.postprocess.inputs if spec.postprocess else ()
    return [t.name for t in token_tensors(spec)] + [n for n in reads if n in catalog.TOKEN_INPUTS]


def encoder_pipeline(settings: Settings, ios: dict[str, dict], facts: dict) -> dict:
    """tokenizer -> model -> optional post step: tensors, steps and ensemble outputs (on the
    python backend one step does all three: `one_hop_pipeline`)."""
    spec, names = settings.task, settings.triton_models
    io = ios["model"]
    types = _types(io)
    token = [catalog.Tensor(t["name"], types[t["name"]], (-1,)) for t in io["inputs"]]
    tokenizer_outputs = token + token_tensors(spec)
    model_outputs = file_context(io)["model_outputs"]
    # Every tensor flowing through the ensemble, by its name there.
    texts = text_tensors(spec)
    tensors = {t.name: t for t, _ in texts}
    tensors.update({t.name: t for t in tokenizer_outputs})
    by_onnx = {t.name: t for t in model_outputs}
    for out in spec.outputs:
        tensors[out.triton_name] = replace(by_onnx[out.onnx_name], name=out.triton_name)
    post = spec.postprocess
    post_outputs = []
    if post is not None:  # a trimmed tensor has its padded tensor's type and dims
        post_outputs = [*post.outputs, *(replace(tensors[s], name=o) for s, o in post.trims)]
    by_name = {**tensors, **{t.name: t for t in post_outputs}}
    if settings.one_hop:
        return one_hop_pipeline(settings, io, [by_name[n] for n in spec.answers])
    steps = [
        _step(
            names["tokenizer"], _same(spec.text_inputs), _same(t.name for t in tokenizer_outputs)
        ),
        _step(
            names["model"],
            _same(t.name for t in token),
            [(o.onnx_name, o.triton_name) for o in spec.outputs],
        ),
    ]
    if post is not None:
        steps.append(
            _step(names["postprocess"], _same(post.inputs), _same(t.name for t in post_outputs))
        )
    return {
        "tokenizer_outputs": tokenizer_outputs,
        "post_inputs": [(tensors[n], False) for n in post.inputs] if post else [],
        "post_outputs": post_outputs,
        "post_parameters": post_parameters(post),
        "steps": steps,
        "ensemble_inputs": texts,
        "ensemble_outputs": [by_name[n] for n in spec.answers],
    }


def post_parameters(post: catalog.PostProcess | None) -> list[tuple[str, str]]:
    """What the task's answer.py reads (triton/trim/ reads `trims`)."""
    if post is None:
        return []
    return [*post.parameters, ("trims", json.dumps([list(t) for t in post.trims]))]


def one_hop_pipeline(settings: Settings, io: dict, answers: list) -> dict:
    """The python backend: one model (triton/pipeline/) takes the texts and gives the answers,
    the ensemble's one step."""
    spec, names = settings.task, settings.triton_models
    sequence = [d for d, kind in catalog.PROFILE_DIMS["model"].items() if kind == "tokens"]
    parameters = {
        "model_file": settings.model_filename,
        "intra_op_threads": settings.serving.ort_threads,
        "spinning": settings.serving.ort_spin,
        "model_outputs": json.dumps([[o.onnx_name, o.triton_name] for o in spec.outputs]),
        "sequence_outputs": json.dumps(
            [t["name"] for t in io["outputs"] if len(t["shape"]) > 1 and t["shape"][1] in sequence]
        ),
        "token_tensors": json.dumps(answer_token_names(spec)),
        **dict(post_parameters(spec.postprocess)),
    }
    return {
        "pipeline_outputs": answers,
        "pipeline_parameters": list(parameters.items()),
        "steps": [_step(names["model"], _same(spec.text_inputs), _same(t.name for t in answers))],
        "ensemble_inputs": text_tensors(spec),
        "ensemble_outputs": answers,
    }


def generation_pipeline(settings: Settings, ios: dict[str, dict], facts: dict) -> dict:
    """tokenizer -> generate (KV-cache decoding loop, text out).

    With decoder=models the loop calls each exported file's model through BLS: the
    `step_models` parameter names them and the tensors it sends and reads."""
    spec, names = settings.task, settings.triton_models
    io = ios[spec.onnx_parts[0]]  # what the prompt goes into: the tokenizer's tensors
    types = _types(io)
    token = [
        catalog.Tensor(t["name"], types[t["name"]], (-1,))
        for t in io["inputs"]
        if t["name"] in catalog.TOKEN_INPUTS
    ]
    options = list(catalog.GENERATION_INPUTS)
    texts = text_tensors(spec)
    step_models = {
        part: {
            "model": names[part],
            "inputs": [t["name"] for t in ios[part]["inputs"]],
            "outputs": [t["name"] for t in ios[part]["outputs"]],
        }
        for part in spec.onnx_parts
        if settings.decoder == "models"
    }
    slots = settings.decoder == "slots"  # its cache in slots (tasks/slot_decoder.py)
    interval = settings.serving.stream_interval
    parameters = {
        "kind": spec.generation,
        # the files the loop runs (decoder=slots: the step's graph, then its mixed twin)
        "parts": json.dumps(list(paths.SLOT_DECODER_STEMS if slots else spec.onnx_parts)),
        # the slots' length: the longest cache the loop grows, and the token written into it
        "slot_buffer": profiles.slot_positions(settings, facts["max_positions"]) if slots else 0,
        "step_models": json.dumps(step_models),
        "eos_token_ids": json.dumps(facts["eos_ids"]),
        "pad_token_id": facts["pad_id"],
        "decoder_start_token_id": facts["decoder_start_id"],
        "max_positions": facts["max_positions"] if spec.generation == "causal" else 0,
        "default_max_new_tokens": min(catalog.DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens),
        "max_new_tokens_limit": settings.max_new_tokens,
        "max_seq": settings.seq.max,
        "vocab_size": facts["vocab_size"],  # a direct call's input_ids are checked against it
        "max_text_bytes": catalog.MAX_TEXT_BYTES,  # the stream's TEXT: the tokenizer's rules
        # the longest cache a batch may grow: the engines' profile holds no more
        "cache_limit": profiles.cache_limit(settings, facts["max_positions"]),
        # the in-flight loop's own queue (its requests leave Triton's at once)
        "max_queue": settings.serving.max_queue,
        "queue_timeout_ms": settings.serving.queue_timeout_ms,
        "intra_op_threads": settings.serving.ort_threads,
        "spinning": settings.serving.ort_spin,
        # the stream's steps per response; 0 (auto): the loop's rows decide, for about this
        # many responses a step
        "stream_interval": 0 if interval == "auto" else interval,
        "stream_responses": catalog.AUTO_STREAM_RESPONSES,
        # joining prompts prefill in groups of like lengths (0: all in one call)
        "prefill_waste": catalog.PREFILL_WASTE[spec.generation],
        # answered after execute() returned: the supervisor restarts the server when such a
        # model's stub dies holding requests (triton/supervisor/supervisor.py)
        "requests_outlive_execute": "true",
    }
    return {
        "tokenizer_outputs": token,
        "generate_inputs": [(t, False) for t in token] + [(t, True) for t in options],
        "generate_outputs": list(catalog.GENERATION_OUTPUTS),
        "generate_parameters": list(parameters.items()),
        "steps": [
            _step(names["tokenizer"], _same(spec.text_inputs), _same(t.name for t in token)),
            _step(
                names["generate"],
                _same(t.name for t in token + options),
                _same(t.name for t in catalog.GENERATION_OUTPUTS),
            ),
        ],
        "ensemble_inputs": texts + [(t, True) for t in options],
        "ensemble_outputs": list(catalog.GENERATION_OUTPUTS),  # spec.answers, with types
        # <name>_stream: the same decoding, decoupled, on the same files (hard links: repo.py)
        "stream_inputs": texts + [(t, True) for t in options],
        # a response carries `stream_interval` decoding steps: each row's new text (one
        # string) and its token-level outputs (one value per step, as the catalog's -1 says)
        "stream_outputs": [
            replace(t, dims=(1,)) if t.data_type == "TYPE_STRING" else t
            for t in catalog.GENERATION_OUTPUTS
        ],
        "stream_parameters": list(parameters.items()),
    }


def render(part: str, context: dict) -> str:
    return artifacts.render_template(paths.template(part), context)


def parse_config(text: str, origin: str):
    """Parse config.pbtxt text into Triton's ModelConfig protobuf, or fail naming the line."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise ConfigError(f"{origin} is not a valid Triton model config: {err}") from err


def part_context(settings: Settings, part: str, ios: dict[str, dict], facts: dict) -> dict:
    """The context one part renders with."""
    context = render_context(settings, ios, facts)
    if part in settings.task.onnx_parts and not settings.one_hop:
        context.update(
            file_context(ios[part]),
            onnx_part=part,
            vocab_size=facts["vocab_size"],
            # an encoder's tokens (a decoding loop checks its own lengths); 0 = unchecked
            max_tokens=0 if settings.task.generation else settings.seq.max,
        )
    return {**context, "model_name": settings.triton_models[part]}


def context_inputs(settings: Settings) -> tuple[dict[str, dict], dict]:
    """What a context reads from files: each exported part's io.json, the checkpoint's facts."""
    name = settings.name
    ios = {p: artifacts.read_json(paths.onnx_io(name, p)) for p in settings.task.onnx_parts}
    return ios, checkpoint_facts(name)


def context_digest(context: dict) -> str:
    """sha256 of a render context as canonical JSON: sorted keys, tuples as lists, dataclasses
    as the fields they compare by (a Profile's `given` text is not a fact)."""
    text = json.dumps(context, sort_keys=True, separators=(",", ":"), default=_canonical)
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: object) -> dict:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in fields(value) if f.compare}
    raise TypeError(
        f"a render context holds {type(value).__name__} {value!r}, which has no canonical JSON "
        "form: put plain values or dataclasses in the context, or teach pbtxt._canonical it"
    )


class ContextChanged(config_changed):
    """doit's config_changed on the digest of the whole context a part renders from, so that
    every fact the context reads (settings, catalog, exported graphs, checkpoint) makes the
    config stale when it changes, and none has to be listed by hand.

    The digest is computed when doit checks the task, not when it lists tasks: by then the
    stages this one depends on (its file_dep) have written the io.json and checkpoint files
    the context reads, so the digest is that of the render about to run, and `doit list`
    reads nothing."""

    def __init__(self, settings: Settings, part: str):
        super().__init__({})
        self.settings, self.part = settings, part

    def digest(self, ios: dict[str, dict], facts: dict) -> str:
        return context_digest(part_context(self.settings, self.part, ios, facts))

    def _calc_digest(self) -> str:
        try:
            inputs = context_inputs(self.settings)
        # not built yet (`doit list --status`, or an upstream stage failed): stale; the render
        # names what is missing. tokenizers raises a bare Exception for a missing file.
        except Exception as err:
            return f"unknown: {err}"
        return self.digest(*inputs)

    def __repr__(self) -> str:
        return f"ContextChanged({self.settings.triton_models[self.part]!r})"


def render_part(settings: Settings, part: str) -> None:
    name = settings.name
    template = template_name(settings, part)
    text = render(template, part_context(settings, part, *context_inputs(settings)))
    where = f"templates/{paths.template(template).name}"
    config = parse_config(text, f"the config rendered from {where}")
    if config.name != settings.triton_models[part]:
        raise ConfigError(
            f"{where} renders name '{config.name}', expected '{settings.triton_models[part]}'"
        )
    artifacts.write_text(paths.rendered_config(name, part), text)


def _tensors(config, kind: str) -> dict:
    """Tensor name -> (data type, full dims: with the batch dim when the model batches)."""
    batch = [-1] if config.max_batch_size > 0 else []
    return {t.name: (t.data_type, batch + list(t.dims)) for t in getattr(config, kind)}


def _agree(a: tuple, b: tuple) -> bool:
    """Same data type, and dims equal where both are fixed."""
    (type_a, dims_a), (type_b, dims_b) = a, b
    return (
        type_a == type_b
        and len(dims_a) == len(dims_b)
        and all(x == y or -1 in (x, y) for x, y in zip(dims_a, dims_b))
    )


def check_wiring(ensemble, parts: dict) -> list[str]:
    """Problems in an ensemble's steps against the configs of the models it calls."""
    from tritonclient.grpc import model_config_pb2

    def show(tensor: tuple) -> str:
        return f"{model_config_pb2.DataType.Name(tensor[0])} {tensor[1]}"

    available = _tensors(ensemble, "input")  # tensor -> (dtype, dims) known so far
    problems = []
    for index, step in enumerate(ensemble.ensemble_scheduling.step):
        where = f"step {index} ({step.model_name})"
        if step.model_name not in parts:
            problems.append(f"{where}: no such model in the deployment ({sorted(parts)})")
            continue
        model = parts[step.model_name]
        inputs, outputs = _tensors(model, "input"), _tensors(model, "output")
        for key, value in step.input_map.items():
            if key not in inputs:
                problems.append(f"{where}: model has no input '{key}' (has {sorted(inputs)})")
            elif value not in available:
                problems.append(f"{where}: input '{key}' reads '{value}', which nothing produces")
            elif not _agree(available[value], inputs[key]):
                problems.append(
                    f"{where}: '{value}' is {show(available[value])} "
                    f"but input '{key}' wants {show(inputs[key])}"
                )
        for missing in sorted(set(inputs) - set(step.input_map)):
            problems.append(f"{where}: model input '{missing}' is not fed")
        for key, value in step.output_map.items():
            if key not in outputs:
                problems.append(f"{where}: model has no output '{key}' (has {sorted(outputs)})")
            else:
                available[value] = outputs[key]
    for name, declared in _tensors(ensemble, "output").items():
        if name not in available:
            problems.append(f"ensemble output '{name}' is produced by no step")
        elif not _agree(available[name], declared):
            problems.append(
                f"ensemble output '{name}' is declared {show(declared)} "
                f"but produced as {show(available[name])}"
            )
    return problems


def check_step_models(config, parts: dict) -> list[str]:
    """Problems in the models a decoding loop calls through BLS (its `step_models`)."""
    steps = json.loads(config.parameters["step_models"].string_value or "{}")
    problems = []
    for part, step in steps.items():
        where = f"{config.name} calls {step['model']} ({part})"
        if step["model"] not in parts:
            problems.append(f"{where}: no such model in the deployment")
            continue
        model = parts[step["model"]]
        inputs, outputs = _tensors(model, "input"), _tensors(model, "output")
        if sorted(inputs) != sorted(step["inputs"]):
            problems.append(f"{where}: sends {step['inputs']} but it takes {sorted(inputs)}")
        if missing := sorted(set(step["outputs"]) - set(outputs)):
            problems.append(f"{where}: reads {missing}, which it does not produce")
    return problems


def check_deployment(settings: Settings) -> None:
    name = settings.name
    configs = {
        part: parse_config(
            paths.rendered_config(name, part).read_text(),
            str(paths.rendered_config(name, part).relative_to(paths.ROOT)),
        )
        for part in settings.triton_models
    }
    parts = {configs[p].name: configs[p] for p in settings.triton_models if p != "ensemble"}
    problems = check_wiring(configs["ensemble"], parts)
    for part in ("generate", "stream"):
        if part in configs:
            problems += check_step_models(configs[part], parts)
    if problems:
        raise ConfigError(f"ensemble '{name}' is miswired: " + "; ".join(problems))
    artifacts.write_json(
        paths.wiring_report(name),
        {
            "ensemble": name,
            "steps": [s.model_name for s in configs["ensemble"].ensemble_scheduling.step],
            "inputs": sorted(_tensors(configs["ensemble"], "input")),
            "outputs": sorted(_tensors(configs["ensemble"], "output")),
        },
    )
    print(f"pbtxt: ensemble '{name}' wiring checked: {' -> '.join(parts)}", flush=True)


def task_pbtxt():
    """config.pbtxt of ensemble, tokenizer, model from templates/, checked by Triton's schema."""
    settings = current()
    name = settings.name
    for part in settings.triton_models:
        target = paths.rendered_config(name, part)
        yield {
            "name": settings.triton_models[part],
            "actions": [(fails_cleanly(render_part), [settings, part])],
            "file_dep": [
                paths.template(template_name(settings, part)),
                paths.template("dynamic_batching"),  # included by the models that queue
                paths.TENSOR_MACROS,  # imported by every template
                *(paths.onnx_io(name, p) for p in settings.task.onnx_parts),
                paths.source_manifest(name),  # token ids and limits of the checkpoint
                paths.stage_module("facts"),  # which reads them
                paths.stage_module("pbtxt"),
            ],
            "targets": [target],
            # the io.json and checkpoint files above are read when doit checks this
            "uptodate": [ContextChanged(settings, part)],
            "clean": [(artifacts.remove_artifacts, [[target]])],
        }
    report = paths.wiring_report(name)
    yield {
        "name": f"{name}-wiring",
        "actions": [(fails_cleanly(check_deployment), [settings])],
        "file_dep": [
            *(paths.rendered_config(name, p) for p in settings.triton_models),
            paths.stage_module("pbtxt"),
        ],
        "targets": [report],
        "clean": [(artifacts.remove_artifacts, [[report]])],
    }
