"""The tritonserver bundled in the nvidia-pytriton wheel: where it is, and what it needs.

The wheel carries the server, the python backend and one backend stub per Python version.
Launching it standalone takes four facts measured on this project's machines (see
ENVIRONMENT.md): a backend folder holding the stub of the running interpreter's version, the
venv's `bin/` first on PATH (the stub finds its packages through the first `python3`), the
interpreter's LIBDIR first on LD_LIBRARY_PATH (or the stub loads another libpython), and a
preflight run of the stub, because a broken stub makes the server hang in "loading" forever.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ServerError

INSTALL_FIX = "pip install -r requirements.txt"
STUB_NAME = "triton_python_backend_stub"
PREFLIGHT_TIMEOUT = 15.0  # seconds for the stub to print its usage line


@dataclass(frozen=True)
class TritonInstall:
    """The files of the tritonserver bundled in the nvidia-pytriton wheel."""

    server: Path
    python_backend: Path  # libtriton_python.so
    backend_utils: Path  # triton_python_backend_utils.py
    stub: Path  # the python backend stub built for the running interpreter


def find_tritonserver() -> TritonInstall:
    """Locate the bundled server, python backend and this interpreter's stub, or say how to fix."""
    import importlib.util  # find_spec does not import pytriton itself

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            f"nvidia-pytriton is not installed in {sys.prefix}, so there is no tritonserver "
            f"to run; install it with: {INSTALL_FIX}"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    stubs = root / "python_backend_stubs"
    install = TritonInstall(
        server=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python" / "libtriton_python.so",
        backend_utils=root / "backends" / "python" / "triton_python_backend_utils.py",
        stub=stubs / version / STUB_NAME,
    )
    if install.server.is_file() and not install.stub.is_file() and stubs.is_dir():
        built = sorted(p.parent.name for p in stubs.glob(f"*/{STUB_NAME}"))
        raise ServerError(
            f"the python backend stub for Python {version} is missing from {stubs} (built for: "
            f"{', '.join(built) or 'none'}); a stub of another version makes the server hang "
            f"while loading. Use a venv of one of those versions, then: {INSTALL_FIX}"
        )
    missing = [str(p) for p in vars(install).values() if not p.is_file()]
    if missing:
        raise ServerError(
            f"the tritonserver bundled in nvidia-pytriton is incomplete, missing: "
            f"{', '.join(missing)}; reinstall it with: {INSTALL_FIX}"
        )
    for program in (install.server, install.stub):
        if not os.access(program, os.X_OK):
            raise ServerError(f"{program} is not executable; reinstall with: {INSTALL_FIX}")
    return install


def prepare_backend_dir(directory: Path, install: TritonInstall | None = None) -> Path:
    """Fill `directory/python/` with links to the python backend; return `directory`.

    The result is what `tritonserver --backend-directory` expects. Existing links are replaced.
    """
    install = install or find_tritonserver()
    python_dir = directory / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    links = {
        install.python_backend.name: install.python_backend,
        install.backend_utils.name: install.backend_utils,
        STUB_NAME: install.stub,
    }
    for name, source in links.items():
        link = python_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return directory


def server_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver and its stubs: the venv's bin/ first on PATH and the
    interpreter's LIBDIR first on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = _prepend(str(Path(sys.executable).parent), env.get("PATH"))
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = _prepend(libdir, env.get("LD_LIBRARY_PATH"))
    return env


def _prepend(entry: str, search_path: str | None) -> str:
    rest = [p for p in (search_path or "").split(os.pathsep) if p and p != entry]
    return os.pathsep.join([entry, *rest])


def preflight_stub(stub: Path, env: Mapping[str, str], timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Run the stub with no arguments in the server's environment; raise unless it is healthy.

    A healthy stub prints "Expected 9 arguments" and exits 1. Anything else (typically exit
    127: libpython not found) would make the server hang in "loading" forever.
    """
    try:
        done = subprocess.run(
            [str(stub)],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ServerError(
            f"the python backend stub {stub} did not answer within {timeout:.0f} s when run "
            f"with no arguments; reinstall with: {INSTALL_FIX}"
        ) from None
    except OSError as err:
        raise ServerError(f"cannot run the python backend stub {stub}: {err}") from None
    if done.returncode == 1 and "Expected 9 arguments" in done.stdout + done.stderr:
        return
    shown = (done.stderr.strip() or done.stdout.strip() or "(no output)")[-2000:]
    libdir = sysconfig.get_config_var("LIBDIR")
    raise ServerError(
        f"the python backend stub {stub} is broken here (exit {done.returncode}), so the "
        f"server would hang loading python models. It said:\n{shown}\n"
        f"It needs libpython{sys.version_info.major}.{sys.version_info.minor} from {libdir} "
        f"(a shared build of this Python) and this venv's packages: {INSTALL_FIX}"
    )
