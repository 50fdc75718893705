"""`doit bench`'s system `openai`: the same requests as the `triton` system, through the
OpenAI-compatible API (triton/openai_api/) in front of the same server, at each concurrency.

Generation asks `/v1/completions` for the bench's new tokens (greedy, as the triton system);
encode asks `/v1/embeddings` (base64, what OpenAI's client asks for); rerank asks `/rerank`
for the one pair. Tasks without an OpenAI endpoint have no `openai` system.
Standard library only at import (`doit list` imports the bench stage).
"""

from __future__ import annotations

import json

from tasks.settings import Settings

ROUTES = {"causallm": "/v1/completions", "t5": "/v1/completions"}
ROUTES |= {"encode": "/v1/embeddings", "rerank": "/rerank"}
TURN_SECONDS = 0.5  # the API and gRPC beside it take turns this long


def body(settings: Settings, text: tuple[str, ...], new_tokens: int) -> dict:
    task = settings.task.name
    if task == "encode":
        return {"model": settings.name, "input": text[0], "encoding_format": "base64"}
    if task == "rerank":
        return {"model": settings.name, "query": text[0], "texts": [text[1]]}
    return {"model": settings.name, "prompt": text[0], "max_tokens": new_tokens}


def work(settings: Settings, url: str, new_tokens: int):
    """(setup, work) for the bench's closed loop: one keep-alive connection per worker."""
    import http.client

    host, port = url.rsplit(":", 1)
    route = ROUTES[settings.task.name]

    def setup(state: dict) -> None:
        state["connection"] = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=300)
        state["close"] = state["connection"].close

    def request(state: dict, text: tuple[str, ...]) -> bool:
        connection = state["connection"]
        payload = json.dumps(body(settings, text, new_tokens))
        connection.request("POST", route, payload, {"Content-Type": "application/json"})
        reply = connection.getresponse()
        answer = json.loads(reply.read())
        return reply.status == 200 and bool(answer)

    return setup, request


def measure(
    settings: Settings, grpc_url: str, texts: list, new_tokens: int, grpc_work, server=None
) -> list:
    """The `openai` system's points: an API started on `openai_port` for the bench (or the
    one `doit serve` runs there), against the server at `grpc_url` (the bench's own `server`,
    if it started one: behind its nginx, if nginx fronts it); [] where there is none.

    Each point carries `grpc_beside`: Triton over gRPC directly (`grpc_work`: setup, work) at
    the same concurrency and texts, taken in turns with the API (half a second each; at
    concurrency 1 request by request, and `added_p50_ms` the median of what the API added to
    each text). The API's cost is the difference of the two, which on a shared machine only
    points taken side by side can tell: the load moves more between two sweeps than the API
    costs."""
    from types import SimpleNamespace

    from tasks import storage
    from tasks.loadgen import WARMUP_SECONDS, alternating, in_step
    from tasks.server import openai_api
    from tasks.server.network import client_host

    port, endpoints = settings.endpoints.openai_port, settings.endpoints
    if settings.task.name not in ROUTES or not port or settings.storage.location is not None:
        return []
    repository = storage.served_repository(settings.storage.repo)[0]
    url = f"{client_host(endpoints.host)}:{port}"  # where clients reach it: nginx, if in front
    api = None
    if not openai_api.answers(url):
        triton = server or SimpleNamespace(grpc_url=grpc_url)
        api = openai_api.for_server(triton, repository, endpoints).start()
    try:
        systems = {"grpc": grpc_work, "openai": work(settings, url, new_tokens)}
        points, seconds = [], settings.bench.seconds
        slices = max(1, round(seconds / TURN_SECONDS))
        for level in settings.bench.concurrency:
            alternating(systems, level, min(WARMUP_SECONDS, seconds), texts, 1)  # warm up
            if level == 1:
                found = in_step(systems, seconds, texts)
            else:
                found = alternating(systems, level, seconds, texts, slices)
            beside, point = found["grpc"], {"protocol": "http", **found["openai"]}
            kept = ("throughput", "p50_ms", "p99_ms", "errors")
            point["grpc_beside"] = {k: beside[k] for k in kept}
            added = f"; added {point['added_p50_ms']} ms (p50)" if level == 1 else ""
            print(
                f"bench: openai concurrency {level}: {point['throughput']:.1f} req/s, p50 "
                f"{point['p50_ms']} ms, {point['errors']} errors; gRPC beside it "
                f"{beside['throughput']:.1f} req/s, p50 {beside['p50_ms']} ms{added}",
                flush=True,
            )
            points.append(point)
        return points
    finally:
        if api is not None:
            api.stop()
