"""Self-healing for a tritonserver's python-backend models: a watcher that reloads a model
whose stub process died, and keeps readiness truthful meanwhile.

Triton 2.51 does not notice a dead stub (the kernel's OOM killer, a segfault in ONNX Runtime
or `tokenizers`): the model and /v2/health/ready keep answering ready while every request
fails with "Stub process ... is not healthy", and nothing restarts it. This watcher polls the
stubs of one server (processes named triton_python_backend_stub in /proc, told apart by the
server's shm-region prefix when several servers share the machine). When a ready model has
fewer live stubs than it had, the model is unloaded at once, so that the server answers
not-ready (with --strict-readiness), then loaded again through the repository API, which
starts new stubs; models unloaded with it (an ensemble that calls it) are loaded again too.
Each recovery is logged with its cause and its duration.

A model whose config says `requests_outlive_execute` (the in-flight generation loop answers
through response senders after `execute` returned) cannot be recovered that way: Triton
2.51's python backend never fails the requests a dead stub held, and a reload (which succeeds)
does not either, so they would wait for their clients' deadlines. When such a model loses a
stub the supervisor asks its owner to restart the whole server (`restart`): every connection
drops, so each request in flight gets an error, never a hang. Without an owner that can (a
sidecar), it reloads the model as any other and the held requests wait. An owner that can
also says whether its server still runs (`alive`): a server that exits on its own (2.51's
python backend aborted once on a lock in a killed stub's shared memory) is restarted too.

The server must run with --model-control-mode=explicit --load-model=* --strict-readiness=true.
Imports only the standard library. It runs as a thread beside `doit serve`; in a container it
starts the server itself and watches it (signals are passed on, its exit code is the server's):

    python3 supervisor.py [--url http://127.0.0.1:8000] [--interval 0.5] \
        [--admin-key-file FILE] [--api-key-file FILE] -- tritonserver ...

There the server's admin protocols are closed behind the secret in --admin-key-file (a fresh
one no one else knows when none is given), and inference behind --api-key-file's key when that
file exists (access.py: the values never go on the command line).

or watches a server started otherwise (a sidecar sharing the pod's process namespace):

    python3 supervisor.py --url http://127.0.0.1:8000 [--shm-prefix PREFIX]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"
SERVER_ARGS = ("--model-control-mode=explicit", "--load-model=*", "--strict-readiness=true")
INTERVAL = 0.5  # seconds between looks at the stubs: the longest readiness may be stale
LOAD_TIMEOUT = 300.0
HELD = "requests_outlive_execute"  # the config parameter that marks such a model
RETRY_AFTER = 5.0  # seconds before a failed reload is tried again
# argv of a stub: model.py path, shm region, sizes, parent pid, library dir, ipc handle, name
_NAME_ARG = 8
_INSTANCE_SUFFIX = re.compile(r"_\d+_\d+$")  # <model>_<group>_<instance>, in some releases
_TRAILING_NUMBER = re.compile(r"^(.+)_\d+$")


def live_processes() -> dict[int, list[str]]:
    """Command lines of the live (not zombie) processes on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
            continue
        found[int(entry.name)] = [a.decode(errors="replace") for a in argv if a]
    return found


def strip_instance(name: str, models: set[str] | frozenset[str] = frozenset()) -> str:
    """The model a stub serves, from its name: `<model>_<group>_<instance>` in 2.51, or
    `<model>_<n>` for a config without instance_group. Given the models, the one that is the
    name less trailing `_<n>` parts (a model's own name may end in digits)."""
    candidate = name
    while candidate not in models and (cut := _TRAILING_NUMBER.match(candidate)):
        candidate = cut[1]
    return candidate if candidate in models else _INSTANCE_SUFFIX.sub("", name)


def stubs(shm_prefix: str = "") -> dict[int, str]:
    """pid -> name (model, or model instance) of each live stub of the server whose python
    backend shm regions start with `shm_prefix` ("" for every server's)."""
    return {
        pid: argv[_NAME_ARG] if len(argv) > _NAME_ARG else ""
        for pid, argv in live_processes().items()
        if argv
        and argv[0].endswith(STUB_NAME)
        and any(arg.startswith(shm_prefix) for arg in argv[1:])
    }


class Supervisor:
    """Watches one server's stubs and reloads the models that lost one (see the module)."""

    def __init__(
        self,
        url: str,
        shm_prefix: str = "",
        log=print,
        interval: float = INTERVAL,
        headers: dict[str, str] | None = None,
        restart=None,
        alive=None,
    ):
        self.restart = restart  # restart(reason): the owner restarts the server (see the module)
        self.alive = alive  # alive(): whether the owner's server process still runs
        self.url = url if "://" in url else f"http://{url}"
        self.headers = dict(headers or {})  # the admin secret's: model control is restricted
        self.shm_prefix, self.log, self.interval = shm_prefix, log, interval
        self.expected: dict[str, int] = {}  # ready model -> stubs it runs (0: not python)
        self.held: set[str] = set()  # ready models whose requests outlive execute
        self.retry_at: dict[str, float] = {}  # model whose reload failed -> when to try again
        self.with_it: dict[str, set[str]] = {}  # that model -> what was unloaded with it
        self.recoveries: list[dict] = []  # what was done: model, cause, seconds, ok
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # No proxy: an http_proxy in the environment must not answer for localhost.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- the server's repository API
    def _post(self, route: str, timeout: float = 5.0) -> bytes:
        request = urllib.request.Request(
            f"{self.url}{route}", data=b"{}", method="POST", headers=self.headers
        )
        with self._opener.open(request, timeout=timeout) as reply:
            return reply.read()

    def ready_models(self) -> set[str]:
        index = json.loads(self._post("/v2/repository/index") or b"[]")
        return {m["name"] for m in index if m.get("state") == "READY"}

    # -- one look
    def stub_count(self, model: str) -> int:
        """How many stubs a ready model runs: its instances on the python backend, else 0."""
        request = urllib.request.Request(f"{self.url}/v2/models/{model}/config")
        with self._opener.open(request, timeout=5.0) as reply:
            config = json.loads(reply.read())
        if config.get("backend") != "python":
            return 0
        self.held.discard(model)
        if config.get("parameters", {}).get(HELD, {}).get("string_value") == "true":
            self.held.add(model)
        groups = config.get("instance_group", [])
        # `count` instances per GPU listed (an unlisted GPU group: at least `count`)
        return sum(int(g.get("count", 1)) * max(1, len(g.get("gpus", []))) for g in groups) or 1

    def poll(self) -> None:
        """Look at the stubs once; reload each ready model that lost one."""
        try:
            ready = self.ready_models()
            for model in sorted(ready - set(self.expected)):  # newly ready: how many it runs
                self.expected[model] = self.stub_count(model)
        except (urllib.error.URLError, OSError, ValueError):
            return  # the server is starting or stopping: nothing to judge
        counts: dict[str, int] = {}
        for name in stubs(self.shm_prefix).values():
            if name not in ready:
                name = strip_instance(name, ready)
            counts[name] = counts.get(name, 0) + 1
        waiting = set(self.retry_at) | {m for found in self.with_it.values() for m in found}
        for model in list(self.expected):
            if model not in ready and model not in waiting:
                del self.expected[model]  # unloaded on purpose (or by a poll): not ours
        for model in sorted(ready | set(self.retry_at)):
            have, want = counts.get(model, 0), self.expected.get(model, 0)
            if have < want and time.monotonic() >= self.retry_at.get(model, 0.0):
                self.recover(model, f"{want - have} of its {want} stub process(es) died", ready)
                if self._stop.is_set():  # restarted, or stopping
                    return

    def recover(self, model: str, cause: str, ready: set[str]) -> bool:
        if model in self.held and self.restart is not None:
            self._restart_server(
                model,
                cause,
                f"'{model}': {cause}; the requests it held are answered by no one now: "
                "restarting the server (each request in flight gets an error)",
                f"'{model}': {cause}",
            )
            return True
        started = time.monotonic()
        self.log(f"supervisor: '{model}': {cause}; unloading it (not ready) and loading it again")
        # what must be ready again: what was ready (its ensemble is unloaded with it), and
        # what an earlier, failed attempt left unloaded
        wanted = (ready | self.with_it.get(model, set())) - {model}
        try:
            with contextlib.suppress(urllib.error.HTTPError):  # unloaded already: load it
                self._post(f"/v2/repository/models/{model}/unload", timeout=LOAD_TIMEOUT)
            self._post(f"/v2/repository/models/{model}/load", timeout=LOAD_TIMEOUT)
            for other in sorted(wanted - self.ready_models()):  # unloaded with it
                self._post(f"/v2/repository/models/{other}/load", timeout=LOAD_TIMEOUT)
        except (urllib.error.URLError, OSError) as err:
            detail = err.read().decode(errors="replace") if hasattr(err, "read") else str(err)
            self.retry_at[model] = time.monotonic() + RETRY_AFTER
            self.with_it[model] = wanted
            self.log(
                f"supervisor: '{model}' did not load again ({detail.strip()}); "
                f"trying again in {RETRY_AFTER:.0f} s"
            )
            self.recoveries.append({"model": model, "cause": cause, "ok": False})
            return False
        seconds = time.monotonic() - started
        self.retry_at.pop(model, None)
        self.with_it.pop(model, None)
        self.expected.pop(model, None)  # counted afresh at the next look
        self.log(f"supervisor: '{model}' is back in {seconds:.1f} s")
        self.recoveries.append({"model": model, "cause": cause, "ok": True, "seconds": seconds})
        return True

    def forget(self, model: str) -> None:
        """A model loaded anew on purpose (a rolling update): count its stubs afresh."""
        self.expected.pop(model, None)

    # -- as a thread
    def run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.restart is not None and self.alive is not None and not self.alive():
                self._restart_server(
                    None, "exited", "the server exited on its own: restarting it",
                    "the server exited on its own",
                )  # fmt: skip
                return
            self.poll()

    def _restart_server(self, model: str | None, cause: str, said: str, reason: str) -> None:
        """Have the owner restart the server (`restart(reason)`), logging `said`: this
        watcher's server is gone, so it looks no more."""
        self.log(f"supervisor: {said}")
        self.recoveries.append({"model": model, "cause": cause, "ok": True, "restart": True})
        self._stop.set()
        self.restart(reason)

    def start(self) -> Supervisor:
        self.poll()  # the stubs of the models as loaded
        self._thread = threading.Thread(target=self.run, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP URL")
    parser.add_argument("--shm-prefix", default="", help="the server's shm-region-prefix-name")
    parser.add_argument("--interval", type=float, default=INTERVAL, help="seconds between looks")
    parser.add_argument("--admin-key-file", help="the admin secret, e.g. a mounted Secret")
    parser.add_argument("--api-key-file", help="the clients' API key; a missing file: none")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    supervisor = Supervisor(args.url, args.shm_prefix, interval=args.interval)

    def log(message: str) -> None:
        print(time.strftime("%Y-%m-%dT%H:%M:%S ") + message, flush=True)

    supervisor.log = log
    if not command:
        if args.admin_key_file:
            supervisor.headers = access().http_headers(access().read_secret(args.admin_key_file))
        log(f"supervisor: watching the python-backend stubs of {supervisor.url}")
        with contextlib.suppress(KeyboardInterrupt):
            supervisor.run()
        return 0
    return run_server(supervisor, command, log, args.admin_key_file, args.api_key_file)


def access():
    """access.py beside this file: the admin secret and the API key (no package here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "llm_in_triton_access", Path(__file__).with_name("access.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def locked_launch(command: list[str], admin_key_file, api_key_file, workdir: Path):
    """The server's command and environment with its admin protocols closed behind the secret
    (and inference behind the API key), and the admin headers for our own calls."""
    guard = access()
    files = {"admin": Path(admin_key_file) if admin_key_file else workdir / "admin-key"}
    if not admin_key_file:
        guard.write_secret(files["admin"])  # no one can use model control from outside
    if api_key_file and Path(api_key_file).exists():
        files["api_key"] = Path(api_key_file)
        guard.read_secret(files["api_key"])  # refused now if unreadable or open to others
    shipped = Path(__file__).with_name("secret_args.so")  # built into the server image
    library = shipped if shipped.is_file() else guard.build_library(workdir)
    environment = {**os.environ, **guard.launch_environment(library, files)}
    command = [*command, *guard.server_arguments(api_key="api_key" in files)]
    return command, environment, guard.http_headers(admin=guard.read_secret(files["admin"]))


def run_server(
    supervisor: Supervisor, command: list[str], log, admin_key_file=None, api_key_file=None
) -> int:
    """Start the server locked (access.py), watch its stubs until it exits, pass SIGTERM and
    SIGINT on. When it has exited, what it leaves is removed: this run's secret and library,
    and the python backend's shm regions of its prefix (a server killed to restart leaves
    its own, 1 MiB and more a stub, in a /dev/shm that may outlive the container: a pod's
    Memory emptyDir)."""
    import shutil
    import tempfile

    missing = [a for a in SERVER_ARGS if a.split("=")[0] not in " ".join(command)]
    if missing:
        log(f"supervisor: adding {' '.join(missing)} (needed to reload a model)")
    given = re.search(r"shm-region-prefix-name=([^\s,]+)", " ".join(command))
    if given:
        supervisor.shm_prefix = given.group(1)
    else:  # a prefix of its own: its stubs and its regions are told apart from others'
        prefix = f"llm_in_triton_supervised_{os.getpid()}_{os.urandom(4).hex()}_"
        supervisor.shm_prefix = supervisor.shm_prefix or prefix
        missing.append(f"--backend-config=python,shm-region-prefix-name={supervisor.shm_prefix}")
    workdir = Path(tempfile.mkdtemp(prefix="llm-in-triton-"))  # 0700: only we read it
    try:
        return _serve(supervisor, [*command, *missing], log, admin_key_file, api_key_file, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for region in Path("/dev/shm").glob(f"{supervisor.shm_prefix}*"):
            region.unlink(missing_ok=True)


def _serve(supervisor: Supervisor, command, log, admin_key_file, api_key_file, workdir) -> int:
    import signal
    import subprocess

    command, environment, supervisor.headers = locked_launch(
        command, admin_key_file, api_key_file, workdir
    )
    log(
        "supervisor: model control, shared memory, trace and logging need the admin secret"
        + (f" in {admin_key_file}" if admin_key_file else " (none given: a fresh one, unshared)")
    )
    server = subprocess.Popen(command, env=environment)

    def restart(reason: str) -> None:  # the container exits; its orchestrator starts it again
        log(f"supervisor: ending {command[0]} so that it restarts: {reason}")
        server.kill()

    supervisor.restart = restart
    stopping = threading.Event()

    def forward(signum, _frame) -> None:
        stopping.set()  # models leave now on purpose: no more reloads
        server.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    log(f"supervisor: started {command[0]} (pid {server.pid}); watching {supervisor.url}")
    while server.poll() is None:
        if not stopping.is_set():
            supervisor.poll()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(supervisor.interval)
    log(f"supervisor: {command[0]} exited with {server.returncode}")
    return server.returncode


if __name__ == "__main__":
    sys.exit(main())
