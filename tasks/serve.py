"""Stage `serve`: serve models/ on Triton (tasks/server/: embedded, or server=docker) until
Ctrl-C, after answering one sample request."""

from __future__ import annotations

import signal
import subprocess
import sys

from tasks import paths
from tasks.errors import fails_cleanly
from tasks.settings import Settings, current

SAMPLE_TEXT = "Triton serves transformers."


def example_request(settings: Settings, url: str) -> str:
    """A curl command a user can paste: one text per ensemble input."""
    import json

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
    return f"curl -s -X POST http://{url}/v2/models/{settings.name}/infer -d '{json.dumps(body)}'"


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

    from tasks.plan import check_served_plans
    from tasks.server import make_server

    check_served_plans(paths.MODELS)  # a plan built for another GPU: our error, not TensorRT's
    server = make_server(settings.endpoints)
    stop, ready = threading.Event(), threading.Event()

    def on_signal(*_) -> None:
        stop.set()
        if not ready.is_set():  # still loading: interrupt the wait, start() cleans up
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        ready.set()
        sample_request(settings, server.http_url)
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
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def task_serve():
    """Serve models/ on tritonserver (embedded, or server=docker); builds stale parts first."""
    settings = current()
    return {
        "actions": [(fails_cleanly(serve_foreground), [settings])],
        "task_dep": ["repo"],
        "uptodate": [False],
    }
