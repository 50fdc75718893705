"""Stage `serve`: serve models/ on Triton (tasks/server/: embedded, or server=docker) until
Ctrl-C, after answering one sample request. Once the server is up it lets other doit runs
build in the tree, and loads what they change in models/ while it serves. With
repo=s3://BUCKET/PREFIX the embedded server reads the bucket `doit publish` wrote instead, and
with poll=SECONDS it loads what a later publish changes (tasks/server/watch.py)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys

from tasks import artifacts, paths
from tasks.errors import fails_cleanly
from tasks.settings import Settings, current

SAMPLE_TEXT = "Triton serves transformers."
BUILD_POLL = 1.0  # seconds between looks at models/ for what a build changed


def example_request(settings: Settings, url: str) -> str:
    """A curl command a user can paste: one text per ensemble input (and the API key, read
    from where the user keeps it, never written out)."""
    import json
    import os

    from tasks.server import access

    body = {
        "inputs": [
            {
                "name": name,
                "shape": [1, 1],
                "datatype": "BYTES",
                "data": [SAMPLE_TEXT],
            }
            for name in settings.task.text_inputs
        ]
    }
    key = ""
    if os.environ.get(access().API_KEY_VARIABLE):
        key = f'-H "{access().API_KEY_HEADER}: ${access().API_KEY_VARIABLE}" '
    elif os.environ.get(access().API_KEY_FILE_VARIABLE):
        key = f'-H "{access().API_KEY_HEADER}: $(cat ${access().API_KEY_FILE_VARIABLE})" '
    route = f"http://{url}/v2/models/{settings.name}/infer"
    return f"curl -s -X POST {key}{route} -d '{json.dumps(body)}'"


def access_note(server) -> str:
    """Where the admin secret lives and where it opens model control, for an operator."""
    from tasks.server import ReplicaSet, access

    if not hasattr(server, "admin_headers") and not isinstance(server, ReplicaSet):
        return ""  # server=docker: its compose file says
    members = server.members if isinstance(server, ReplicaSet) else [server]
    where = ", ".join(f"http://{m.http_url} (gRPC {m.grpc_url})" for m in members)
    secret = paths.ADMIN_KEY.relative_to(paths.ROOT)
    note = (
        f"serve: model control, shared memory, trace and logging need the admin secret in "
        f"{secret} (readable by its owner only), sent as header '{access().ADMIN_HEADER}' "
        f"(gRPC: '{access().GRPC_HEADER_PREFIX}{access().ADMIN_HEADER}'), at {where}, e.g.\n"
        f'  curl -s -X POST -H "{access().ADMIN_HEADER}: $(cat {secret})" '
        f"http://{members[0].http_url}/v2/repository/index"
    )
    if members[0].api_key:
        note += (
            f"\nserve: inference needs the API key (from ${access().API_KEY_VARIABLE} or "
            f"${access().API_KEY_FILE_VARIABLE}), sent as header '{access().API_KEY_HEADER}'"
        )
    return note


def sample_request(settings: Settings, url: str) -> None:
    """Answer one request with the real client, so a user sees the deployment work."""
    client = [
        sys.executable,
        str(paths.CLIENT),
        "-u",
        url,
        "-m",
        settings.name,
        *(arg for _ in settings.task.text_inputs for arg in ("-t", SAMPLE_TEXT)),
    ]
    print(f"serve: sample request: {' '.join(client[1:])}", flush=True)
    try:  # no stdin: the client must not wait for texts on a pipe doit was given
        subprocess.run(client, check=False, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print("serve: the sample request took over 120 s; the server keeps running", flush=True)


def serve_foreground(settings: Settings) -> None:
    """Serve models/ until Ctrl-C or SIGTERM, after answering one sample request."""
    import threading

    from tasks import storage
    from tasks.plan import check_served_plans
    from tasks.server import folder_manifest, make_server

    location = settings.storage.location
    repository, _ = storage.served_repository(settings.storage.repo)
    if location is None:  # a plan built for another GPU: our error, not TensorRT's
        check_served_plans(repository)
        baseline = folder_manifest(repository)  # what the server is about to load
    else:
        baseline = storage.check_published(location)
    server = make_server(settings.endpoints, repo=settings.storage.repo)
    stop, ready = threading.Event(), threading.Event()
    watchers, api = [], None

    def on_signal(*_) -> None:
        stop.set()
        if not ready.is_set():  # still loading: interrupt the wait, start() cleans up
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        ready.set()
        if note := access_note(server):
            print(note, flush=True)
        if location is None and settings.endpoints.server == "embedded":
            watchers = watch_builds(settings, server, baseline, repository)
        elif settings.storage.poll:
            watchers = watch(settings, server, baseline)
        sample_request(settings, server.http_url)
        api = start_openai_api(settings, server)
        print(
            f"serve: try it:\n  {example_request(settings, server.http_url)}\n"
            f"  python triton/send_request.py --protocol grpc -u {server.grpc_url} "
            f"-m {settings.name} -t 'your text' --statistics\n"
            "serve: Ctrl-C stops the server",
            flush=True,
        )
        while not stop.wait(0.5):
            if not server.running:
                raise server.failure()
    except KeyboardInterrupt:
        print("serve: interrupted while the server was starting", flush=True)
    finally:
        ready.set()
        for watcher in watchers:
            watcher.stop()
        if api is not None:
            api.stop()
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_openai_api(settings: Settings, server):
    """The OpenAI-compatible API on `openai_port` (0: none), in front of `server` (behind
    nginx where nginx fronts the server), started again if it exits
    (tasks/server/openai_api.py); None when there is none."""
    from tasks import storage
    from tasks.server import openai_api
    from tasks.server.network import client_host

    endpoints = settings.endpoints
    if not endpoints.openai_port:
        return None
    if settings.storage.location is not None:
        print("serve: no OpenAI API for a bucket (it reads a repository folder)", flush=True)
        return None
    repository, _ = storage.served_repository(settings.storage.repo)
    api = openai_api.for_server(server, repository, endpoints).start()
    url = f"{client_host(endpoints.host)}:{endpoints.openai_port}"  # nginx's, if in front
    print(
        f"serve: OpenAI-compatible API on http://{url}/v1 (log {api.log_path}):\n"
        f"  curl -s http://{url}/v1/models",
        flush=True,
    )
    return api


def watch(settings: Settings, server, baseline: dict) -> list:
    """Start loading what `doit publish` changes in the bucket, every poll= seconds."""
    from tasks import storage

    location = settings.storage.location
    print(f"serve: polling {location} every {settings.storage.poll:g} s", flush=True)
    reader = storage.manifest_reader(location)
    return start_watchers(server, reader, settings.storage.poll, baseline)


def watch_builds(settings: Settings, server, baseline: dict, repository) -> list:
    """Let other doit runs build in this tree, and load what they change in the served folder
    (a new deployment, a rebuilt one) while no build runs, under the tree's lock."""
    from tasks.server import folder_manifest

    artifacts.release_lock(paths.TREE_LOCK)
    print(
        f"serve: other doit runs may build here now; what they change in {repository.name}/ "
        f"is loaded within {BUILD_POLL:g} s of their end, without a restart",
        flush=True,
    )

    @contextlib.contextmanager
    def no_build_running():
        handle = artifacts.try_lock(paths.TREE_LOCK)
        try:
            yield handle is not None
        finally:
            if handle is not None:
                handle.close()

    def read() -> dict:
        return folder_manifest(repository)

    return start_watchers(server, read, BUILD_POLL, baseline, guard=no_build_running)


def start_watchers(server, read_manifest, interval: float, baseline: dict, guard=None) -> list:
    """One RepositoryWatcher per server (each replica of replicas=N), started."""
    from tasks.server import ReplicaSet, RepositoryWatcher

    if isinstance(server, ReplicaSet):
        watched = [(m, server.supervisor_of(i)) for i, m in enumerate(server.members)]
    else:
        watched = [(server, server if hasattr(server, "forget") else None)]  # docker: none
    return [
        RepositoryWatcher(
            member.http_url,
            read_manifest,
            interval,
            baseline,
            log=lambda m: print(m, flush=True),
            supervisor=supervisor,
            headers=member.admin_headers,
            guard=guard,
        ).start()
        for member, supervisor in watched
    ]


def task_serve():
    """Serve models/ (or repo=s3://...) on tritonserver; builds stale parts of models/ first."""
    settings = current()
    return {
        "actions": [(fails_cleanly(serve_foreground), [settings])],
        # a bucket is served as published: nothing here to build
        "task_dep": ["repo"] if settings.storage.location is None else [],
        "uptodate": [False],
    }
