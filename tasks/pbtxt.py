"""Stage `pbtxt`: Jinja templates render the config.pbtxt files of a deployment.

Templates are strict (StrictUndefined): a missing value fails the render. Each rendered file
is parsed back into Triton's own protobuf (tritonclient's `model_config_pb2.ModelConfig`)
before it counts as built. A separate check proves the ensemble's wiring: each step's model
and tensors exist, and data types and dims agree from producer to consumer.
"""

from __future__ import annotations

from dataclasses import replace

from doit.tools import config_changed

from tasks import artifacts, catalog, paths
from tasks.errors import ConfigError, fails_cleanly
from tasks.settings import Settings, current


def triton_dims(shape: list) -> list[int]:
    """ONNX dims after the batch axis; symbolic ones become -1."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]


def pad_id(name: str) -> int:
    """The pad token's id, from the checkpoint's tokenizer files."""
    from tokenizers import Tokenizer

    tokenizer_config = paths.source_file(name, "tokenizer_config.json")
    token = (
        artifacts.read_json(tokenizer_config).get("pad_token")
        if tokenizer_config.is_file()
        else None
    )
    if isinstance(token, dict):
        token = token.get("content")
    found = (
        Tokenizer.from_file(str(paths.source_tokenizer(name))).token_to_id(token) if token else None
    )
    if found is None:
        found = artifacts.read_json(paths.source_config(name)).get("pad_token_id")
    return found or 0


def render_context(settings: Settings, io: dict, pad: int) -> dict:
    """Everything the templates may use; one context renders every part.

    Tensors and ensemble steps are built from the task's facts and the exported graph
    (`io.json`), so the configs agree with the model and with each other by construction."""
    spec, names = settings.task, settings.triton_models
    onnx_types = {
        t["name"]: catalog.TRITON_DTYPES[t["dtype"]] for t in io["inputs"] + io["outputs"]
    }
    token = [catalog.Tensor(t["name"], onnx_types[t["name"]], (-1,)) for t in io["inputs"]]
    tokenizer_outputs = token + (list(catalog.WINDOW_TENSORS) if spec.windows else [])
    model_outputs = [
        catalog.Tensor(t["name"], onnx_types[t["name"]], tuple(triton_dims(t["shape"])))
        for t in io["outputs"]
    ]
    # Every tensor flowing through the ensemble, by its name there.
    tensors = {n: catalog.Tensor(n, "TYPE_STRING", (1,)) for n in spec.text_inputs}
    tensors.update({t.name: t for t in tokenizer_outputs})
    by_onnx = {t.name: t for t in model_outputs}
    for out in spec.outputs:
        tensors[out.triton_name] = replace(by_onnx[out.onnx_name], name=out.triton_name)
    steps = [
        {
            "model": names["tokenizer"],
            "inputs": [(n, n) for n in spec.text_inputs],
            "outputs": [(t.name, t.name) for t in tokenizer_outputs],
        },
        {
            "model": names["model"],
            "inputs": [(t.name, t.name) for t in token],
            "outputs": [(o.onnx_name, o.triton_name) for o in spec.outputs],
        },
    ]
    ensemble_outputs = [tensors[o.triton_name] for o in spec.outputs if o.exposed]
    post = spec.postprocess
    if post is not None:
        steps.append(
            {
                "model": names["postprocess"],
                "inputs": [(n, n) for n in post.inputs],
                "outputs": [(t.name, t.name) for t in post.outputs],
            }
        )
        ensemble_outputs += list(post.outputs)
    return {
        "summary": spec.summary,
        "backend": settings.backend,
        "platform": catalog.PLATFORMS.get(settings.backend, ""),
        "model_filename": settings.model_filename,
        "max_batch_size": settings.batch.max,
        "seq": settings.seq,
        "stride": catalog.window_stride(settings.seq.max) if spec.windows else 0,
        "pad_id": pad,
        "queue_delay_us": catalog.QUEUE_DELAY_US,
        "intra_op_threads": catalog.INTRA_OP_THREADS,
        "text_inputs": spec.text_inputs,
        "token_tensors": token,
        "tokenizer_outputs": tokenizer_outputs,
        "model_outputs": model_outputs,
        "post_inputs": [tensors[n] for n in post.inputs] if post else [],
        "post_outputs": list(post.outputs) if post else [],
        "post_parameters": list(post.parameters) if post else [],
        "steps": steps,
        "ensemble_outputs": ensemble_outputs,
    }


def render(part: str, context: dict) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    try:
        return env.get_template(paths.template(part).name).render(context)
    except jinja2.TemplateError as err:
        raise ConfigError(f"templates/{paths.template(part).name}: {err}") from err


def parse_config(text: str, origin: str):
    """Parse config.pbtxt text into Triton's ModelConfig protobuf, or fail naming the line."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise ConfigError(f"{origin} is not a valid Triton model config: {err}") from err


def render_part(settings: Settings, part: str) -> None:
    name = settings.name
    io = artifacts.read_json(paths.onnx_io(name))
    context = {
        **render_context(settings, io, pad_id(name)),
        "model_name": settings.triton_models[part],
    }
    text = render(part, context)
    config = parse_config(text, f"the config rendered from templates/{paths.template(part).name}")
    if config.name != settings.triton_models[part]:
        raise ConfigError(
            f"templates/{paths.template(part).name} renders name '{config.name}', "
            f"expected '{settings.triton_models[part]}'"
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
    params = {
        "batch": settings.batch.points(),
        "seq": settings.seq.points(),
        "backend": settings.backend,
        "task": repr(settings.task),  # its tensors, steps and parameters are facts
        "serving": [catalog.QUEUE_DELAY_US, catalog.INTRA_OP_THREADS],
    }
    for part in settings.triton_models:
        target = paths.rendered_config(name, part)
        extra = [paths.source_manifest(name)] if part == "tokenizer" else []
        yield {
            "name": settings.triton_models[part],
            "actions": [(fails_cleanly(render_part), [settings, part])],
            "file_dep": [
                paths.template(part),
                paths.onnx_io(name),
                *extra,
                paths.stage_module("pbtxt"),
            ],
            "targets": [target],
            "uptodate": [config_changed(params)],
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
