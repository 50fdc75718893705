"""Writing build artifacts so that a crash never leaves one that looks valid.

Every target is written to a temporary name in its own folder, then renamed into place
(`os.replace` is atomic on POSIX). Temporary names start with '.' and contain '.tmp-', so
a killed build leaves only files that no stage reads and that `doit clean` removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

from tasks import paths
from tasks.errors import BuildError, ExportError

TMP_MARK = ".tmp-"


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}")


def _remove_stale_tmps(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}{TMP_MARK}*"):
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_target(target: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmps(target)
    tmp = _tmp_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            _remove(tmp)


def write_text(target: Path, text: str) -> None:
    with atomic_target(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: Path, data) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def copy_file(source: Path, target: Path) -> None:
    with atomic_target(target) as tmp:
        shutil.copyfile(source, tmp)


def link_file(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (no second copy on disk), or a copy where the file
    system cannot link. Atomic as copy_file; every artifact is replaced by a rename, never
    rewritten in place, so a link never sees its source change under it."""
    with atomic_target(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def replace_dir(staged: Path, target: Path) -> None:
    """Move a fully written folder into place; a crash midway leaves no `target` at all."""
    if target.exists():
        trash = target.with_name(f".{target.name}{TMP_MARK}old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(staged, target)
        _remove(trash)
    else:
        os.replace(staged, target)


def staging_dir(target: Path) -> Path:
    """A fresh, empty temporary folder beside `target`, to fill and pass to `replace_dir`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmps(target)
    staged = _tmp_name(target)
    staged.mkdir()
    return staged


def text_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file (the calibration and held-out texts)."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions(*distributions: str) -> dict[str, str | None]:
    """Installed versions of packages, without importing them."""
    found = {}
    for dist in distributions:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def remove_artifacts(targets: Iterable[Path], folders: Iterable[Path] = ()) -> None:
    """doit `clean` action: remove targets, whole folders the build owns, leftover temporaries,
    then every folder left empty, up to (not including) `model_zoo/` and `models/`."""
    parents = set()
    for path in [*map(Path, targets), *map(Path, folders)]:
        if path.exists() or path.is_symlink():
            print(f"removing {path.relative_to(paths.ROOT)}")
            _remove(path)
        _remove_stale_tmps(path)
        parents.add(path.parent)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        prune_empty_dirs(parent)


def prune_empty_dirs(folder: Path) -> None:
    """Remove `folder` and its parents while empty, below model_zoo/ or models/."""
    while folder not in paths.ARTIFACT_ROOTS and any(
        root in folder.parents for root in paths.ARTIFACT_ROOTS
    ):
        if not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()
        folder = folder.parent


def file_record(path: Path) -> dict:
    """What identifies a built file: its sha256, and its size and mtime to skip rehashing."""
    stat = path.stat()
    return {"sha256": sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_matches_record(path: Path, record: Path):
    """A doit `uptodate` check: the file is still the one its record describes, and so is its
    external data file when the record lists one (an ONNX file's weights beside it).

    Unchanged size and mtime are trusted; otherwise the file is hashed, so a file replaced,
    truncated or corrupted after its build is rebuilt."""

    def matches(file: Path, saved: dict) -> bool:
        if not file.is_file():
            return False
        stat = file.stat()
        if saved.get("size") == stat.st_size and saved.get("mtime_ns") == stat.st_mtime_ns:
            return True
        return saved.get("sha256") == sha256(file)

    def check(task, values) -> bool:
        if not record.is_file():
            return False
        saved = read_json(record)
        data = saved.get("external_data")
        if data is None and paths.external_data_file(path).exists():
            return False  # a data file the record does not know: not what was built
        return matches(path, saved) and (
            data is None or matches(paths.external_data_file(path), data)
        )

    return check


def onnx_record(path: Path) -> dict:
    """file_record of an ONNX file, and of its external data file under `external_data`."""
    data = paths.external_data_file(path)
    found = file_record(path)
    if data.is_file():
        found["external_data"] = {"file": data.name, **file_record(data)}
    return found


def onnx_bytes(path: Path) -> int:
    """An ONNX file's size with its external data file's."""
    data = paths.external_data_file(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def save_onnx(model, target: Path, external: bool) -> None:
    """Write an ONNX model, checked, with its weights inside it or (external) in
    paths.external_data_file(target) beside it. Both are written in a temporary folder; the
    data file is renamed into place first and the .onnx last, so a crash leaves no pair that
    looks whole (the stage's record, written after, names both files' hashes). Writing one
    inline removes a data file an earlier external export left. The model's tensors are
    moved out of it when external: do not reuse it."""
    import onnx

    data = paths.external_data_file(target)
    staged = staging_dir(data)  # its own temporary name: not one atomic_target(target) takes
    try:
        onnx.save(
            model,
            str(staged / target.name),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=data.name,
        )
        onnx.checker.check_model(str(staged / target.name))  # by path: past 2 GiB too
        if external:  # onnx makes it owner-only: readable as the .onnx is, by the server
            shutil.copymode(staged / target.name, staged / data.name)
            os.replace(staged / data.name, data)
        os.replace(staged / target.name, target)
        if not external:
            data.unlink(missing_ok=True)
    finally:
        _remove(staged)


def check_onnx(path: Path, name: str) -> None:
    """Check an ONNX file (with its external data); a broken one is an error that says how
    to rebuild it. Checked by path, which takes files past protobuf's 2 GiB."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as err:  # protobuf DecodeError, ValidationError, OSError...
        raise ExportError(
            f"{path.relative_to(paths.ROOT)} is not a valid ONNX model ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); run doit again to "
            f"re-export it, or `doit forget onnx:{name}` first if it was replaced by hand"
        ) from err


def load_runtime(component: str, filename: str):
    """A module of the code that runs inside Triton (triton/<component>/<filename>), loaded by
    path as Triton's model.py loads it: runtime code is not a build package, yet parity and
    bench run the same code. The shared helpers (runtime.py) are loaded first, as there."""
    import importlib.util
    import sys

    helpers = paths.runtime_helpers()
    spec = importlib.util.spec_from_file_location("llm_in_triton_runtime", helpers)
    runtime = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    path = paths.runtime_file(component, filename)
    return runtime if path == helpers else runtime.load(path.parent, path.stem)


_HELD: dict[Path, object] = {}  # lock file -> its open handle, for this process's life


def hold_lock(path: Path) -> None:
    """Hold an exclusive lock on `path` until this process ends (the kernel drops it even
    after kill -9) or `release_lock`, or fail at once naming the process that holds it."""
    if path in _HELD:
        return
    handle = try_lock(path)
    if handle is None:
        holder = path.read_text().strip() or "a process"
        raise BuildError(
            f"another doit is building in this tree ({holder}); wait for it to end or stop "
            "it (one build at a time per clone: they share models/ and model_zoo/)"
        )
    _HELD[path] = handle


def try_lock(path: Path):
    """The open, exclusively locked `path` (which says who holds it), or None when another
    process holds it now."""
    import fcntl
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - kept open: the lock lives as long as it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}: doit {' '.join(sys.argv[1:])}".strip())
    handle.flush()
    return handle


def release_lock(path: Path) -> None:
    """Let another doit build here (serve, once its server is up). What this run has
    recorded is written first: doit writes its state when a run ends, and a run that ends
    hours later must not put back records that a build made meanwhile has replaced."""
    handle = _HELD.pop(path, None)
    if handle is None:
        return
    save_doit_state()
    handle.seek(0)
    handle.truncate()
    handle.close()  # closing drops the lock


def save_doit_state() -> None:
    """Write the records this doit run holds in memory now, and forget them, so that the
    run's final write holds only what it does after this (doit 0.37's sqlite3 backend)."""
    import gc

    from doit.dependency import SqliteDB

    for db in [o for o in gc.get_objects() if isinstance(o, SqliteDB)]:
        for task_id in db._dirty:
            record = db.codec.encode(db._cache[task_id])
            db._conn.execute("insert or replace into doit values (?,?)", (task_id, record))
        db._conn.commit()
        db._dirty = set()


def render_template(template: Path, context: dict, filters: dict | None = None) -> str:
    """A strict Jinja template rendered: an undefined name is an error, never an empty
    string (config.pbtxt templates, k8s manifests). Raises ConfigError naming the file."""
    import jinja2

    from tasks.errors import ConfigError

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template.parent)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(filters or {})
    try:
        return env.get_template(template.name).render(context)
    except jinja2.TemplateError as err:
        where = template.relative_to(paths.TEMPLATES_DIR)
        raise ConfigError(f"templates/{where}: {err}") from err
