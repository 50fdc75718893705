"""Stage `parity`: Polygraphy proves the exported model gives the PyTorch model's numbers.

The reference is the Hugging Face model in fp32 on CPU (Polygraphy's own PyTorch runner
hard-codes CUDA, so it is run here). ONNX Runtime, and TensorRT when a plan exists, run the
same real tokenized texts at the min, opt and max (batch, seq) of the profile. Every output
is compared with the tolerances of the precision. An fp16 file (the quantize stage's AutoCast
copy) is also judged on its task's gates, as a quantized one is, so fp16 is proven on ONNX
Runtime here, before any GPU runs it. `parity.json` is written only on success;
on failure the build stops naming each failing output and its differences.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from doit.tools import config_changed

from tasks import artifacts, catalog, paths
from tasks.compare import REFERENCE, compare, engine_runners, mean_pooled, print_passes
from tasks.errors import fails_cleanly
from tasks.settings import Settings, current


def sample_texts(spec: catalog.TaskSpec) -> tuple[list, list | None]:
    """Texts (and second texts for pairs), one long enough to fill any max sequence."""
    long_text = " ".join(catalog.SAMPLE_TEXTS * 40)
    texts = [*catalog.SAMPLE_TEXTS, long_text]
    if len(spec.text_inputs) == 1:
        return texts, None
    return [*catalog.SAMPLE_QUESTIONS, catalog.SAMPLE_QUESTIONS[0]], texts


def tokenized_feeds(settings: Settings, tokenizer, input_names: list[str]) -> list[dict]:
    """One feed per profile point: real token ids, cropped or padded to exactly (batch, seq)."""
    import numpy as np

    first, second = sample_texts(settings.task)
    encoded = tokenizer(first, second, padding=True, return_tensors="np")
    pad = {"input_ids": tokenizer.pad_token_id or 0}
    rows = len(first)
    feeds = []
    for point, (batch, seq) in enumerate(settings.shape_points()):
        order = [(point * 3 + i) % rows for i in range(batch)]
        feed = {}
        for name in input_names:
            array = encoded[name][order, :seq].astype(np.int64)
            if array.shape[1] < seq:
                filler = np.full((batch, seq - array.shape[1]), pad.get(name, 0), np.int64)
                array = np.concatenate([array, filler], axis=1)
            feed[name] = np.ascontiguousarray(array)
        feeds.append(feed)
    return feeds


def reference_outputs(settings: Settings, source: Path, feeds: list[dict]) -> list[dict]:
    import torch
    import transformers

    spec = settings.task
    model = getattr(transformers, spec.auto_class).from_pretrained(source, dtype=torch.float32)
    model.eval()
    results = []
    with torch.inference_mode():
        for feed in feeds:
            tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
            out = model(**tensors)
            named = {o.onnx_name: out[o.onnx_name] for o in spec.outputs if o.onnx_name in out}
            if spec.mean_pooling:
                named["embedding"] = mean_pooled(
                    out["last_hidden_state"], tensors["attention_mask"]
                )
            results.append({k: v.float().numpy() for k, v in named.items()})
    return results


def check(settings: Settings) -> None:
    """The parity stage: write parity.json only if every compared output passes."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the long sample text is cropped on purpose
    name = settings.name
    paths.parity_report(name).unlink(missing_ok=True)  # the report exists only while it is true
    for part in settings.task.onnx_parts:
        artifacts.check_onnx(paths.onnx_file(name, part), name)
    tol = settings.tolerance
    if settings.precision_note:
        print(f"parity: {settings.precision_note}", flush=True)
    if settings.quantized:
        print(
            f"parity: PyTorch fp32 vs {settings.backend} {settings.precision} "
            f"({settings.recipe.name}), gated on {settings.task.name}'s task-level agreement",
            flush=True,
        )
    else:
        print(
            f"parity: PyTorch fp32 vs {settings.backend} {settings.precision}, atol {tol.atol} "
            f"rtol {tol.rtol}",
            flush=True,
        )
    if settings.quantized:
        from tasks import gates, generation_parity

        if settings.task.generation:
            results = generation_parity.check_gated(settings)
        else:
            results = {"results": gates.check_encoder(settings)}
    elif settings.task.generation:  # fp16 too: every file, and greedy tokens equal to fp32's
        from tasks import generation_parity

        results = generation_parity.check(settings)
    else:
        results = {}
        if settings.recipe is not None and settings.task.name in catalog.GATES:
            from tasks import gates  # fp16: what users see, as a quantized model is judged

            results["gated"] = gates.check_encoder(settings)
        results["results"] = check_encoder(settings)
    artifacts.write_json(
        paths.parity_report(name),
        {
            "reference": REFERENCE,
            "precision": settings.precision,
            "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
            "shapes": [list(p) for p in settings.shape_points()],
            **results,
            "versions": tool_versions(),
        },
    )


def check_encoder(settings: Settings) -> dict:
    """Encoder tasks: the model file at the min, opt and max (batch, seq) of the profile."""
    from transformers import AutoTokenizer

    io = artifacts.read_json(paths.onnx_io(settings.name))
    source = paths.source_dir(settings.name)
    feeds = tokenized_feeds(
        settings, AutoTokenizer.from_pretrained(source), [t["name"] for t in io["inputs"]]
    )
    labels = [{"batch": b, "seq": s} for b, s in settings.shape_points()]
    report = compare(
        settings.tolerance,
        engine_runners(settings.model_file(), settings.plan_file()),
        feeds,
        reference_outputs(settings, source, feeds),
        labels,
        {o.onnx_name for o in settings.task.outputs},
    )
    print_passes(report)
    return report


def tool_versions() -> dict:
    return artifacts.versions("torch", "transformers", "onnxruntime", "polygraphy", "tensorrt")


def task_parity():
    """Polygraphy: PyTorch fp32 vs ONNX Runtime (+TensorRT) at min/opt/max; parity.json."""
    settings = current()
    name = settings.name
    params = {
        "shapes": settings.shape_points(),
        "precision": settings.precision,
        "tolerance": [settings.tolerance.atol, settings.tolerance.rtol],
        "tensorrt": settings.backend == "tensorrt",  # what is compared, not how it is served
        "samples": list(
            itertools.chain(
                catalog.SAMPLE_TEXTS, catalog.SAMPLE_QUESTIONS, catalog.GENERATION_PROMPTS
            )
        ),
        "new_tokens": catalog.GENERATION_PARITY_NEW_TOKENS,
        "versions": tool_versions(),
        "gates": repr(catalog.GATES.get(settings.task.name)) if settings.recipe else None,
        "gate_new_tokens": catalog.GATE_NEW_TOKENS,
        "recipe": repr(settings.recipe),
    }
    engine = (
        [paths.plan_file(name, part) for part in settings.task.onnx_parts]
        + [paths.plan_memory(name)]
        if settings.backend == "tensorrt"
        else []
    )
    generation = (  # the decoding loop that serves is the one proven equal to generate()
        [
            paths.stage_module("generation_parity"),
            paths.runtime_file("generate", "decoding.py"),
            paths.runtime_helpers(),  # its softmax
            paths.stage_module("facts"),  # pad, EOS and start ids
        ]
        if settings.task.generation
        else []
    )
    if settings.decoder == "slots":  # its graph, in the in-flight loop that serves it
        generation += [
            *(path for graph in paths.slot_decoder_files(name) for path in graph),
            *(paths.runtime_file("inflight", f) for f in catalog.INFLIGHT_MODULES),
        ]
    target = paths.parity_report(name)
    yield {
        "name": name,
        "actions": [(fails_cleanly(check), [settings])],
        "file_dep": [
            paths.source_manifest(name),
            *(
                f(name, part)
                for part in settings.task.onnx_parts
                for f in (paths.onnx_file, paths.onnx_io)
            ),
            *engine,
            *generation,
            *(  # a quantized or fp16 copy is what is compared, on the held texts, by the gates
                [
                    *(paths.quant_file(name, part) for part in settings.task.onnx_parts),
                    *(paths.quant_record(name, part) for part in settings.task.onnx_parts),
                    paths.HELD_TEXTS,
                    paths.stage_module("gates"),
                ]
                if settings.recipe is not None
                else []
            ),
            paths.stage_module("parity"),
            paths.stage_module("compare"),  # the runners and the comparison
        ],
        "targets": [target],
        "uptodate": [config_changed(params)],
        "clean": [(artifacts.remove_artifacts, [[target]])],
    }
