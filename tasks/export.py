"""Stage `onnx`: the checkpoint to model_zoo/<name>/onnx/<part>.onnx, by optimum, or for the
decoders optimum does not list by the generic torch.onnx path (tasks/export_torch.py), which
writes the same files (tasks/exporters.py chooses, the `exporter` variable decides).

Dynamic batch and sequence axes. Encoder tasks export one `model.onnx`; generation tasks
export unmerged decoders (T5: encoder, decoder, decoder with past; causal LMs: the first step
and the decoder with past), the files both ONNX Runtime and TensorRT run.
Tasks with `mean_pooling` get an `embedding` output added to the graph (mean over the
attention mask, L2-normalised, as sentence-transformers does), so every backend, TensorRT
included, serves it without a post-processing model.
Generation tasks' decoders return the logits of the last position only (a Slice in the
graph): decoding reads nothing else, and every position of a 512-token prompt would be
32 x 512 x 50272 floats (3.3 GB) for OPT-125M at the default profile, on a GPU or through
shared memory.
`io.json` records the graph's inputs and outputs (the one description later stages read)
and the file's sha256, so a model.onnx changed after the export is noticed and rebuilt.
A checkpoint whose fp32 weights pass protobuf's 2 GiB (catalog.EXTERNAL_DATA_BYTES, decided
before exporting: exporters.external_data) is exported with external data: each part's weights
in `<part>.onnx.data` beside it, hashed in its io.json too.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from doit.tools import config_changed

from tasks import artifacts, catalog, exporters, paths
from tasks.errors import ExportError, fails_cleanly
from tasks.settings import Settings, current


def describe_io(model) -> dict:
    """Names, numpy dtypes and shapes (symbolic dims as strings) of graph inputs/outputs."""
    from onnx import helper

    def tensors(values):
        return [
            {
                "name": v.name,
                "dtype": str(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {"inputs": tensors(model.graph.input), "outputs": tensors(model.graph.output)}


def add_mean_pooling(
    model,
    hidden: str = "last_hidden_state",
    mask: str = "attention_mask",
    output: str = "embedding",
) -> None:
    """Append sentence-transformers' mean pooling + L2 normalisation to the graph."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    hidden_info = next(o for o in graph.output if o.name == hidden)
    batch_dim, _, hidden_dim = hidden_info.type.tensor_type.shape.dim

    def const(name, value):
        graph.initializer.append(numpy_helper.from_array(np.array(value), f"pool_{name}"))
        return f"pool_{name}"

    axis_seq, axis_last = const("axis_seq", [1]), const("axis_last", [-1])
    eps_count, eps_norm = const("eps_count", np.float32(1e-9)), const("eps_norm", np.float32(1e-12))
    nodes = [
        ("Cast", [mask], "mask_f", {"to": TensorProto.FLOAT}),
        ("Unsqueeze", ["pool_mask_f", axis_last], "mask_e", {}),
        ("Mul", [hidden, "pool_mask_e"], "masked", {}),
        ("ReduceSum", ["pool_masked", axis_seq], "summed", {"keepdims": 0}),
        ("ReduceSum", ["pool_mask_e", axis_seq], "count", {"keepdims": 0}),
        ("Max", ["pool_count", eps_count], "count_c", {}),
        ("Div", ["pool_summed", "pool_count_c"], "mean", {}),
        ("ReduceL2", ["pool_mean", axis_last], "norm", {"keepdims": 1}),
        ("Max", ["pool_norm", eps_norm], "norm_c", {}),
    ]
    for op, inputs, out, attrs in nodes:
        graph.node.append(
            helper.make_node(op, inputs, [f"pool_{out}"], name=f"pool_{out}", **attrs)
        )
    graph.node.append(helper.make_node("Div", ["pool_mean", "pool_norm_c"], [output], name=output))
    shape = [
        batch_dim.dim_param or batch_dim.dim_value,
        hidden_dim.dim_param or hidden_dim.dim_value,
    ]
    graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, shape))


def keep_last_position(model, output: str) -> bool:
    """Slice graph output `output` ([batch, positions, ...]) to its last position
    ([batch, 1, ...]); False when the graph has no such output (an encoder)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    info = next((o for o in graph.output if o.name == output), None)
    if info is None:
        return False
    every = f"{output}_every_position"
    for node in graph.node:
        node.output[:] = [every if name == output else name for name in node.output]
        node.input[:] = [every if name == output else name for name in node.input]
    limits = {"starts": [-1], "ends": [np.iinfo(np.int64).max], "axes": [1]}
    for key, value in limits.items():
        graph.initializer.append(
            numpy_helper.from_array(np.array(value, np.int64), f"{output}_last_{key}")
        )
    slice_inputs = [every, *(f"{output}_last_{key}" for key in limits)]
    graph.node.append(helper.make_node("Slice", slice_inputs, [output], name=f"{output}_last"))
    info.type.tensor_type.shape.dim[1].Clear()
    info.type.tensor_type.shape.dim[1].dim_value = 1
    return True


def first_step_config(source: Path, optimum_task: str):
    """optimum's ONNX config for a decoder's first step: present key/values out, no past in."""
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx",
        model_type=config.model_type,
        task=optimum_task,
        library_name="transformers",
    )
    return constructor(config, task=optimum_task, use_past=True, use_past_in_inputs=False)


def export(settings: Settings) -> None:
    name = settings.name
    config = artifacts.read_json(paths.source_config(name))
    model_type = config.get("model_type", "?")
    choice = exporters.choose(settings.task, model_type, settings.exporter, config)
    print(f"onnx: exporter {choice.path} ({choice.reason})", flush=True)
    external = exporters.external_data(paths.source_dir(name))
    if external:
        size = exporters.fp32_weight_bytes(paths.source_dir(name)) / 2**30
        print(
            f"onnx: {size:.2f} GiB of fp32 weights: each part's weights go to <part>.onnx.data "
            "beside it (external data; one ONNX file holds under 2 GiB)",
            flush=True,
        )
    staged = artifacts.staging_dir(paths.onnx_staging(name))
    try:
        if choice.path == "torch":
            from tasks.export_torch import export_causal

            files = export_causal(paths.source_dir(name), staged, settings.opset)
            for part, exported in files.items():
                install_part(settings, part, exported, "torch", external)
        else:
            export_with_optimum(settings, staged, external)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def export_with_optimum(settings: Settings, staged: Path, external: bool) -> None:
    from optimum.exporters.onnx import main_export

    source = paths.source_dir(settings.name)
    for run, job in enumerate(settings.task.exports):
        what = f"{job.optimum_task}{' (first step)' if job.first_step else ''}"
        print(f"onnx: exporting {what} with optimum (opset {settings.opset})", flush=True)
        output = staged / str(run)
        custom = {"model": first_step_config(source, job.optimum_task)} if job.first_step else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about constants: expected
            main_export(
                str(source),
                output=output,
                task=job.optimum_task,
                opset=settings.opset,
                local_files_only=True,
                do_validation=False,
                library_name="transformers",
                custom_onnx_configs=custom or None,
            )
        for filename, part in job.files:  # each file in place only once it is complete
            exporter = f"optimum ({job.optimum_task})"
            install_part(settings, part, output / filename, exporter, external)


def install_part(
    settings: Settings, part: str, exported: Path, exporter: str, external: bool
) -> None:
    """Check one exported file, add what the task needs, write it (with its weights beside it
    when `external`) and its io record."""
    import onnx

    name, spec = settings.name, settings.task
    if not exported.is_file():
        raise ExportError(f"{exporter} wrote no {exported.name}")
    model = onnx.load(str(exported))  # and the weights the exporter may have put beside it
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights >= catalog.PROTOBUF_LIMIT and not external:  # the checkpoint's size misled
        print(f"onnx: {part} holds {weights / 2**30:.2f} GiB: external data", flush=True)
        external = True
    if spec.mean_pooling:
        add_mean_pooling(model)
    if spec.generation:
        keep_last_position(model, catalog.GENERATION_LOGITS)
    io = describe_io(model)
    missing = {o.onnx_name for o in spec.outputs} - {o["name"] for o in io["outputs"]}
    if missing:
        raise ExportError(f"the exported model lacks outputs {sorted(missing)}")
    target = paths.onnx_file(name, part)
    paths.onnx_io(name, part).unlink(missing_ok=True)  # the record comes back last
    artifacts.save_onnx(model, target, external)
    io.update(artifacts.onnx_record(target), opset=settings.opset, exporter=exporter)
    artifacts.write_json(paths.onnx_io(name, part), io)
    size = artifacts.onnx_bytes(target) / 2**20
    beside = f" with {paths.external_data_file(target).name}" if external else ""
    print(f"onnx: {target.relative_to(paths.ROOT)}{beside} ({size:.1f} MiB)", flush=True)


def task_onnx():
    """ONNX export (optimum, or torch.onnx for other decoders) into model_zoo/<name>/onnx/."""
    settings = current()
    name = settings.name
    params = {
        "exports": repr(settings.task.exports),
        "mean_pooling": settings.task.mean_pooling,
        "last_position_logits": catalog.GENERATION_LOGITS if settings.task.generation else None,
        "opset": settings.opset,
        "exporter": settings.exporter,
        "external_data_bytes": exporters.external_data_bytes(),  # where weights go beside
        "versions": artifacts.versions(
            "optimum", "optimum-onnx", "onnx", "onnxscript", "transformers", "torch"
        ),
    }
    parts = settings.task.onnx_parts
    targets = [f(name, part) for part in parts for f in (paths.onnx_file, paths.onnx_io)]
    # written only when the weights pass 2 GiB: not targets (doit would take one never made
    # for a stale build), but checked against io.json (file_matches_record) and cleaned
    data = [paths.external_data_file(paths.onnx_file(name, part)) for part in parts]
    yield {
        "name": name,
        "actions": [(fails_cleanly(export), [settings])],
        "file_dep": [
            paths.source_manifest(name),
            paths.stage_module("export"),
            paths.stage_module("export_torch"),
            paths.stage_module("exporters"),
        ],
        "targets": targets,
        "uptodate": [
            config_changed(params),
            *(
                artifacts.file_matches_record(paths.onnx_file(name, p), paths.onnx_io(name, p))
                for p in parts
            ),
        ],
        "clean": [(artifacts.remove_artifacts, [[*targets, *data], [paths.onnx_staging(name)]])],
    }
