"""Stage `pbtxt`: Jinja templates render the three config.pbtxt files of a deployment.

Templates are strict (StrictUndefined): a missing value fails the render. Each rendered file
is parsed back into Triton's own protobuf (tritonclient's `model_config_pb2.ModelConfig`)
before it counts as built. A separate check proves the ensemble's wiring: each step's model
and tensors exist, and data types and dims agree from producer to consumer.
"""

from __future__ import annotations

from doit.tools import config_changed

from tasks import artifacts, catalog, paths
from tasks.errors import ConfigError, fails_cleanly
from tasks.settings import Settings, current

PARTS = ("tokenizer", "model", "ensemble")


def triton_dims(shape: list) -> list[int]:
    """ONNX dims after the batch axis; symbolic ones become -1."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]


def pad_id(name: str) -> int:
    """The pad token's id, from the checkpoint's tokenizer files."""
    from tokenizers import Tokenizer

    tokenizer_config = paths.source_dir(name) / "tokenizer_config.json"
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
    """Everything the templates may use; the same context renders all three parts."""
    dtype = {t["name"]: catalog.TRITON_DTYPES[t["dtype"]] for t in io["inputs"] + io["outputs"]}
    dims = {t["name"]: triton_dims(t["shape"]) for t in io["outputs"]}
    names = settings.triton_models
    return {
        "summary": settings.task.summary,
        "backend": settings.backend,
        "platform": catalog.PLATFORMS.get(settings.backend, ""),
        "model_filename": settings.model_filename,
        "max_batch_size": settings.batch.max,
        "seq": settings.seq,
        "pad_id": pad,
        "queue_delay_us": catalog.QUEUE_DELAY_US,
        "intra_op_threads": catalog.INTRA_OP_THREADS,
        "text_inputs": settings.task.text_inputs,
        "token_tensors": [{"name": t["name"], "data_type": dtype[t["name"]]} for t in io["inputs"]],
        "model_outputs": [
            {"name": t["name"], "data_type": dtype[t["name"]], "dims": dims[t["name"]]}
            for t in io["outputs"]
        ],
        "ensemble_outputs": [
            {
                "name": o.triton_name,
                "source": o.onnx_name,
                "data_type": dtype[o.onnx_name],
                "dims": dims[o.onnx_name],
            }
            for o in settings.task.outputs
        ],
        "tokenizer_name": names["tokenizer"],
        "transformer_name": names["model"],
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
    return {t.name: (t.data_type, list(t.dims)) for t in getattr(config, kind)}


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
        for part in PARTS
    }
    parts = {configs[p].name: configs[p] for p in PARTS if p != "ensemble"}
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
        "task": settings.task.name,
        "serving": [catalog.QUEUE_DELAY_US, catalog.INTRA_OP_THREADS],
    }
    for part in PARTS:
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
        "file_dep": [*(paths.rendered_config(name, p) for p in PARTS), paths.stage_module("pbtxt")],
        "targets": [report],
        "clean": [(artifacts.remove_artifacts, [[report]])],
    }
