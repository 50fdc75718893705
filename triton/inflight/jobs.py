"""A Triton request as the in-flight loop sees it: its rows, its responses, its client's
cancellation.

`<name>_generate` answers once, when every row is done: OUTPUT_TEXT (the pieces of each
row's text stream joined: the same text `<name>_stream` sends) and OUTPUT_IDS (padded with
-1). `<name>_stream` (decoupled) answers every few steps (scheduler.Pace: the
`stream_interval` variable) with each row's new text and tokens since its last response
(OUTPUT_IDS [rows, n] padded with -1; "" and -1 for a row that made none); the last carries
Triton's final flag (empty only when nothing is left to send). Its first response goes out at
the first token and its last as soon as every row is done, whatever the interval. Each
response is a round trip from the stub to the server: 16 streams answered at every step left a
core idle for a third of the loop's time (AMD EPYC, 2 cores), hence the interval, for many
streams on few cores.

A client that gives up (a cancelled gRPC stream, an HTTP client gone, a timeout) shows as
`is_cancelled()`: the loop asks each step, drops the request's rows and answers CANCELLED,
which nobody reads; `Outcomes` counts it (Triton's metrics endpoint), nothing is logged.
Imports numpy and Triton's utilities.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _error(message: str, code_name: str):
    code = getattr(pb_utils.TritonError, code_name, None)
    args = (message,) if code is None else (message, code)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(*args))


class Outcomes:
    """A counter per outcome of a request (finished, cancelled, rejected, failed) on Triton's
    metrics endpoint, as `llm_in_triton_generation_requests{model, outcome}`; nothing when
    this server has no metrics."""

    NAMES = ("finished", "cancelled", "rejected", "failed")

    def __init__(self, model: str) -> None:
        self.counts = dict.fromkeys(self.NAMES, 0)
        self.metrics, self.family = {}, None
        try:  # the family must outlive its metrics: kept here
            self.family = family = pb_utils.MetricFamily(
                name="llm_in_triton_generation_requests",
                description="generation requests by how they ended",
                kind=pb_utils.MetricFamily.COUNTER,
            )
            self.metrics = {
                n: family.Metric(labels={"model": model, "outcome": n}) for n in self.NAMES
            }
        except Exception:  # metrics disabled, or a python backend without custom metrics
            self.metrics = {}

    def count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        try:
            if outcome in self.metrics:
                self.metrics[outcome].increment(1)
        except Exception:  # a count is never worth a request
            self.metrics = {}


class Job:
    """One request in the loop (scheduler.py names what it asks of a job)."""

    def __init__(self, request, rows: list, streaming: bool, outcomes: Outcomes, pace) -> None:
        self.request, self.rows, self.streaming, self.outcomes = request, rows, streaming, outcomes
        self.pace = pace
        self.sender = request.get_response_sender()
        self.pieces = [[] for _ in rows]
        self.unsent = [[] for _ in rows]  # a stream's (token, piece) per row since its last
        self.steps_unsent = 0  # steps since the stream's last response
        self.started = False  # the stream's first response went out
        self.answered = False

    def cancelled(self) -> bool:
        try:
            return self.request.is_cancelled()
        except Exception:  # the request is gone with its client: nobody waits for it
            return True

    def stepped(self) -> None:
        for pieces, unsent, row in zip(self.pieces, self.unsent, self.rows):
            if row.piece:
                pieces.append(row.piece)
            if self.streaming and row.token != -1:
                unsent.append((row.token, row.piece))
        if not self.streaming:
            return
        self.steps_unsent += 1
        due = self.steps_unsent >= self.pace.steps() or not self.started
        if due and any(self.unsent) and not all(row.done for row in self.rows):
            self._send_unsent()  # a stream's last piece goes out with finish(), in one response

    def _send_unsent(self, flags: int = 0) -> None:
        """The stream's response: each row's text and tokens since the last one."""
        longest = max(len(unsent) for unsent in self.unsent)
        ids = np.full((len(self.rows), longest), -1, dtype=np.int64)
        for index, unsent in enumerate(self.unsent):
            ids[index, : len(unsent)] = [token for token, _ in unsent]
        texts = [["".join(piece for _, piece in unsent).encode("utf-8")] for unsent in self.unsent]
        self._send(self._response(texts, ids), flags)
        self.unsent = [[] for _ in self.rows]
        self.steps_unsent, self.started = 0, True

    def finish(self) -> None:
        self.outcomes.count("finished")  # before the answer: a client that reads it sees it
        if self.streaming:  # the last piece and the end in one response, a round trip less
            if any(self.unsent):
                self._send_unsent(FINAL)
            else:
                self._send(None, FINAL)
        else:
            longest = max(len(row.tokens) for row in self.rows)
            ids = np.full((len(self.rows), longest), -1, dtype=np.int64)
            for index, row in enumerate(self.rows):
                ids[index, : len(row.tokens)] = row.tokens
            texts = [["".join(pieces).encode("utf-8")] for pieces in self.pieces]
            self._send(self._response(texts, ids), FINAL)

    def cancel(self) -> None:
        self._end("cancelled", _error("the request was cancelled", "CANCELLED"))

    def reject(self, message: str) -> None:
        self._end("rejected", _error(message, "UNAVAILABLE"))

    def fail(self, message: str) -> None:
        self._end("failed", _error(message, "INTERNAL"))

    def _end(self, outcome: str, response) -> None:
        if not self.answered:  # counted once, before the answer
            self.outcomes.count(outcome)
            self._send(response, FINAL)

    @staticmethod
    def _response(texts, ids):
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("OUTPUT_TEXT", np.array(texts, dtype=object)),
                pb_utils.Tensor("OUTPUT_IDS", np.asarray(ids, dtype=np.int64)),
            ]
        )

    def _send(self, response, flags: int) -> None:
        if self.answered:
            return
        self.answered = flags == FINAL
        try:
            if response is None:
                self.sender.send(flags=flags)
            else:
                self.sender.send(response, flags=flags)
        except Exception:  # the client is gone (a cancelled stream): nobody to tell
            self.answered = True
