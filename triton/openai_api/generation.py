"""One generated choice: a request to the deployment's streaming model, read piece by piece.

Each choice is a request of its own (a prompt, `n` times), so that each can end on its own;
the model's in-flight batching puts them together. `stop` strings go to the model as its STOP
input where the model takes one; otherwise the text is cut here (`StopCut`, the fallback).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from api_errors import bad_value
from deployments import Deployment
from inference import Triton
from parsing import Sampling
from tokenizers.decoders import DecodeStream


@dataclass
class Piece:
    """New text of a choice; the last one of a choice carries its finish_reason."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0  # on the last piece: the choice's completion tokens


def check_limits(deployment: Deployment, prompt_tokens: int, sampling: Sampling, field: str):
    """What the model would refuse, refused here first with the OpenAI field's name (a
    refusal inside a stream carries no status)."""
    if prompt_tokens > deployment.max_seq:
        raise bad_value(
            field, f"{prompt_tokens} tokens; this deployment takes at most {deployment.max_seq}"
        )
    if deployment.task == "causallm" and prompt_tokens == 0:
        raise bad_value(field, "is empty: a causal LM needs at least one token")
    wanted = max_tokens(deployment, sampling)
    if wanted > deployment.max_tokens_limit:
        raise bad_value(
            "max_tokens", f"{wanted}: this deployment makes at most {deployment.max_tokens_limit}"
        )
    room = deployment.max_positions
    if room and prompt_tokens + wanted > room:
        raise bad_value(
            "max_tokens",
            f"{prompt_tokens} prompt tokens + {wanted} new ones exceed the model's "
            f"{room} positions",
        )


def max_tokens(deployment: Deployment, sampling: Sampling) -> int:
    return sampling.max_tokens or deployment.default_max_tokens


def model_inputs(
    deployment: Deployment, prompt: str, sampling: Sampling, choice: int
) -> dict[str, np.ndarray]:
    """The streaming model's inputs for one choice ([1, 1] each; STOP [1, k])."""
    inputs = {
        "TEXT": np.array([[prompt.encode("utf-8")]], dtype=object),
        "MAX_NEW_TOKENS": np.array([[max_tokens(deployment, sampling)]], dtype=np.int32),
    }
    if not sampling.greedy:
        temperature = 1.0 if sampling.temperature is None else sampling.temperature
        inputs["TEMPERATURE"] = np.array([[temperature]], dtype=np.float32)
        if sampling.top_p is not None:
            inputs["TOP_P"] = np.array([[sampling.top_p]], dtype=np.float32)
        if sampling.top_k is not None:
            inputs["TOP_K"] = np.array([[sampling.top_k]], dtype=np.int32)
        if sampling.seed is not None:  # choice i of n: seed + i, so the choices differ
            inputs["SEED"] = np.array([[sampling.seed + choice]], dtype=np.int64)
    if sampling.stop and "STOP" in deployment.inputs:
        inputs["STOP"] = np.array([[s.encode("utf-8") for s in sampling.stop]], dtype=object)
    return inputs


class StopCut:
    """FALLBACK for a model without a STOP input: find the stop strings in the text here.

    Text that could be the start of a stop string is held back until the next piece says
    whether it is; at a stop string the text ends there (the string itself is not returned)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.held = stops, ""
        self.keep = max(len(s) for s in stops) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to send now, whether a stop string was found)."""
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            return self.held[: min(found)], True
        cut = max(len(self.held) - self.keep, 0)
        ready, self.held = self.held[:cut], self.held[cut:]
        return ready, False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


async def choice(
    triton: Triton, deployment: Deployment, prompt: str, sampling: Sampling, index: int
) -> AsyncIterator[Piece]:
    """The pieces of one choice, the last with its finish_reason and token count.

    The text is made here from the token ids (tokenizers' DecodeStream), not from the model's
    text pieces: a character whose bytes span tokens comes whole, once it is complete, so
    the pieces add up to the decoded ids."""
    wanted = max_tokens(deployment, sampling)
    cut = StopCut(sampling.stop) if sampling.stop and "STOP" not in deployment.inputs else None
    decoder, ids, sent, finish = DecodeStream(skip_special_tokens=True), [], "", None
    stream = triton.stream(deployment.target, model_inputs(deployment, prompt, sampling, index))
    try:
        async for out in stream:
            token = int(out["OUTPUT_IDS"].reshape(-1)[0])
            if token < 0:  # this row was done already
                continue
            ids.append(token)
            text = decoder.step(deployment.tokenizer, token) or ""
            sent += text
            if cut is not None:
                text, stopped = cut.feed(text)
                if stopped:  # the rest of the stream is cancelled (aclose below)
                    finish = "stop"
                    if text:
                        yield Piece(index, text)
                    break
            if text:
                yield Piece(index, text)
    finally:
        await stream.aclose()
    if finish is None:
        whole = deployment.tokenizer.decode(ids, skip_special_tokens=True)
        rest = whole[len(sent) :] if whole.startswith(sent) else ""  # bytes left incomplete
        stopped = False
        if cut is not None:
            rest, stopped = cut.feed(rest)
            rest += "" if stopped else cut.flush()
        if rest:
            yield Piece(index, rest)
        ended = stopped or (ids and ids[-1] in deployment.eos_ids)
        finish = "length" if len(ids) >= wanted and not ended else "stop"
    yield Piece(index, "", finish, len(ids))
