"""Bad input fails at the door or at the step concerned, in one line, leaving nothing built."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tasks import paths
from tests.helpers.project import OFFLINE_ENV


def built_files(project) -> list[str]:
    """What the build left, besides the READMEs and doit's own record (model_zoo/.doit.db*)."""
    found = []
    for root in ("model_zoo", "models"):
        found += [
            p.relative_to(project.root).as_posix()
            for p in (project.root / root).rglob("*")
            if p.name != "README.md" and not p.name.startswith(paths.DEP_FILE.name)
        ]
    return found


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (["task=summarize"], "ERROR: task=summarize: unknown task; choose one of"),
        (["model=/no/such/dir"], "ERROR: model=/no/such/dir: this directory does not exist"),
        (["seq=1,512,128"], "ERROR: seq=1,512,128: MIN,OPT,MAX must satisfy MIN <= OPT <= MAX"),
        (["batch=0"], "ERROR: batch=0: sizes must be at least 1"),
        (["precision=fp16", "block_size=32"], "ERROR: block_size=32: only 4-bit recipes take"),
        (["backend=tensorrt"], "ERROR: backend=tensorrt: TensorRT and an NVIDIA GPU are needed"),
        (["exporter=onnx"], "ERROR: exporter=onnx: unknown exporter; choose one of"),
        (["exporter=torch"], "ERROR: exporter=torch: the generic path exports causal LMs"),
    ],
)
def test_bad_variables_stop_doit_before_any_task(project, variables, message):
    run = project.doit(*variables, check=False)
    assert run.returncode == 3
    assert run.output.strip() == message or run.output.startswith(message)
    assert len(run.output.strip().splitlines()) == 1
    assert run.executed == []
    assert built_files(project) == []


def test_a_model_whose_architecture_does_not_fit_the_task_fails_at_download(project, tmp_path):
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 16}))
    run = project.doit("task=qa", f"model={t5}", check=False)
    assert run.returncode == 1
    assert run.executed == ["download:qa"]
    assert (
        "ModelSourceError: task=qa: a 't5' model cannot be exported for question-answering"
        in run.output
    )
    assert "Traceback" not in run.output
    assert built_files(project) == []


@pytest.mark.parametrize(
    ("model_type", "variables", "message"),
    [
        # a state-space model's cache is no list of per-layer keys and values
        ("mamba", (), "a 'mamba' model is not supported: a state-space or hybrid model"),
        ("gemma3n", (), "a 'gemma3n' model is not supported: keys and values shared"),
        # the generic path exports it, but optimum was asked for
        (
            "starcoder2",
            ("exporter=optimum",),
            "exporter=optimum: optimum does not list a 'starcoder2' model for text-generation, "
            "text-generation-with-past; use exporter=torch",
        ),
    ],
)
def test_a_decoder_no_exporter_takes_fails_at_download_with_the_reason(
    project, tmp_path, model_type, variables, message
):
    model = tmp_path / model_type
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": model_type}))
    run = project.doit("task=causallm", f"model={model}", *variables, check=False)
    assert run.returncode == 1
    assert run.executed == ["download:causallm"]
    assert message in run.output
    assert "Traceback" not in run.output
    assert built_files(project) == []


def test_a_hub_id_without_the_hub_fails_at_download_naming_the_fix(project):
    run = project.doit("task=seqcls", check=False)
    assert run.returncode == 1
    assert (
        "ModelSourceError: model=distilbert-base-uncased-finetuned-sst-2-english: the "
        "Hugging Face Hub is unreachable" in run.output
    )
    assert "pass model=DIR" in run.output
    assert built_files(project) == []


def test_doit_list_imports_nothing_heavy(project):
    probe = (
        "import sys, time; t = time.perf_counter(); sys.argv = ['doit', 'list'];"
        "from doit.doit_cmd import DoitMain; from doit.cmd_base import DodoTaskLoader;"
        "code = DoitMain(DodoTaskLoader()).run(['list']);"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'tensorrt', 'optimum',"
        " 'polygraphy', 'onnx', 'tritonclient') if m in sys.modules];"
        "print('HEAVY', heavy, 'SECONDS', time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=project.root, capture_output=True, text=True, check=True
    ).stdout
    assert "HEAVY [] SECONDS" in out
    assert "download " in out and "repo " in out and "parity " in out


def wait_for(proc, marker: str, lines: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"doit ended before {marker!r}:\n{''.join(lines)}")
        lines.append(line)
        if marker in line:
            return
    raise AssertionError(f"no {marker!r} within {timeout}s")


# one stage in the lean run (the first file-targeted one after the download); the other four
# are the same path through other tasks (suite=slow)
@pytest.mark.parametrize(
    "stage",
    [
        pytest.param("download", marks=pytest.mark.slow),
        # every stage in suite=slow (26 s each); a half-written target: the full disk's case
        pytest.param("onnx", marks=pytest.mark.slow),
        pytest.param("parity", marks=pytest.mark.slow),
        pytest.param("pbtxt", marks=pytest.mark.slow),
        pytest.param("repo", marks=pytest.mark.slow),
    ],
)
def test_a_build_killed_inside_a_task_ends_correct_when_run_again(project, stage):
    proc = subprocess.Popen(
        [sys.executable, "-m", "doit", "task=encode"],
        cwd=project.root,
        env={**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        # Each marker is printed as the stage's real work starts; that work takes seconds.
        marker = {
            "download": ".  download:encode",
            "onnx": "onnx: exporting",
            "parity": "parity: PyTorch fp32 vs",
            # these take milliseconds: killed as soon as they start
            "pbtxt": ".  pbtxt:encode",
            "repo": ".  repo:encode",
        }[stage]
        wait_for(proc, marker, lines)
        if stage not in ("pbtxt", "repo"):
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    later = {
        "download": paths.source_manifest,
        "onnx": paths.onnx_io,
        "parity": paths.parity_report,
        "pbtxt": paths.wiring_report,
        "repo": paths.repo_config,  # the ensemble's config: installed last
    }[stage]
    assert not project.path(later("encode")).exists(), "".join(lines)  # killed before its end
    run = project.doit("task=encode")  # the kill dropped the tree lock with the process
    assert any(t.startswith(f"{stage}:encode") for t in run.executed)
    assert not [p for p in built_files(project) if ".tmp-" in p]
    record = json.loads(project.path(paths.onnx_io("encode")).read_text())
    import hashlib

    served = (project.root / "models/encode_model/1/model.onnx").read_bytes()
    assert hashlib.sha256(served).hexdigest() == record["sha256"]
    assert json.loads(project.path(paths.parity_report("encode")).read_text())["results"]
    assert project.doit("task=encode").executed == []


def test_a_second_doit_in_the_same_tree_is_refused_at_once_and_the_first_goes_on(project):
    first = subprocess.Popen(
        [sys.executable, "-m", "doit", "task=encode"],
        cwd=project.root,
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    wait_for(first, ".  download:encode", lines)
    started = time.monotonic()
    second = project.doit("task=encode", check=False)
    assert time.monotonic() - started < 30  # at once: it never waits for the first
    assert second.returncode != 0 and "another doit is building in this tree (pid" in second.output
    assert f"pid {first.pid}" in second.output
    listing = project.doit("list")  # what only reads never waits on a build
    assert "serve" in listing.output and "repo" in listing.output
    lines += first.stdout.readlines()
    assert first.wait() == 0, "".join(lines)
    assert project.doit("task=encode").executed == []  # the first one built it all, intact


def mount_tmpfs(where, megabytes: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)],
        capture_output=True,
    )
    return done.returncode == 0


@pytest.mark.parametrize("stage", [pytest.param("onnx", marks=pytest.mark.slow), "repo"])
def test_a_full_disk_fails_with_one_line_and_leaves_no_half_written_target(project, stage):
    """The target folder on a 20 MiB tmpfs: MiniLM's 86 MiB ONNX file cannot fit."""
    where = {
        "onnx": project.path(paths.onnx_file("encode")).parent,
        "repo": project.root / "models" / "encode_model",
    }[stage]
    if not mount_tmpfs(where, 20):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        run = project.doit("task=encode", check=False)
        assert run.returncode != 0
        assert "DiskFull: no space left on the device" in run.output, run.output
        assert "free space (df -h models model_zoo) and run doit again" in run.output
        assert "Traceback" not in run.output
        assert [p.name for p in where.rglob("*") if p.is_file()] == []  # nothing half-written
    finally:
        subprocess.run(["umount", str(where)], check=True)
    run = project.doit("task=encode")  # with room again, it ends correct
    assert any(t.startswith(f"{stage}:encode") for t in run.executed)
    assert not [p for p in built_files(project) if ".tmp-" in p]


def test_a_head_with_the_wrong_number_of_labels_fails_at_download(labelled_minilm_dir, tmp_path):
    """A task row that says how many labels its head has (a cross-encoder's one score) refuses
    another head at download, naming both counts."""
    import dataclasses
    import shutil

    from tasks import catalog, download
    from tasks.errors import ModelSourceError

    staged = tmp_path / "staged"
    shutil.copytree(labelled_minilm_dir, staged)  # a two-label classifier
    one_score = dataclasses.replace(catalog.TASKS["seqcls"], labels=1)
    with pytest.raises(ModelSourceError, match=r"head has 1 label\(s\); this one has 2"):
        download.ensure_task_head(one_score, staged)
    download.ensure_task_head(dataclasses.replace(one_score, labels=2), staged)  # fits
