"""Triton python-backend model: question-answering logits to the answer text.

Inputs (one row per window of a context, see triton/tokenizer/model.py):
`window_start_logits`, `window_end_logits` [windows, seq], `offsets` [windows, seq, 2]
(character span in the context of each context token, -1 elsewhere), `window_item`
[windows, 1], and the texts `CONTEXT` [batch, 1].
Outputs per batch item: `ANSWER` (the best span's text over all its windows), `SCORE` (its
probability: softmax of start times softmax of end, over the context tokens of its window),
and `START_LOGITS` / `END_LOGITS` of the window the answer came from (of the item's first
window when its context has no span: an empty context gets an empty answer, score 0).
Parameter `max_answer_tokens` bounds a span. Imports only numpy and Triton's utilities.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.max_tokens = int(config["parameters"]["max_answer_tokens"]["string_value"])

    def _input(self, request, name):
        return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

    def best_span(self, start, end, offsets):
        """(score, start token, end token) of the best span of one window, or None."""
        context = offsets[:, 0] >= 0
        if not context.any():
            return None
        start_p = _softmax(np.where(context, start, -1e4).astype(np.float64))
        end_p = _softmax(np.where(context, end, -1e4).astype(np.float64))
        scores = np.outer(start_p, end_p)
        scores = np.tril(np.triu(scores), self.max_tokens - 1)  # start <= end < start + max
        scores[~context, :] = 0
        scores[:, ~context] = 0
        first, last = np.unravel_index(int(scores.argmax()), scores.shape)
        return float(scores[first, last]), int(first), int(last)

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        start = self._input(request, "window_start_logits")
        end = self._input(request, "window_end_logits")
        offsets = self._input(request, "offsets")
        items = self._input(request, "window_item").reshape(-1)
        contexts = [
            c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
            for c in self._input(request, "CONTEXT").reshape(-1)
        ]
        best = [None] * len(contexts)  # (score, window, first token, last token)
        first_window = {}  # an item without any span still returns its logits
        for window in range(len(items)):
            span = self.best_span(start[window], end[window], offsets[window])
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
        tensors = [
            pb_utils.Tensor("ANSWER", np.array([[a] for a in answers], dtype=object)),
            pb_utils.Tensor("SCORE", np.array([[s] for s in scores], dtype=np.float32)),
            pb_utils.Tensor("START_LOGITS", start_out),
            pb_utils.Tensor("END_LOGITS", end_out),
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)
