"""Question-answering logits to the answer text (a post-processing `answer.py`).

In (one row per window of a context, see triton/tokenizer/encoding.py):
`window_start_logits`, `window_end_logits` [windows, seq], `offsets` [windows, seq, 2]
(character span in the context of each context token, -1 elsewhere), `window_item`
[windows, 1], the texts `CONTEXT` [batch, 1], and `seq_length` [windows, 1] (the request's
own padded length: windows padded further to share a batch are cut back to it).
Out per batch item: `ANSWER` (the best span's text over all its windows), `SCORE` (its
probability: softmax of start times softmax of end, over the context tokens of its window),
and `START_LOGITS` / `END_LOGITS` of the window the answer came from (of the item's first
window when its context has no span: an empty context gets an empty answer, score 0).
Parameter `max_answer_tokens` bounds a span. Imports only numpy and the shared helpers
(runtime.py, loaded before this file).
"""

from pathlib import Path

import numpy as np
from llm_in_triton_runtime import softmax


def best_span(start, end, offsets, max_tokens: int):
    """(score, start token, end token) of the best span of one window, or None."""
    context = offsets[:, 0] >= 0
    if not context.any():
        return None
    start_p = softmax(np.where(context, start, -1e4))
    end_p = softmax(np.where(context, end, -1e4))
    scores = np.outer(start_p, end_p)
    scores = np.tril(np.triu(scores), max_tokens - 1)  # start <= end < start + max
    scores[~context, :] = 0
    scores[:, ~context] = 0
    first, last = np.unravel_index(int(scores.argmax()), scores.shape)
    return float(scores[first, last]), int(first), int(last)


def make(version_dir: Path, params):
    max_tokens = params.read("max_answer_tokens", int)

    def answer(tensors: dict) -> dict:
        length = int(tensors["seq_length"].reshape(-1)[0])
        start = tensors["window_start_logits"][:, :length]
        end = tensors["window_end_logits"][:, :length]
        offsets, items = tensors["offsets"][:, :length], tensors["window_item"].reshape(-1)
        contexts = [
            c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
            for c in tensors["CONTEXT"].reshape(-1)
        ]
        best = [None] * len(contexts)  # (score, window, first token, last token)
        first_window = {}  # an item without any span still returns its logits
        for window in range(len(items)):
            span = best_span(start[window], end[window], offsets[window], max_tokens)
            item = int(items[window])
            first_window.setdefault(item, window)
            if span is not None and (best[item] is None or span[0] > best[item][0]):
                best[item] = (span[0], window, span[1], span[2])
        answers, scores = [], []
        start_out = np.zeros((len(contexts), start.shape[1]), dtype=np.float32)
        end_out = np.zeros_like(start_out)
        for item, found in enumerate(best):
            if found is None:
                answers.append(b"")
                scores.append(0.0)
                if item in first_window:
                    start_out[item] = start[first_window[item]]
                    end_out[item] = end[first_window[item]]
                continue
            score, window, first, last = found
            text = contexts[item][int(offsets[window, first, 0]) : int(offsets[window, last, 1])]
            answers.append(text.encode("utf-8"))
            scores.append(score)
            start_out[item], end_out[item] = start[window], end[window]
        return {
            "ANSWER": np.array([[a] for a in answers], dtype=object),
            "SCORE": np.array([[s] for s in scores], dtype=np.float32),
            "START_LOGITS": start_out,
            "END_LOGITS": end_out,
        }

    return answer
