"""Stage `repo`: assembles the Triton model repository under models/.

    models/<name>_model/      python backend, encoder tasks: the one hop: config.pbtxt,
                              1/model.py, encoding.py, tokenizer.json, model.onnx (+ answer.py
                              and the checkpoint files it reads: seqcls, qa)
    models/<name>_tokenizer/  config.pbtxt, 1/model.py, encoding.py, tokenizer.json
    models/<name>_model/      native backends: config.pbtxt, 1/model.plan | 1/model.onnx
    models/<name>_generate/   config.pbtxt, 1/model.py, decoding.py, the in-flight loop's
                              modules (triton/inflight/), tokenizer.json, *.onnx
                              (+ chat.json, causal LMs: the chat template)
                              (decoder=slots: decoder_slots.onnx and _mixed in place of the *.onnx)
    models/<name>_stream/     the same files as _generate (the built ones of both are hard
                              links to model_zoo/: no copy on disk), its own config.pbtxt
    models/<name>_encoder/, _decoder/, _decoder_past/   with decoder=models: one exported
                              file each, as _model (the generate model holds no *.onnx then)
    models/<name>_post/       native backends: config.pbtxt, 1/model.py, answer.py (+ the
                              checkpoint files it reads)
    models/<name>/            config.pbtxt, 1/ (the ensemble)

Every 1/model.py has the shared helpers (triton/runtime/runtime.py) beside it, as
llm_in_triton_runtime.py: the python backend puts the model's folder on sys.path, and the
name is one no installed package takes.

Each Triton model is a subtask, so a change rebuilds only the models it touches. Files are
copied atomically and config.pbtxt is written last: a server polling the repository never
sees a config whose files are not all in place. The model part waits for parity.

An ONNX file exported with external data (past 2 GiB) brings its `<part>.onnx.data` along,
under that name (the one its graph refers to) beside it, even where the file is renamed
(model.onnx): ONNX Runtime, in the python backend or Triton's own, reads it from the file's
folder. The data file is made only for such models, so it is no doit target: the file's
record (io.json, or the quantize record) is a dependency, and a check sees the copy in place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from doit.tools import config_changed

from tasks import artifacts, catalog, paths
from tasks.errors import fails_cleanly
from tasks.settings import Settings, current

ENSEMBLE_MARKER = ".keep"  # Triton needs an ensemble's version folder, even empty


@dataclass(frozen=True)
class Component:
    """One Triton model of the deployment: its version-folder files and its config."""

    part: str
    triton_model: str
    files: tuple[tuple[Path | None, str], ...]  # (source or None for an empty marker, filename)
    # reports that must exist first (parity), and the records of the ONNX files it ships (their
    # hashes, and their data files' when the weights are beside them)
    checks: tuple[Path, ...]
    link: bool = False  # hard-link the built files (a second model on them), not copy

    def targets(self) -> list[Path]:
        return [
            *(paths.repo_version_file(self.triton_model, f) for _, f in self.files),
            paths.repo_config(self.triton_model),
        ]

    def external_data(self) -> list[tuple[Path, Path]]:
        """(data file in model_zoo/, its place here) of each ONNX file this model ships,
        whether or not the build made one (a model over 2 GiB)."""
        return [
            (data, paths.repo_version_file(self.triton_model, data.name))
            for source, _ in self.files
            if source is not None and source.suffix == ".onnx"
            for data in [paths.external_data_file(source)]
        ]

    def data_in_place(self, task, values) -> bool:
        """doit `uptodate`: every data file the build made has its copy here, and no copy
        is left of one it no longer makes."""
        return all(
            target.is_file() == data.is_file()
            and (not data.is_file() or target.stat().st_size == data.stat().st_size)
            for data, target in self.external_data()
        )


def python_code(component: str) -> tuple:
    """A python-backend model's own code: the shared helpers, then its model.py."""
    return (
        (paths.runtime_helpers(), paths.RUNTIME_SHIPPED_AS),
        (paths.runtime_model_code(component), "model.py"),
    )


def file_model(settings: Settings, part: str) -> Component:
    """A Triton model serving one exported file: its engine, its ONNX file, or the ONNX file
    and the python-backend code that runs it."""
    name = settings.name
    if settings.backend == "tensorrt":  # with the record of where it was built, for serve
        files = (
            (paths.plan_record(name, part), catalog.PLAN_RECORD_NAME),
            (paths.plan_file(name, part), settings.model_filename),
        )
    elif settings.backend == "onnxruntime":
        files = ((settings.model_file(part), settings.model_filename),)
    else:
        files = ((settings.model_file(part), settings.model_filename), *python_code("onnx_model"))
    checks = (paths.parity_report(name), settings.model_record(part))
    return Component(part, settings.triton_models[part], files, checks)


def answer_files(settings: Settings) -> tuple:
    """The task's answer step (seqcls, qa): its answer.py and the checkpoint files it reads."""
    post = settings.task.postprocess
    if post is None:
        return ()
    return (
        (paths.runtime_file(post.component, "answer.py"), "answer.py"),
        *((paths.source_file(settings.name, f), f) for f in post.files),
    )


def one_hop(settings: Settings) -> list[Component]:
    """The python backend's encoder deployment: one model and the ensemble."""
    name, names = settings.name, settings.triton_models
    files = (
        (settings.model_file(), settings.model_filename),
        (paths.source_tokenizer(name), "tokenizer.json"),
        (paths.runtime_file("tokenizer", "encoding.py"), "encoding.py"),
        *answer_files(settings),
        *python_code("pipeline"),
    )
    # a file both the tokenizing and the answer step read (tokenizer.json) is shipped once
    files = tuple({filename: (source, filename) for source, filename in files}.values())
    return [
        Component(
            "model", names["model"], files, (paths.parity_report(name), settings.model_record())
        ),
        Component("ensemble", names["ensemble"], ((None, ENSEMBLE_MARKER),), ()),
    ]


def components(settings: Settings) -> list[Component]:
    if settings.one_hop:
        return one_hop(settings)
    name, names = settings.name, settings.triton_models
    found = [
        Component(
            "tokenizer",
            names["tokenizer"],
            (
                (paths.source_tokenizer(name), "tokenizer.json"),
                (paths.runtime_file("tokenizer", "encoding.py"), "encoding.py"),
                *python_code("tokenizer"),
            ),
            (),
        ),
    ]
    if settings.task.generation:
        inline = settings.decoder == "inline"
        if settings.decoder == "models":
            found += [file_model(settings, part) for part in settings.task.onnx_parts]
        code = (  # the stream model is this code and these files too
            (paths.runtime_file("generate", "decoding.py"), "decoding.py"),
            *((paths.runtime_file("inflight", f), f) for f in catalog.INFLIGHT_MODULES),
            (paths.runtime_file("tokenizer", "encoding.py"), "encoding.py"),
            *python_code("generate"),
        )
        # decoder=slots: its graphs (the step's and its mixed twin's) in place of the parts
        slots = paths.slot_decoder_files(name) if settings.decoder == "slots" else []
        files = (
            *(
                (settings.model_file(part), f"{part}.onnx")
                for part in settings.task.onnx_parts
                if inline
            ),
            *((graph, graph.name) for graph, _ in slots),
            (paths.source_tokenizer(name), "tokenizer.json"),
            # the chat template, for the OpenAI API's chat endpoint (triton/openai_api/)
            *(
                [(paths.source_chat(name), paths.CHAT_FILE)]
                if settings.task.generation == "causal"
                else []
            ),
            *code,
        )
        checks = (
            paths.parity_report(name),
            *(settings.model_record(part) for part in settings.task.onnx_parts if inline),
            *(record for _, record in slots),
        )
        found.append(Component("generate", names["generate"], files, checks, link=True))
        # its own files, not a path to _generate's: Triton fetches a bucket's models one by one
        found.append(Component("stream", names["stream"], files, checks, link=True))
    else:
        found.append(file_model(settings, "model"))
    if settings.task.postprocess is not None:
        files = (*answer_files(settings), *python_code("postprocess"))
        found.append(Component("postprocess", names["postprocess"], files, ()))
    found.append(Component("ensemble", names["ensemble"], ((None, ENSEMBLE_MARKER),), ()))
    return found


def other_parts(settings: Settings) -> list[Path]:
    """Repository folders and rendered configs of this name's parts that this deployment does
    not have: left by an earlier build for another task or decoder (`_post` after seqcls ->
    encode, `_decoder` after decoder=models -> inline)."""
    wanted = set(settings.triton_models.values())
    found = []
    for part, suffix in catalog.PART_SUFFIXES.items():
        if f"{settings.name}{suffix}" not in wanted:
            found += [
                paths.repo_model_dir(f"{settings.name}{suffix}"),
                paths.rendered_config(settings.name, part),
            ]
    return found


def remove_other_parts(settings: Settings) -> None:
    """Triton would still load them: remove them."""
    for path in other_parts(settings):
        if path.is_dir():
            print(f"repo: removing {path.relative_to(paths.ROOT)} (not part of this deployment)")
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def install(component: Component, config_source: Path) -> None:
    version_dir = paths.repo_version_dir(component.triton_model)
    data_files = [(d, t) for d, t in component.external_data() if d.is_file()]
    wanted = {filename for _, filename in component.files} | {t.name for _, t in data_files}
    if version_dir.is_dir():  # files of another backend (model.plan after backend=python)
        for stale in version_dir.iterdir():
            if stale.name not in wanted and stale.is_file():
                print(f"repo: removing stale {stale.relative_to(paths.ROOT)}", flush=True)
                stale.unlink()
    for source, filename in component.files:
        target = paths.repo_version_file(component.triton_model, filename)
        if source is None:
            artifacts.write_text(target, "")
        elif component.link and paths.MODEL_ZOO in source.parents:  # built files, not code
            artifacts.link_file(source, target)
        else:
            artifacts.copy_file(source, target)
    for data, target in data_files:  # built files: linked where the file system can
        artifacts.link_file(data, target)
    artifacts.copy_file(config_source, paths.repo_config(component.triton_model))
    print(
        f"repo: {paths.repo_model_dir(component.triton_model).relative_to(paths.ROOT)}", flush=True
    )


def task_repo():
    """Assemble models/: the ensemble <name> and its parts (_model; _tokenizer, _post...)."""
    settings = current()
    for component in components(settings):
        config_source = paths.rendered_config(settings.name, component.part)
        targets = component.targets()
        data = [target for _, target in component.external_data()]
        yield {
            "name": component.triton_model,
            "actions": [
                *([(remove_other_parts, [settings])] if component.part == "ensemble" else []),
                (fails_cleanly(install), [component, config_source]),
            ],
            "file_dep": [
                *(s for s, _ in component.files if s is not None),
                config_source,
                paths.wiring_report(settings.name),
                *component.checks,
                paths.stage_module("repo"),
            ],
            "targets": targets,
            "uptodate": [
                config_changed(
                    {
                        "files": [f for _, f in component.files],
                        # the ensemble's run removes parts of other deployments of this name
                        **(
                            {"models": list(settings.triton_models.values())}
                            if component.part == "ensemble"
                            else {}
                        ),
                    }
                ),
                component.data_in_place,
            ],
            "clean": [
                (
                    artifacts.remove_artifacts,
                    [
                        [*targets, *data],
                        other_parts(settings) if component.part == "ensemble" else [],
                    ],
                )
            ],
        }
