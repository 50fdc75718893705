"""Which exporter makes a model's ONNX files, and why: optimum where it lists the model type
for the task, else the generic torch.onnx path for causal LMs (tasks/export_torch.py).

The download stage asks before any work (a refusal names the fix); the onnx stage asks again
and prints the answer. Both read the model type from the checkpoint's config.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tasks import artifacts, catalog
from tasks.errors import ModelSourceError


@dataclass(frozen=True)
class Choice:
    path: str  # "optimum" | "torch"
    reason: str


def optimum_onnx_missing() -> str | None:
    """Why optimum's ONNX exporter cannot run here, or None when it is installed. optimum-onnx
    0.1.0 requires transformers<4.58, so a venv with transformers 5 has none (docs/decoders.md,
    "transformers 5")."""
    import importlib.util

    try:
        found = importlib.util.find_spec("optimum.exporters.onnx") is not None
    except ModuleNotFoundError:  # no optimum at all
        found = False
    if not found:
        installed = artifacts.versions("transformers")["transformers"]
        return (
            f"optimum-onnx is not installed (it requires transformers<4.58; this venv has "
            f"transformers {installed})"
        )
    return None


def fp32_weight_bytes(source: Path) -> int:
    """The bytes a checkpoint's weights take as the fp32 the onnx stage exports: its weight
    files' size, scaled from the dtype config.json says they are stored in."""
    config = artifacts.read_json(source / "config.json")
    stored = config.get("torch_dtype") or config.get("dtype") or "float32"
    size = sum(f.stat().st_size for p in catalog.CHECKPOINT_WEIGHTS for f in source.glob(p))
    return size * 4 // catalog.DTYPE_BYTES.get(str(stored), 4)


def external_data_bytes() -> int:
    """catalog.EXTERNAL_DATA_BYTES, or the lower figure its internal knob (an environment
    variable, read by the onnx stage only) sets for a test."""
    given = os.environ.get(catalog.EXTERNAL_DATA_BYTES_VARIABLE, "")
    return int(given) if given.isdigit() else catalog.EXTERNAL_DATA_BYTES


def external_data(source: Path) -> bool:
    """Whether the onnx stage writes this checkpoint's ONNX files with external data (their
    weights in `<part>.onnx.data` beside them), decided before any export."""
    return fp32_weight_bytes(source) >= external_data_bytes()


def optimum_tasks_for(model_type: str) -> set[str]:
    """The tasks optimum's ONNX exporter lists for a model type (as main_export spells it);
    none when optimum-onnx is not installed."""
    if optimum_onnx_missing():
        return set()
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    for spelling in dict.fromkeys((model_type, model_type.replace("_", "-"))):
        try:
            return set(
                TasksManager.get_supported_tasks_for_model_type(
                    spelling, exporter="onnx", library_name="transformers"
                )
            )
        except KeyError:
            continue
    return set()


def causal_lm_types() -> tuple[str, ...]:
    """Every model type the installed transformers loads with AutoModelForCausalLM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return tuple(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


def window_cut(config: dict) -> str:
    """Why optimum's files would not do for this checkpoint's config.json: a sliding window
    shorter than the model's positions. Past it transformers' cache keeps the window only and
    optimum's files keep every position (tiny Mistral and Qwen2 with a window of 8 failed
    parity, transformers 4.57). '' when no window bites (none, turned off, or as long as the
    positions: Mistral from v0.2, Qwen2's released configs)."""
    window = config.get("sliding_window")
    if not isinstance(window, int) or window <= 0 or config.get("use_sliding_window") is False:
        return ""
    if "sliding_attention" not in (config.get("layer_types") or ["sliding_attention"]):
        return ""
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 0
    if positions and window >= positions:
        return ""
    limit = f"of its {positions}" if positions else "with no stated limit on its positions"
    return f"a sliding window of {window} positions {limit}: optimum's files do not keep it"


def choose(
    spec: catalog.TaskSpec, model_type: str, exporter: str, config: dict | None = None
) -> Choice:
    """The exporter for this task and model type (and, given, its config.json: `window_cut`);
    a ModelSourceError naming the fix if none."""
    if spec.generation == "causal" and model_type in catalog.UNSUPPORTED_CACHES:
        raise ModelSourceError(
            f"task={spec.name}: a '{model_type}' model is not supported: "
            f"{catalog.UNSUPPORTED_CACHES[model_type]}; the exported decoders pass on per-layer "
            "keys and values only. Pick a decoder with a key/value cache (llama, qwen2, ...)"
        )
    absent = optimum_onnx_missing()
    supported = set() if exporter == "torch" else optimum_tasks_for(model_type)
    missing = [task for task in spec.optimum_tasks if task not in supported]
    generic = spec.generation in catalog.TORCH_EXPORT_GENERATION
    cut = window_cut(config or {})
    preferred = generic and (model_type in catalog.TORCH_OVER_OPTIMUM or bool(cut))
    if exporter == "torch" or (exporter == "auto" and (missing or preferred) and generic):
        if model_type in catalog.TORCH_EXPORT_REFUSED:
            raise ModelSourceError(
                f"task={spec.name}: the generic path cannot export a '{model_type}' model: "
                f"{catalog.TORCH_EXPORT_REFUSED[model_type]}. Pick another family"
            )
        if model_type not in causal_lm_types():
            raise ModelSourceError(
                f"task={spec.name}: '{model_type}' is no causal LM that transformers "
                "(AutoModelForCausalLM) knows; pick a decoder-only model"
            )
        if exporter == "torch":
            why = "asked for"
        elif absent:
            why = absent
        elif missing:
            why = f"optimum does not list '{model_type}'"
        else:
            why = f"'{model_type}': {catalog.TORCH_OVER_OPTIMUM.get(model_type) or cut}"
        return Choice("torch", f"{why}: the generic torch.onnx (dynamo) path")
    if not missing:
        listed = ", ".join(spec.optimum_tasks)
        return Choice("optimum", f"optimum lists '{model_type}' for {listed}")
    if absent:
        raise ModelSourceError(
            f"task={spec.name}: {absent}; install requirements/build.txt's versions "
            "(transformers 4.57), or use exporter=torch for a decoder"
        )
    if generic:  # exporter=optimum on a type only the generic path exports
        raise ModelSourceError(
            f"exporter=optimum: optimum does not list a '{model_type}' model for "
            f"{', '.join(missing)}; use exporter=torch (or exporter=auto), the generic path"
        )
    fits = [t for t, s in catalog.TASKS.items() if all(o in supported for o in s.optimum_tasks)]
    hint = f"use task={' or task='.join(fits)}" if fits else "use a model of another family"
    raise ModelSourceError(
        f"task={spec.name}: a '{model_type}' model cannot be exported for "
        f"{', '.join(missing)}; {hint}, or pick a model made for {spec.name}"
    )
