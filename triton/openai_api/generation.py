"""Generated choices: whole, from the deployment's ensemble steps (`whole`: one response per
request, every choice a row), or piece by piece from its streaming model (`choice`: a request
per choice, so that each can end on its own; in-flight batching puts them together).

`stop` strings go to the model as its STOP input where the model takes one, and the text is
cut before them here (`StopCut`). FALLBACK for a model without STOP: the stream is cancelled
when a stop string shows up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from api_errors import bad_value
from deployments import Deployment, Step
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
    deployment: Deployment, rows: list[tuple[str, int]], sampling: Sampling, takes: frozenset
) -> dict[str, np.ndarray]:
    """A generation request's inputs for `rows` of (prompt, choice index): [rows, 1] each,
    STOP [rows, k] where the model `takes` it. Choice i samples with seed + i."""

    def column(values, dtype) -> np.ndarray:
        return np.array([[v] for v in values], dtype=dtype)

    inputs = {
        "TEXT": column([prompt.encode("utf-8") for prompt, _ in rows], object),
        "MAX_NEW_TOKENS": column([max_tokens(deployment, sampling)] * len(rows), np.int32),
    }
    if not sampling.greedy:
        temperature = 1.0 if sampling.temperature is None else sampling.temperature
        inputs["TEMPERATURE"] = column([temperature] * len(rows), np.float32)
        if sampling.top_p is not None:
            inputs["TOP_P"] = column([sampling.top_p] * len(rows), np.float32)
        if sampling.top_k is not None:
            inputs["TOP_K"] = column([sampling.top_k] * len(rows), np.int32)
        if sampling.seed is not None:
            inputs["SEED"] = column([sampling.seed + index for _, index in rows], np.int64)
    if sampling.stop and "STOP" in takes:
        stops = [s.encode("utf-8") for s in sampling.stop]
        inputs["STOP"] = np.array([stops] * len(rows), dtype=object)
    return inputs


def finish_reason(deployment: Deployment, ids: list[int], wanted: int, stopped: bool) -> str:
    ended = stopped or (ids and ids[-1] in deployment.eos_ids)
    return "length" if len(ids) >= wanted and not ended else "stop"


async def whole(
    triton: Triton, deployment: Deployment, rows: list[tuple[str, int]], sampling: Sampling
) -> list[Piece]:
    """Every row's whole answer (one response per request, at most its batch of rows each), as
    final Pieces: from the ensemble's steps, called here one after the other (`ensemble`), so
    that a request cancelled by its client is cancelled in the generate model itself."""
    size, wanted = max(deployment.max_batch, 1), max_tokens(deployment, sampling)

    async def call(part):
        inputs = model_inputs(deployment, part, sampling, deployment.inputs)
        return (await ensemble(triton, deployment.steps, inputs, ("OUTPUT_IDS",)))["OUTPUT_IDS"]

    found = await asyncio.gather(*(call(rows[s : s + size]) for s in range(0, len(rows), size)))
    pieces = []
    for (_, index), row in zip(rows, (row for part in found for row in part)):
        ids = [int(i) for i in row if i >= 0]
        text = deployment.tokenizer.decode(ids, skip_special_tokens=True)
        text, stopped = StopCut(sampling.stop).feed(text) if sampling.stop else (text, False)
        finish = finish_reason(deployment, ids, wanted, stopped)
        pieces.append(Piece(index, text, finish, len(ids)))
    return pieces


async def ensemble(
    triton: Triton, steps: tuple[Step, ...], tensors: dict[str, np.ndarray], wanted: tuple
) -> dict[str, np.ndarray]:
    """What Triton's ensemble scheduler does, step by step: each step's model gets the tensors
    its input map names (optional ones left out when absent) and adds its mapped outputs, only
    those a later step or `wanted` needs. Triton 2.51 does not pass a cancelled ensemble
    request on to its steps; a cancelled call to a step is cancelled in that model."""
    tensors = dict(tensors)
    for number, step in enumerate(steps):
        later = {source for s in steps[number + 1 :] for source in s.inputs.values()}
        asked = {name: to for name, to in step.outputs.items() if to in later or to in wanted}
        inputs = {
            name: tensors[source] for name, source in step.inputs.items() if source in tensors
        }
        out = await triton.infer(step.model, inputs, tuple(asked))
        tensors.update({asked[name]: value for name, value in out.items() if name in asked})
    return {name: tensors[name] for name in wanted}


class StopCut:
    """The text ends before the first stop string (OpenAI returns no part of it), whether the
    model stopped there itself (STOP) or is stopped here (the fallback).

    Text that could be the start of a stop string is held back until the next piece says
    whether it is."""

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

    The text is made here from the token ids (tokenizers' DecodeStream; the model's text
    pieces are not asked for): a character whose bytes span tokens comes whole, once it is
    complete, so the pieces add up to the decoded ids."""
    wanted = max_tokens(deployment, sampling)
    takes = deployment.stream_inputs
    cut = StopCut(sampling.stop) if sampling.stop else None
    decoder, ids, sent, finish = DecodeStream(skip_special_tokens=True), [], "", None
    inputs = model_inputs(deployment, [(prompt, index)], sampling, takes)
    stream = triton.stream(deployment.stream, inputs, wanted=("OUTPUT_IDS",))
    try:
        async for out in stream:
            made = [int(t) for t in out["OUTPUT_IDS"].reshape(-1) if t >= 0]  # -1: padding
            if not made:  # this row was done already
                continue
            ids += made
            text = "".join(decoder.step(deployment.tokenizer, t) or "" for t in made)
            sent += text
            if cut is not None:
                text, stopped = cut.feed(text)
                if stopped:  # FALLBACK (no STOP input): the stream is cancelled (aclose)
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
        finish = finish_reason(deployment, ids, wanted, stopped)
    yield Piece(index, "", finish, len(ids))
