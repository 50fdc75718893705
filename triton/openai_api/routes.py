"""The HTTP routes (Starlette): OpenAI's /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings; text-embeddings-inference's /rerank; /health.

Every error is OpenAI's error object with its status (api_errors.py); an API key, when one is
set, is required as `Authorization: Bearer <key>` everywhere but /health.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Coroutine

import numpy as np
import parsing
from api_errors import APIError, model_not_found, wrong_task
from chat import TemplateError
from deployments import GENERATION, Deployment, Repository
from generation import Piece, check_limits, choice, whole
from inference import Triton
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

OWNER = "llm-in-triton"


def model_card(deployment: Deployment) -> dict:
    """A deployment as OpenAI's model object, with its task."""
    return {
        "id": deployment.name,
        "object": "model",
        "created": deployment.created,
        "owned_by": OWNER,
        "task": deployment.task,
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class JSON(JSONResponse):
    def render(self, content) -> bytes:
        return dumps(content)


class API:
    """The routes' shared state: the repository's deployments and the Triton channel."""

    def __init__(
        self, repository: Repository, triton: Triton, api_key: str | None, max_body: int
    ) -> None:
        self.repository, self.triton, self.api_key = repository, triton, api_key
        self.max_body = max_body

    async def body(self, request: Request) -> dict:
        """The JSON body, refused (413) beyond `max_body` bytes before it is all read."""
        declared = request.headers.get("content-length", "")
        too_large = APIError(
            413, f"the body is over {self.max_body} bytes", code="request_too_large"
        )
        if declared.isdigit() and int(declared) > self.max_body:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise too_large
            chunks.append(chunk)
        return parsing.read_body(b"".join(chunks))

    def deployment(self, model: str, tasks: tuple[str, ...], endpoint: str) -> Deployment:
        deployments = self.repository.deployments()
        found = deployments.get(model)
        if found is None:
            raise model_not_found(model, list(deployments))
        if found.task not in tasks:
            raise wrong_task(model, found.task, endpoint, " and ".join(tasks))
        return found

    # --- routes ---------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        data = [model_card(d) for d in self.repository.deployments().values()]
        return JSON({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        deployments = self.repository.deployments()
        name = request.path_params["model"]
        if name not in deployments:
            raise model_not_found(name, list(deployments))
        return JSON(model_card(deployments[name]))

    async def health(self, request: Request) -> Response:
        deployments = self.repository.deployments()
        models = sorted({m for d in deployments.values() for m in d.models})
        ready = dict(zip(models, await asyncio.gather(*map(self.triton.ready, models))))
        report = {
            d.name: {"task": d.task, "ready": all(ready[m] for m in d.models)}
            for d in deployments.values()
        }
        healthy = bool(report) and all(r["ready"] for r in report.values())
        body = {"status": "ok" if healthy else "unavailable", "deployments": report}
        return JSON(body, status_code=200 if healthy else 503)

    async def completions(self, request: Request) -> Response:
        generation = parsing.completion_request(await self.body(request))
        deployment = self.deployment(generation.model, GENERATION, "/v1/completions")
        prompts = list(generation.prompts)
        return await answered(request, self.generate(deployment, prompts, generation, chat=False))

    async def chat(self, request: Request) -> Response:
        generation = parsing.chat_request(await self.body(request))
        deployment = self.deployment(generation.model, ("causallm",), "/v1/chat/completions")
        if deployment.chat is None:
            why = f"its template does not compile ({deployment.chat_error})"
            raise APIError(
                400,
                f"The model '{deployment.name}' has no chat template"
                + (f": {why}" if deployment.chat_error else "")
                + "; send a prompt to /v1/completions instead",
                param="messages",
                code="no_chat_template",
            )
        try:
            prompt = deployment.chat.render(list(generation.messages))
        except TemplateError as err:
            refusal = f"the chat template refused the messages: {err}"
            raise APIError(400, refusal, param="messages") from None
        return await answered(request, self.generate(deployment, [prompt], generation, chat=True))

    async def embeddings(self, request: Request) -> Response:
        wanted = parsing.embedding_request(await self.body(request))
        deployment = self.deployment(wanted.model, ("encode",), "/v1/embeddings")
        vectors = await self.batched(deployment, {"TEXT": wanted.inputs}, "EMBEDDING")
        data = []
        for index, vector in enumerate(vectors):
            vector = np.asarray(vector, dtype="<f4")
            if wanted.base64:  # little-endian float32 bytes, as OpenAI's client decodes them
                value = base64.b64encode(vector.tobytes()).decode()
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(min(deployment.count(t), deployment.max_seq) for t in wanted.inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSON({"object": "list", "data": data, "model": deployment.name, "usage": usage})

    async def rerank(self, request: Request) -> Response:
        wanted = parsing.rerank_request(await self.body(request))
        if wanted.model is None:
            ranked = [d for d in self.repository.deployments().values() if d.task == "rerank"]
            if len(ranked) != 1:
                names = ", ".join(d.name for d in ranked) or "none"
                raise parsing.bad_value("model", f"name the rerank deployment (here: {names})")
            deployment = ranked[0]
        else:
            deployment = self.deployment(wanted.model, ("rerank",), "/rerank")
        queries = (wanted.query,) * len(wanted.texts)
        pairs = {"QUERY": queries, "DOCUMENT": wanted.texts}
        scores = await self.batched(deployment, pairs, "SCORE")
        answers = [{"index": i, "score": float(s.reshape(-1)[0])} for i, s in enumerate(scores)]
        if wanted.return_text:
            for answer in answers:
                answer["text"] = wanted.texts[answer["index"]]
        return JSON(sorted(answers, key=lambda a: -a["score"]))

    # --- helpers --------------------------------------------------------------------------

    async def batched(self, deployment: Deployment, texts: dict, output: str) -> list:
        """Rows of `output` for the texts (name -> one text per row), in calls of at most the
        deployment's batch."""
        rows, size = len(next(iter(texts.values()))), max(deployment.max_batch, 1)

        async def call(start: int):
            inputs = {
                name: np.array([[t.encode("utf-8")] for t in values[start : start + size]], object)
                for name, values in texts.items()
            }
            return (await self.triton.infer(deployment.target, inputs))[output]

        if rows <= size:  # one call, awaited here: no task to schedule
            return list(await call(0))
        parts = await asyncio.gather(*(call(s) for s in range(0, rows, size)))
        return [row for part in parts for row in part]

    async def generate(self, deployment: Deployment, prompts: list[str], generation, chat: bool):
        sampling = generation.sampling
        field = "messages" if chat else "prompt"
        counts = [deployment.count(p) for p in prompts]
        for count in counts:
            check_limits(deployment, count, sampling, field)
        answer = Answer(deployment.name, chat, sum(counts))
        # (prompt, choice index): OpenAI numbers the n choices of each prompt in turn
        rows = [(p, k * sampling.n + i) for k, p in enumerate(prompts) for i in range(sampling.n)]
        # whole answers in one request to the ensemble's steps, unless stop strings need the
        # stream (the ensemble takes no STOP: the stream model's, or the fallback's cut)
        if not sampling.stream and (not sampling.stop or "STOP" in deployment.inputs):
            finals = await whole(self.triton, deployment, rows, sampling)
            return JSON(await answer.whole(finals[0], iterate(finals[1:]), len(rows)))
        streams = [choice(self.triton, deployment, p, sampling, i) for p, i in rows]
        pieces = streams[0] if len(streams) == 1 else merged(streams)
        first = await anext(pieces)  # a refusal before any text is an error status
        if sampling.stream:
            return Events(
                answer.events(first, pieces, sampling.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return JSON(await answer.whole(first, pieces, len(rows)))


async def iterate(items: list) -> AsyncIterator:
    for item in items:
        yield item


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects: its body is read already, so the next message on
    the ASGI receive channel is http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answered(request: Request, answering: Coroutine) -> Response:
    """The response `answering` makes, unless the client disconnects first: then it is
    cancelled at once, and its calls to Triton with it, so their rows leave the in-flight
    batch after the step that finds them (Triton counts them cancelled). A streamed answer is
    watched here until its first piece; then Starlette's StreamingResponse stops it the same
    way (Events)."""
    work = asyncio.ensure_future(answering)
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if not work.cancelled() and work.done():
        return work.result()
    with contextlib.suppress(asyncio.CancelledError):
        await work  # its Triton calls cancelled
    return Response(status_code=499)  # nobody reads it: nginx's "client closed request"


async def merged(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """The pieces of several choices as they come, interleaved; all are closed at the end."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for piece in stream:
                await queue.put(piece)
        except BaseException as err:  # an error ends the answer, carried to the reader
            await queue.put(err)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Answer:
    """A chat or completion answer built from pieces: whole, or as Server-Sent Events."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def usage(self, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    async def whole(self, first: Piece, pieces: AsyncIterator[Piece], count: int) -> dict:
        texts, finish, tokens = [""] * count, [None] * count, 0
        piece = first
        while piece is not None:
            texts[piece.index] += piece.text
            if piece.finish_reason:
                finish[piece.index], tokens = piece.finish_reason, tokens + piece.tokens
            piece = await anext(pieces, None)
        choices = []
        for index, (text, reason) in enumerate(zip(texts, finish)):
            message = {"role": "assistant", "content": text}
            content = {"message": message} if self.chat else {"text": text}
            choices.append({"index": index, **content, "logprobs": None, "finish_reason": reason})
        return {**self.head(self.object), "choices": choices, "usage": self.usage(tokens)}

    def chunk(self, piece: Piece, include_usage: bool, role: bool = False) -> bytes:
        if self.chat:  # the last chunk of a choice: an empty delta and its finish_reason
            delta = {"role": "assistant"} if role else {}
            if piece.text or role:
                delta["content"] = piece.text
            content = {"delta": delta}
        else:
            content = {"text": piece.text}
        item = {"index": piece.index, **content, "logprobs": None}
        item["finish_reason"] = piece.finish_reason
        body = {**self.head(self.chunk_object), "choices": [item]}
        if include_usage:
            body["usage"] = None
        return b"data: " + dumps(body) + b"\n\n"

    async def events(self, first: Piece, pieces: AsyncIterator[Piece], include_usage: bool):
        """The SSE stream: each choice's first chunk carries the assistant role (chat), then
        its text pieces, then its finish_reason; then usage if asked, then [DONE]."""
        started, tokens = set(), 0
        piece = first
        try:
            while piece is not None:
                role = self.chat and piece.index not in started
                started.add(piece.index)
                tokens += piece.tokens
                yield self.chunk(piece, include_usage, role)
                # the loop's turn: a client gone is marked so before the next write (asyncio
                # warns "socket.send() raised exception" from a lost socket's 5th write on)
                await asyncio.sleep(0)
                piece = await anext(pieces, None)
        except APIError as err:  # mid-stream: the status is sent already; the error is an event
            yield b"data: " + dumps(err.body()) + b"\n\n"
        else:
            if include_usage:
                body = self.head(self.chunk_object)
                body.update(choices=[], usage=self.usage(tokens))
                yield b"data: " + dumps(body) + b"\n\n"
        finally:
            await pieces.aclose()
        yield b"data: [DONE]\n\n"


class Events(StreamingResponse):
    """Server-Sent Events whose source is closed as soon as the response ends, a client gone
    included: Starlette leaves a body iterator it stopped to the garbage collector, and its
    Triton streams would decode on until then."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # its Triton calls cancelled


class RequireKey:
    """ASGI middleware: with an API key set, every path but /health needs
    `Authorization: Bearer <key>`, else a 401 in OpenAI's error object."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                refusal = APIError(
                    401,
                    "Incorrect or missing API key: send Authorization: Bearer <key> (the key "
                    "the server was started with: $LLM_IN_TRITON_API_KEY or its _FILE)",
                    code="invalid_api_key",
                )
                await error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(api: API):
    async def api_error(request: Request, err: APIError) -> Response:
        return error_response(err)

    async def http_error(request: Request, err: HTTPException) -> Response:
        code = "not_found" if err.status_code == 404 else "invalid_request"
        return error_response(APIError(err.status_code, str(err.detail), code=code))

    async def server_error(request: Request, err: Exception) -> Response:
        return error_response(APIError(500, f"the API server failed: {type(err).__name__}: {err}"))

    routes = [
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
        Route("/rerank", api.rerank, methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            APIError: api_error,
            HTTPException: http_error,
            Exception: server_error,
        },
    )
    return RequireKey(app, api.api_key) if api.api_key else app
