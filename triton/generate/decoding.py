"""Decoding with a KV cache over the exported files: greedy and sampling.

Runs inside Triton (loaded by triton/generate/model.py) and in the build's generation parity.
Parity proves `Generator` (a batch decoded to its end) equal to Hugging Face `generate()`; the
server's in-flight loop (triton/inflight/) runs the same steps through `run_step` and the
same sampling, and its tests prove each row equal to `Generator` alone.
Imports only numpy, the shared helpers (runtime.py, loaded before this file) and onnxruntime,
for the steps that run on it.

Two kinds of model, as the build exports them (unmerged decoders):
- causal: `decoder_model` (the prompt, no past) then `decoder_with_past_model`;
- seq2seq: `encoder_model`, `decoder_model` (first step), `decoder_with_past_model`.
Each part is a *step*: a callable from named arrays to named arrays, with `.inputs` naming
what it takes. Only `logits` must be a numpy array: the loop passes every other output (the
KV cache, the encoder's states) back unread, so a step may keep them in its own form.
Steps run on ONNX Runtime here (`onnxruntime_steps`), or are other Triton models called
through BLS (model.py), or TensorRT engines (the build's parity).
Cache tensors are matched by name: output `present.X` feeds input `past_key_values.X`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from llm_in_triton_runtime import session_options, softmax

PAST, PRESENT = "past_key_values.", "present."
PROMPT = "prompt_"  # the mixed slot graph's joining rows' cache (tasks/slot_decoder.py)
LOGITS = "logits"  # the one output the loop reads; the others it only passes on


class ParameterError(ValueError):
    """A request's generation parameters are invalid; the message names the fix."""


@dataclass(frozen=True)
class RowParams:
    """How to decode one prompt. Sampling is on when temperature, top_k or top_p is given."""

    max_new_tokens: int
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    seed: int | None = None

    def validate(self, limit: int) -> RowParams:
        if not 1 <= self.max_new_tokens <= limit:
            raise ParameterError(
                f"MAX_NEW_TOKENS={self.max_new_tokens}: must be from 1 to {limit} (a deployment "
                "built with seq=MIN,OPT,MAX allows up to MAX new tokens)"
            )
        if self.sample and not self.temperature > 0:
            raise ParameterError(
                f"TEMPERATURE={self.temperature}: must be > 0 when sampling; omit TEMPERATURE, "
                "TOP_K and TOP_P for greedy decoding"
            )
        if self.seed is not None and self.seed < 0:
            raise ParameterError(f"SEED={self.seed}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ParameterError(f"TOP_P={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ParameterError(f"TOP_K={self.top_k}: must be >= 0 (0 turns it off)")
        return self


def sample_token(logits: np.ndarray, params: RowParams, rng: np.random.Generator) -> int:
    scores = filtered_scores(logits, params)
    return int(rng.choice(scores.size, p=softmax(scores)))


def filtered_scores(logits: np.ndarray, params: RowParams) -> np.ndarray:
    """Temperature, then top-k, then top-p (nucleus), as Hugging Face orders them; the
    tokens filtered out get -inf."""
    scores = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scores.size:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if params.top_p < 1.0:
        order = np.argsort(-scores)
        probabilities = softmax(scores[order])
        keep = np.cumsum(probabilities) - probabilities < params.top_p  # at least the best token
        scores[order[~keep]] = -np.inf
    return scores


class OnnxRuntimeStep:
    """One exported file on ONNX Runtime (CPU): named arrays in, named arrays out."""

    def __init__(
        self, path: Path, threads: int = 0, spinning: int = 1, taking_turns: bool = False
    ) -> None:
        import onnxruntime as ort

        options = session_options(threads, spinning, taking_turns)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, feed: dict) -> dict:
        return dict(zip(self.outputs, self.session.run(self.outputs, feed)))


class OnnxRuntimeSlotStep:
    """tasks/slot_decoder.py's graphs on ONNX Runtime, their cache in slots it owns: one buffer
    per cache tensor, [max_rows, kv heads, buffer, head size], that each call reads and writes
    in place (past and present bound to the same memory). `__call__(ids, mask, start)` runs
    rows start.. start+len(ids) of the buffers; `joined(tokens, mask, ids, prompt_mask)` (the
    mixed graph, when given) steps rows 0.. len(tokens) and prefills the prompts into the slots
    after them, in one call; `move(place, row)` copies a slot."""

    def __init__(
        self,
        path: Path,
        max_rows: int,
        buffer: int,
        threads: int = 0,
        spinning: int = 1,
        mixed: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        options = session_options(threads, spinning, taking_turns=True)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if mixed and not Path(mixed).is_file():
            raise FileNotFoundError(
                f"{mixed} is missing: this repository predates the slot decoder's mixed graph; "
                "rebuild it (doit task=causallm decoder=slots ...)"
            )
        self.mixed = mixed and ort.InferenceSession(
            str(mixed), options, providers=["CPUExecutionProvider"]
        )
        self.buffers = {}
        for tensor in self.session.get_inputs():
            if tensor.name.startswith(PAST):
                _, heads, _, size = tensor.shape
                shape = (max_rows, heads, buffer, size)
                self.buffers[tensor.name[len(PAST) :]] = np.zeros(shape, np.float32)

    def _run(self, session, inputs: dict, slots: dict) -> np.ndarray:
        """`inputs` and, for each prefix, its cache: the slots start.. start+count."""
        binding = session.io_binding()
        binding.bind_output(LOGITS, "cpu")  # first: get_outputs()[0]
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        for prefix, (start, count) in slots.items():
            for name, buffer in self.buffers.items():
                rows = buffer[start : start + count]  # contiguous: the leading axis
                shape, address = list(rows.shape), rows.ctypes.data
                binding.bind_input(prefix + PAST + name, "cpu", 0, np.float32, shape, address)
                binding.bind_output(prefix + PRESENT + name, "cpu", 0, np.float32, shape, address)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[:, -1, :]

    def __call__(self, ids: np.ndarray, mask: np.ndarray, start: int) -> np.ndarray:
        inputs = {"input_ids": ids, "attention_mask": mask}
        return self._run(self.session, inputs, {"": (start, len(ids))})

    def joined(
        self, tokens: np.ndarray, mask: np.ndarray, ids: np.ndarray, prompt_mask: np.ndarray
    ) -> np.ndarray:
        """One step of rows 0.. len(tokens) (their last token, `mask` as `__call__` takes it)
        and the prompts `ids` (right-padded, `prompt_mask`) prefilled into the next slots: the
        linear layers read each real token once, packed; the logits of every row, stepping
        rows first."""
        rows, flat = len(tokens), prompt_mask.ravel()
        order = np.flatnonzero(flat)  # each prompt token's cell, row by row
        inputs = {
            "input_ids": np.concatenate([tokens, ids.ravel()[order]]),
            "attention_mask": mask,
            "prompt_mask": prompt_mask,
            "prompt_cells": rows + np.cumsum(flat).reshape(prompt_mask.shape) - 1,
            "prompt_order": order,
            "last": np.concatenate([np.arange(rows), rows + np.cumsum(prompt_mask.sum(1)) - 1]),
        }
        slots = {"": (0, rows), PROMPT: (rows, len(ids))}
        return self._run(self.mixed, inputs, slots)

    def move(self, place: int, row: int) -> None:
        for buffer in self.buffers.values():
            buffer[place] = buffer[row]


def onnxruntime_steps(files: dict[str, Path], threads: int = 0, spinning: int = 1) -> dict:
    """A model's parts, which the loop runs one after another (sessions taking turns)."""
    return {
        part: OnnxRuntimeStep(path, threads, spinning, taking_turns=True)
        for part, path in files.items()
    }


def run_step(step, feed: dict, cache: dict) -> np.ndarray:
    """Run one part: feed it the cache it takes, keep the cache it gives; the last position's
    logits, as numpy [rows, vocab] (a GPU step's are copied over)."""
    full = {**feed, **{n: cache[n[len(PAST) :]] for n in step.inputs if n.startswith(PAST)}}
    values = step({n: full[n] for n in step.inputs})
    for name, value in values.items():
        if name.startswith(PRESENT):
            cache[name[len(PRESENT) :]] = value
    logits = values[LOGITS][:, -1, :]
    return logits if isinstance(logits, np.ndarray) else logits.get()


def cache_need(kind: str, width: int, new_tokens: int) -> int:
    """The longest cache decoding feeds a batch: prompts padded to `width` tokens, the longest
    row asking `new_tokens`. Causal: the last token reads the prompt and the new tokens before
    it (width + new - 2); seq2seq: the new tokens before it (new - 1; the prompt is in the
    encoder's cache, of the batch's width)."""
    return width + new_tokens - 2 if kind == "causal" else new_tokens - 1


def cache_batches(kind: str, lengths, params: list[RowParams], limit: int) -> list[list[int]]:
    """Rows grouped into batches whose shared cache stays within `limit` (0: no limit).

    The loop grows one cache for a whole batch, max(new tokens) steps over the padded width,
    so a long prompt asking few tokens and a short one asking many need more together than
    either alone: a TensorRT profile holding each row would refuse the batch. A row alone
    always fits (the server checks prompt + new tokens against the positions the profile was
    built for), so no row is refused; rows join the first batch they fit."""
    if not limit:
        return [list(range(len(params)))]
    rows = sorted(range(len(params)), key=lambda r: (-int(lengths[r]), -params[r].max_new_tokens))
    batches: list[tuple[list[int], int, int]] = []  # rows, width, new tokens
    for row in rows:
        width, new = int(lengths[row]), params[row].max_new_tokens
        for index, (members, w, n) in enumerate(batches):
            if cache_need(kind, max(w, width), max(n, new)) <= limit:
                batches[index] = ([*members, row], max(w, width), max(n, new))
                break
        else:
            batches.append(([row], width, new))
    return [sorted(members) for members, _, _ in batches]


def _widened(on_step, rows: list[int], total: int, pad_id: int):
    """`on_step` of a sub-batch, as the whole batch's: the other rows made nothing."""

    def every(tokens, produced):
        all_tokens = np.full(total, pad_id, dtype=np.int64)
        all_made = np.zeros(total, dtype=bool)
        all_tokens[rows], all_made[rows] = tokens, produced
        on_step(all_tokens, all_made)

    return every


class Generator:
    """Decodes batches of prompts with the steps (parts) of one model (see module doc)."""

    def __init__(
        self,
        kind: str,
        steps: dict,
        eos_ids: list[int],
        pad_id: int,
        start_id: int | None = None,
        cache_limit: int = 0,
    ) -> None:
        self.kind, self.eos, self.pad_id, self.start_id = kind, set(eos_ids), pad_id, start_id
        self.steps, self.cache_limit = steps, cache_limit

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        params: list[RowParams],
        on_step=None,
    ) -> list[list[int]]:
        """New token ids per row (EOS included when reached). Prompts are right-padded.

        Rows whose shared cache would outgrow `cache_limit` decode in separate batches
        (`cache_batches`). `on_step(tokens, produced)`, if given, sees each step's tokens and
        which rows made one, over all rows (for streaming)."""
        input_ids = input_ids.astype(np.int64)
        attention_mask = attention_mask.astype(np.int64)
        lengths = attention_mask.sum(axis=1)
        batches = cache_batches(self.kind, lengths, params, self.cache_limit)
        if len(batches) == 1:  # the batch's own width: the cache it needs is what was checked
            width = max(int(lengths.max()), 1)
            return self._generate(input_ids[:, :width], attention_mask[:, :width], params, on_step)
        produced: list[list[int]] = [[] for _ in params]
        for rows in batches:
            width = max(int(lengths[rows].max()), 1)
            every = None
            if on_step is not None:
                every = _widened(on_step, rows, len(params), self.pad_id)
            made = self._generate(
                input_ids[rows, :width], attention_mask[rows, :width], [params[r] for r in rows],
                every,
            )  # fmt: skip
            for row, tokens in zip(rows, made):
                produced[row] = tokens
        return produced

    def _generate(self, input_ids, attention_mask, params, on_step) -> list[list[int]]:
        if self.kind == "causal":
            step = self._causal_steps(input_ids, attention_mask)
        else:
            step = self._seq2seq_steps(input_ids, attention_mask)
        rngs = [np.random.default_rng(p.seed) for p in params]
        produced: list[list[int]] = [[] for _ in params]
        active = np.ones(len(params), dtype=bool)
        logits = next(step)
        for _ in range(max(p.max_new_tokens for p in params)):
            tokens = np.full(len(params), self.pad_id, dtype=np.int64)
            produced_now = active.copy()
            for row, p in enumerate(params):
                if not active[row]:
                    continue
                scores = logits[row]
                token = sample_token(scores, p, rngs[row]) if p.sample else int(scores.argmax())
                tokens[row] = token
                produced[row].append(token)
                if token in self.eos or len(produced[row]) >= p.max_new_tokens:
                    active[row] = False
            if on_step is not None:
                on_step(tokens, produced_now)
            if not active.any():
                break
            logits = step.send((tokens, active))
        step.close()
        return produced

    def _run(self, part: str, feed: dict, cache: dict) -> np.ndarray:
        return run_step(self.steps[part], feed, cache)

    def _causal_steps(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Left-pad the prompts (as HF generate does), then one token per step."""
        width = input_ids.shape[1]
        lengths = attention_mask.sum(axis=1)
        ids = np.full_like(input_ids, self.pad_id)
        mask = np.zeros_like(attention_mask)
        for row, length in enumerate(lengths):
            ids[row, width - length :] = input_ids[row, :length]
            mask[row, width - length :] = 1
        positions = np.where(mask == 1, mask.cumsum(axis=1) - 1, 1)
        cache: dict = {}
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        tokens, active = yield self._run("decoder_model", feed, cache)
        while True:
            # A finished row stays where it is: no new position, its new token masked out, so
            # it never runs past the model's positions while the others go on.
            step = active.astype(np.int64)[:, None]
            mask = np.concatenate([mask, step], axis=1)
            positions = positions[:, -1:] + step
            feed = {"input_ids": tokens[:, None], "attention_mask": mask, "position_ids": positions}
            tokens, active = yield self._run("decoder_with_past_model", feed, cache)

    def _seq2seq_steps(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        batch = len(input_ids)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        hidden = self.steps["encoder_model"](feed)["last_hidden_state"]
        cache: dict = {}
        feed = {
            "encoder_attention_mask": attention_mask,
            "encoder_hidden_states": hidden,
            "input_ids": np.full((batch, 1), self.start_id, np.int64),
        }
        tokens, _ = yield self._run("decoder_model", feed, cache)
        while True:  # relative positions: a finished row cannot run out of them
            feed = {"encoder_attention_mask": attention_mask, "input_ids": tokens[:, None]}
            tokens, _ = yield self._run("decoder_with_past_model", feed, cache)
