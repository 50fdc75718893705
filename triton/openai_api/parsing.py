"""Request bodies read into typed requests, or a 400 naming the field.

Each endpoint knows three kinds of field: those it reads, those it accepts and ignores because
they change nothing in the answer (`user`, `metadata`...), and those it cannot honour, which
are refused unless they carry their neutral value (`logprobs: false`, `tools: []`,
`presence_penalty: 0`: what some clients always send). Any other field is refused too: never
silent ignoring.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from api_errors import APIError, bad_value, unsupported

MAX_N = 16  # choices per prompt
MAX_STOPS = 4  # as OpenAI


def _neutral(*values):
    return lambda value: value in values


# Fields a generation endpoint cannot honour, accepted only with the value that asks nothing.
NEUTRAL = {
    "logprobs": _neutral(None, False),
    "top_logprobs": _neutral(None, 0),
    "presence_penalty": _neutral(None, 0),
    "frequency_penalty": _neutral(None, 0),
    "repetition_penalty": _neutral(None, 1),
    "logit_bias": _neutral(None, {}),
    "tools": _neutral(None, []),
    "tool_choice": _neutral(None, "none"),
    "functions": _neutral(None, []),
    "function_call": _neutral(None, "none"),
    "response_format": _neutral(None, {"type": "text"}),
    "modalities": _neutral(None, ["text"]),
    "best_of": _neutral(None, 1),
    "echo": _neutral(None, False),
    "suffix": _neutral(None, ""),
    "prediction": _neutral(None),
    "audio": _neutral(None),
    "reasoning_effort": _neutral(None),
    "web_search_options": _neutral(None),
}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier"}
SAMPLING = {
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
}
ROLES = ("system", "developer", "user", "assistant", "tool")


def read_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def check_fields(body: dict, reads: set[str], neutral: dict | None = None) -> None:
    """Refuse fields this endpoint neither reads nor ignores, and unneutral unhonoured ones."""
    neutral = NEUTRAL if neutral is None else neutral
    for key, value in body.items():
        if key in reads or key in IGNORED:
            continue
        if key in neutral:
            if not neutral[key](value):
                raise unsupported(key)
            continue
        raise unsupported(key, "not a field this endpoint knows")


def _text(body: dict, key: str, *, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise bad_value(key, "must be a non-empty string")
    return value


def _number(body: dict, key: str, low: float, high: float, *, whole: bool = False):
    """body[key] if given: a number (a whole one with `whole`) from low to high."""
    value = body.get(key)
    if value is None:
        return None
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        raise bad_value(key, f"must be {kind}, got {json.dumps(value)}")
    if not (math.isfinite(value) and low <= value <= high):
        raise bad_value(key, f"must be {kind} from {low:g} to {high:g}, got {value}")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_value(key, "must be true or false")
    return value


def texts(value, key: str) -> tuple[str, ...]:
    """A string or a non-empty list of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise bad_value(key, "must be a string or a non-empty list of strings")
    for item in items:
        if not isinstance(item, str):
            what = "token ids are not supported; send text" if isinstance(item, int) else ""
            raise bad_value(key, what or "must be a string or a list of strings")
    return tuple(items)


@dataclass(frozen=True)
class Sampling:
    """How to generate: what chat and completions share."""

    max_tokens: int | None  # None: the deployment's default
    temperature: float | None  # None or 0, without top_p or top_k: greedy
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool

    @property
    def greedy(self) -> bool:
        if self.temperature == 0:
            return True
        return self.temperature is None and self.top_p is None and self.top_k is None


def sampling(body: dict) -> Sampling:
    limit = 1 << 31
    tokens = _number(body, "max_completion_tokens", 1, limit, whole=True)
    if tokens is None:
        tokens = _number(body, "max_tokens", 1, limit, whole=True)
    stop = body.get("stop")
    stops = () if stop is None else texts(stop, "stop")
    if len(stops) > MAX_STOPS or not all(stops):
        raise bad_value("stop", f"up to {MAX_STOPS} non-empty strings")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_value("stream_options", "must be an object")
    options = options or {}
    if options and not stream:
        raise bad_value("stream_options", "only with stream: true")
    if set(options) - {"include_usage"}:
        raise unsupported(f"stream_options.{sorted(set(options) - {'include_usage'})[0]}")
    top_k = _number(body, "top_k", -1, limit, whole=True)
    return Sampling(
        max_tokens=tokens,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 1e-9, 1),
        top_k=None if top_k in (None, -1, 0) else top_k,  # -1 and 0: no top-k filter
        seed=_number(body, "seed", 0, (1 << 63) - 1, whole=True),
        stop=stops,
        n=_number(body, "n", 1, MAX_N, whole=True) or 1,
        stream=stream,
        include_usage=_flag(options, "include_usage"),
    )


@dataclass(frozen=True)
class Generation:
    """A chat or completion request: the prompts (completions) or the messages (chat)."""

    model: str
    sampling: Sampling
    prompts: tuple[str, ...] = ()
    messages: tuple[dict, ...] = ()


def completion_request(body: dict) -> Generation:
    check_fields(body, SAMPLING | {"prompt"})
    model = _text(body, "model")
    if "prompt" not in body:
        raise bad_value("prompt", "is required: a string or a list of strings")
    return Generation(model, sampling(body), prompts=texts(body["prompt"], "prompt"))


def _content(message: dict, where: str) -> str | list | None:
    """A message's content: a string, or a list of text parts joined into one (what the
    templates of text models read); images and audio are refused."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_value(f"{where}.content", "must be a string or a list of text parts")
    parts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise unsupported(f"{where}.content[{index}]", "only text parts; this is a text model")
        if not isinstance(part.get("text"), str):
            raise bad_value(f"{where}.content[{index}].text", "must be a string")
        parts.append(part["text"])
    return "".join(parts)


def _message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_value(where, "must be an object with role and content")
    role = message.get("role")
    if role not in ROLES:
        raise bad_value(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    for key in message:
        if key not in ("role", "content", "name", "tool_call_id"):
            if key in ("tool_calls", "function_call", "refusal", "audio") and not message[key]:
                continue
            raise unsupported(f"{where}.{key}")
    content = _content(message, where)
    if content is None:
        raise bad_value(f"{where}.content", "is required")
    found = {"role": role, "content": content}
    if message.get("name") is not None:
        found["name"] = message["name"]
    return found


def chat_request(body: dict) -> Generation:
    check_fields(body, SAMPLING | {"messages"})
    model = _text(body, "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_value("messages", "must be a non-empty list of messages")
    found = tuple(_message(m, i) for i, m in enumerate(messages))
    return Generation(model, sampling(body), messages=found)


@dataclass(frozen=True)
class Embedding:
    model: str
    inputs: tuple[str, ...]
    base64: bool


def embedding_request(body: dict) -> Embedding:
    check_fields(body, {"model", "input", "encoding_format", "dimensions"}, neutral={})
    model = _text(body, "model")
    if "input" not in body:
        raise bad_value("input", "is required: a string or a list of strings")
    inputs = texts(body["input"], "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_value("encoding_format", f"must be float or base64, got {encoding!r}")
    if body.get("dimensions") is not None:
        raise unsupported("dimensions", "the vectors have the model's own size")
    return Embedding(model, inputs, encoding == "base64")


@dataclass(frozen=True)
class Rerank:
    """text-embeddings-inference's /rerank: scores of texts for a query."""

    model: str | None  # None: the one rerank deployment
    query: str
    texts: tuple[str, ...]
    return_text: bool


def rerank_request(body: dict) -> Rerank:
    reads = {"model", "query", "texts", "return_text", "truncate", "truncation_direction"}
    check_fields(body, reads, neutral={"raw_scores": _neutral(None, False)})
    if body.get("truncation_direction") not in (None, "Right", "right"):
        raise unsupported("truncation_direction", "a too-long text loses its end (Right)")
    if not isinstance(body.get("truncate", True), (bool, type(None))):
        raise bad_value("truncate", "must be true or false")
    return Rerank(
        model=_text(body, "model", required=False),
        query=_text(body, "query"),
        texts=texts(body.get("texts"), "texts"),
        return_text=_flag(body, "return_text"),
    )
