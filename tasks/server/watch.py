"""`RepositoryWatcher`: rolling updates of a running server from a published repository, or
from models/ as builds change it while `doit serve` serves (`folder_manifest`).

`doit serve repo=s3://... poll=SECONDS` runs the server with explicit model control (the
supervisor's mode: it reloads a model whose stub died, which Triton's poll mode would
refuse). So Triton's own `--model-control-mode=poll` is not used; this thread does its job
from the manifest `doit publish` writes after each model is complete: every `interval`
seconds it reads the manifest, and asks the server to load each model whose version or config
changed (parts before ensembles), and to unload those that are gone. Triton loads the new
version beside the old one, which answers meanwhile and is unloaded once its requests are done:
no request fails. A model is loaded only once the manifest says it is complete, never a folder
being uploaded.

Standard library only (`doit list` imports tasks.server): the manifest is read by a callable,
under a `guard` that says whether the repository may be read now (models/: no build runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

LOAD_TIMEOUT = 300.0


def folder_manifest(repository: Path) -> dict:
    """A local repository's models as the watcher compares them: the newest version folder, a
    digest of every file's name, size, inode and time (a rebuilt file is a new one: artifacts
    are replaced by a rename), and whether it is an ensemble."""
    models = {}
    folders = sorted(p for p in repository.iterdir() if p.is_dir()) if repository.is_dir() else []
    for model in folders:
        config = model / "config.pbtxt"
        versions = [int(p.name) for p in model.iterdir() if p.is_dir() and p.name.isdigit()]
        if not config.is_file() or not versions:
            continue  # not a model the repo stage wrote
        stamps = []
        # not what the python backend writes there itself when it loads model.py (bytecode)
        files = [f for f in model.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        for file in sorted(files):
            info = file.stat()
            stamps.append(
                f"{file.relative_to(model)} {info.st_size} {info.st_ino} {info.st_mtime_ns}"
            )
        models[model.name] = {
            "version": max(versions),
            "config": hashlib.sha256("\n".join(stamps).encode()).hexdigest(),
            "ensemble": 'platform: "ensemble"' in config.read_text(),
        }
    return {"models": models}


def model_states(manifest: dict) -> dict[str, tuple]:
    """model -> (version, config digest, is ensemble), from a publish manifest."""
    return {
        name: (record.get("version"), record.get("config"), bool(record.get("ensemble")))
        for name, record in manifest.get("models", {}).items()
    }


class RepositoryWatcher:
    """Loads into the server at `url` what changed in the manifest `read_manifest()` returns."""

    def __init__(
        self,
        url: str,
        read_manifest: Callable[[], dict],
        interval: float,
        baseline: dict,
        log=print,
        supervisor=None,
        headers: dict[str, str] | None = None,
        guard=None,
    ) -> None:
        self.url = url if "://" in url else f"http://{url}"
        self.headers = dict(headers or {})  # the admin secret's: model control is restricted
        self.guard = guard or (lambda: contextlib.nullcontext(True))
        self.read_manifest, self.interval, self.log = read_manifest, interval, log
        self.seen = model_states(baseline)  # what the server loaded at start
        self.supervisor = supervisor
        self.loads: list[dict] = []  # model, version, seconds, ok
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = ""  # the last error reading the manifest, logged once
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _post(self, route: str) -> None:
        request = urllib.request.Request(
            f"{self.url}{route}", data=b"{}", method="POST", headers=self.headers
        )
        with self._opener.open(request, timeout=LOAD_TIMEOUT) as reply:
            reply.read()

    def poll(self) -> None:
        """Look at the manifest once, unless the guard says not now; load what changed, unload
        what is gone."""
        with self.guard() as free:
            if free:
                self._poll()

    def _poll(self) -> None:
        try:
            current = model_states(self.read_manifest())
        except Exception as err:  # the bucket is unreachable for now: try again later
            if str(err) != self._failing:
                self.log(f"watch: cannot read the published manifest ({err}); serving on")
            self._failing = str(err)
            return
        self._failing = ""
        changed = [n for n, state in current.items() if self.seen.get(n) != state]
        changed.sort(key=lambda n: (current[n][2], n))  # parts first, ensembles last
        for name in changed:
            self.load(name, current[name])
        gone = sorted((n for n in self.seen if n not in current), key=lambda n: not self.seen[n][2])
        for name in gone:  # ensembles first
            with contextlib.suppress(urllib.error.URLError, OSError):
                self._post(f"/v2/repository/models/{name}/unload")
            self.log(f"watch: '{name}' unloaded (no longer published)")
            del self.seen[name]

    def load(self, name: str, state: tuple) -> None:
        started = time.monotonic()
        try:
            self._post(f"/v2/repository/models/{name}/load")
        except (urllib.error.URLError, OSError) as err:
            detail = err.read().decode(errors="replace") if hasattr(err, "read") else str(err)
            self.log(f"watch: '{name}' version {state[0]} did not load ({detail.strip()})")
            self.loads.append({"model": name, "version": state[0], "ok": False})
            return  # tried again at the next look
        if self.supervisor is not None:
            self.supervisor.forget(name)  # its stubs are new: counted afresh
        seconds = time.monotonic() - started
        self.seen[name] = state
        self.log(f"watch: '{name}' version {state[0]} loaded in {seconds:.1f} s")
        self.loads.append({"model": name, "version": state[0], "ok": True, "seconds": seconds})

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def start(self) -> RepositoryWatcher:
        self._thread = threading.Thread(target=self.run, name="repository-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None
