"""Stage `download`: the checkpoint, config and tokenizer into model_zoo/<name>/source/.

A Hub snapshot or a copy of a local directory, made task-ready: a fast `tokenizer.json` is
always present, and a task head missing from the checkpoint (a classifier on a bare encoder)
is initialised once with a fixed seed and saved, so export and parity see the same weights.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

from doit.tools import config_changed

from tasks import artifacts, catalog, exporters, paths
from tasks.errors import ModelSourceError, fails_cleanly
from tasks.settings import (
    ModelSource,
    Settings,
    check_shapes_fit_model,
    command_line,
    current,
)

HUB_HOST = "huggingface.co"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*merges*", "*vocab*"]
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look before a download that would otherwise retry for minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True  # behind a proxy only the real request can tell
    host = urlparse(os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")).hostname or HUB_HOST
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_copy(ref: str) -> Path | None:
    """The packaged copy of a Hub model, if one is installed."""
    if ref not in catalog.OFFLINE_COPIES:
        return None
    import importlib

    package, attribute = catalog.OFFLINE_COPIES[ref]
    try:
        return Path(getattr(importlib.import_module(package), attribute))
    except ImportError:
        return None


def copy_checkpoint(source: ModelSource, staged: Path) -> str:
    """Fill `staged` with the checkpoint; return where it came from."""
    if source.local is not None:
        shutil.copytree(
            source.local,
            staged,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".git", ".cache", "*.onnx", "*.plan"),
        )
        return str(source.local)
    if hub_reachable():
        from huggingface_hub import list_repo_files, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            files = list_repo_files(source.ref, revision=source.revision)
            patterns = list(HUB_PATTERNS)
            if not any(f.endswith(".safetensors") for f in files):
                patterns.append("pytorch_model*.bin")
            print(f"download: fetching {source.ref}@{source.revision} from the Hub", flush=True)
            snapshot_download(
                source.ref, revision=source.revision, local_dir=staged, allow_patterns=patterns
            )
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelSourceError(
                f"model={source.ref} revision={source.revision}: the Hub did not give it "
                f"({reason}); check the id and revision, run `huggingface-cli login` for a gated "
                "model, or pass model=DIR"
            ) from err
        shutil.rmtree(staged / ".cache", ignore_errors=True)
        return f"hub:{source.ref}@{source.revision}"
    packaged = offline_copy(source.ref)
    if packaged is None:
        raise ModelSourceError(
            f"model={source.ref}: the Hugging Face Hub is unreachable and no local copy of this "
            "model is installed; download it on a machine with internet "
            "(huggingface-cli download ... --local-dir DIR) and pass model=DIR"
        )
    print(f"download: Hub unreachable; using the copy of {source.ref} in {packaged}", flush=True)
    shutil.copytree(packaged, staged, dirs_exist_ok=True)
    return f"package:{packaged}"


def ensure_fast_tokenizer(staged: Path) -> None:
    if (staged / "tokenizer.json").is_file():
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(staged, use_fast=True)
    except Exception as err:  # transformers raises many kinds here
        raise ModelSourceError(
            f"cannot load the model's tokenizer ({err}); the model "
            "directory needs tokenizer files (tokenizer.json or vocab)"
        ) from err
    if not tokenizer.is_fast:
        raise ModelSourceError(
            "the model has no fast tokenizer (tokenizer.json), which the "
            "Triton tokenizer needs; convert it with transformers first"
        )
    tokenizer.save_pretrained(staged)


def save_chat_template(staged: Path) -> None:
    """What `apply_chat_template` renders with, as transformers finds it (tokenizer_config.json,
    chat_template.jinja, ...): the template, or null when the model has none, and the special
    tokens it sees. The OpenAI API's chat endpoint renders it (triton/openai_api/chat.py)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(staged)
    try:
        template = tokenizer.get_chat_template()
    except ValueError:  # no template, or several and no default among them
        template = None
    chat = {"chat_template": template, "special_tokens": tokenizer.special_tokens_map}
    artifacts.write_json(staged / paths.CHAT_FILE, chat)


def ensure_task_head(spec: catalog.TaskSpec, staged: Path) -> None:
    """Load the task's model class; save it back if some weights had to be initialised."""
    import torch
    import transformers

    model_class = getattr(transformers, spec.auto_class)
    torch.manual_seed(0)
    model, info = model_class.from_pretrained(staged, output_loading_info=True)
    labels = model.config.num_labels
    if spec.labels is not None and labels != spec.labels:
        raise ModelSourceError(
            f"task={spec.name} takes a model whose head has {spec.labels} label(s); this one "
            f"has {labels}: pick a model made for {spec.name}, or another task"
        )
    missing = info["missing_keys"]
    if not missing:
        return
    print(
        f"download: {len(missing)} weights of {type(model).__name__} are not in the checkpoint "
        f"(e.g. {sorted(missing)[0]}); initialised with seed 0 and saved with it",
        flush=True,
    )
    for name in WEIGHT_FILES:
        (staged / name).unlink(missing_ok=True)
    model.save_pretrained(staged, safe_serialization=True)


def fetch(settings: Settings) -> None:
    target = paths.source_dir(settings.name)
    staged = artifacts.staging_dir(target)
    try:
        origin = copy_checkpoint(settings.source, staged)
        config_path = staged / "config.json"
        if not config_path.is_file():
            raise ModelSourceError(
                f"model={settings.source.ref}: the checkpoint has no config.json"
            )
        config = artifacts.read_json(config_path)
        model_type = config.get("model_type", "?")
        exporters.choose(settings.task, model_type, settings.exporter, config)  # refuses first
        check_shapes_fit_model(settings, config_path, "seq" in command_line())
        ensure_fast_tokenizer(staged)
        ensure_task_head(settings.task, staged)
        if settings.task.generation == "causal":
            save_chat_template(staged)
        # Hashes, not sizes: retrained weights of the same shapes must rebuild the export.
        files = {
            str(p.relative_to(staged)): artifacts.sha256(p)
            for p in sorted(staged.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "ref": settings.source.ref,
            "origin": origin,
            "task": settings.task.name,
            "files": files,
        }
        artifacts.write_json(staged / paths.source_manifest(settings.name).name, manifest)
        artifacts.replace_dir(staged, target)
    finally:
        if staged.exists():
            shutil.rmtree(staged)
        artifacts.prune_empty_dirs(target.parent)  # a failed first download leaves nothing
    print(f"download: {settings.source.ref} -> {target.relative_to(paths.ROOT)}", flush=True)


def task_download():
    """Checkpoint, config and tokenizer into model_zoo/<name>/source/ (Hub or local copy)."""
    settings = current()
    params = {
        "source": settings.source.fingerprint(),
        "task": settings.task.name,
        "versions": artifacts.versions("transformers", "huggingface-hub"),
    }
    targets = [
        paths.source_manifest(settings.name),
        paths.source_config(settings.name),
        paths.source_tokenizer(settings.name),
        *([paths.source_chat(settings.name)] if settings.task.generation == "causal" else []),
    ]
    yield {
        "name": settings.name,
        "actions": [(fails_cleanly(fetch), [settings])],
        "file_dep": [paths.stage_module("download")],
        "targets": targets,
        "uptodate": [config_changed(params)],
        # `doit clean` always reaches this root task: it also takes the deployment's
        # benchmark reports, which no default task builds.
        "clean": [
            (
                artifacts.remove_artifacts,
                [targets, [paths.source_dir(settings.name), paths.bench_dir(settings.name)]],
            )
        ],
    }
