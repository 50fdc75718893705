"""The in-flight loop: admission, batch membership, the profile's limits, the queue's bound.

One thread per model instance keeps decoding. At every step boundary:
- waiting requests that were cancelled or outlived `queue_timeout_ms` are answered (running
  ones found cancelled leave as soon as the step that found them returns, below);
- waiting requests join, first come first served, while the batch has room for all the
  rows of the next one (a request's rows join together; the one that does not fit waits,
  and so do the ones behind it);
- the joining rows are prefilled and their first token goes out at once; then one decoding
  step runs for every row (batch.py). Each row picks its token with its own parameters and
  its own random generator (seeded from SEED: a sample does not depend on its batch-mates),
  and rows that finished leave at once. Joining prompts of a causal LM prefill in groups of
  like lengths (`prefill_waste`, the tokenizer's `length_groups`): 16 at once padded to the
  longest took half again the time of the groups. On the slot decoder's mixed graph, joining
  rows are prefilled in the running rows' step instead, one call (batch.`joins_in_step`).

Whether a client gave up is a round trip to Triton per request (`is_cancelled()`): asked of
16 requests between steps, it took a fifth of the loop's time. So a second thread asks while
the decoding step computes (`CancelWatch`), and the loop reads the answers when the step
returns: a request cancelled during one step leaves after the next one, unanswered by it,
and no request is asked after its final response (Triton frees the request then). Waiting
requests are asked `max_rows` at a time, in turn: a long queue would otherwise make each step
wait for a round trip per waiting request (they cost nothing while they wait, and every one
is still asked within a few steps).

A row alone always fits the profile (the model refuses at the door a prompt and
MAX_NEW_TOKENS that do not), and a step's cache is never longer than its longest row's own
(batch.py), so `max_rows` (the profile's batch MAX) is the only limit a row waits for.
`submit` refuses at once when `max_waiting` requests already wait.

A job is what the loop needs of a request (model.py's, or any object): `rows`,
`cancelled()`, `stepped()` after each step it took part in, `finish()`, `cancel()`,
`reject(message)` and `fail(message)`. A stream's job answers every `Pace.steps()` steps.
Imports numpy, the sibling modules and the tokenizer's encoding module (loaded before it).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from llm_in_triton_decoding import RowParams, sample_token
from llm_in_triton_encoding import length_groups

TIMED_OUT = "Request timeout expired"  # Triton's words for a queue timeout
QUEUE_FULL = "Exceeds maximum queue size"  # and for a full queue: clients count rejections


@dataclass(eq=False)
class Row:
    """One prompt decoding: its tokens so far and this step's token and text piece."""

    prompt: np.ndarray
    params: RowParams
    text: object  # detokenizer.TextStream
    tokens: list = field(default_factory=list)
    done: bool = False
    token: int = -1  # this step's token (-1: none)
    piece: str = ""  # this step's text

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)

    def pick(self, logits: np.ndarray, eos: set) -> None:
        p = self.params
        token = sample_token(logits, p, self.rng) if p.sample else int(logits.argmax())
        self.tokens.append(token)
        self.token, self.piece = token, self.text.add(token)
        self.done = token in eos or len(self.tokens) >= p.max_new_tokens or self.text.stopped
        if self.done:
            self.piece += self.text.finish()

    def rest(self) -> None:
        """This step made nothing for this row."""
        self.token, self.piece = -1, ""


class Pace:
    """Steps per stream response: `interval`, or with 0 (`stream_interval=auto`) each step
    while the batch has at most `responses` rows, then enough steps for about `responses`
    responses a step (4 at 16 rows, for 4)."""

    def __init__(self, batch, interval: int, responses: int) -> None:
        self.batch, self.interval, self.responses = batch, interval, max(responses, 1)

    def steps(self) -> int:
        return self.interval or max(1, -(-len(self.batch) // self.responses))


class CancelWatch:
    """Which of some jobs were cancelled, asked in a thread of its own while the caller
    computes (see module doc): `start(jobs)`, then `found()` waits for the answers."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cancel-watch")
        self.asking = None

    def start(self, jobs: list) -> None:
        if self.asking is None and jobs:
            self.asking = self.pool.submit(lambda: {job for job in jobs if job.cancelled()})

    def found(self) -> set:
        asking, self.asking = self.asking, None
        return set() if asking is None else asking.result()

    def close(self) -> None:
        self.found()
        self.pool.shutdown()


class Scheduler:
    """Runs the loop in a thread of its own (see module doc)."""

    def __init__(
        self,
        batch,
        eos_ids,
        max_rows: int,
        max_waiting: int = 0,
        queue_timeout_s: float = 0.0,
        prefill_waste: float = 0.0,
        on_error=None,
    ) -> None:
        self.batch, self.eos = batch, set(eos_ids)
        self.prefill_waste = prefill_waste  # 0: every joining row in one prefill
        self.max_rows, self.max_waiting = max_rows, max_waiting
        self.queue_timeout_s = queue_timeout_s
        self.on_error = on_error or (lambda err: None)
        self.waiting: deque = deque()
        self.running: list = []
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="inflight", daemon=True)
        self.watch = CancelWatch()
        self.gone: set = set()  # jobs found cancelled, still to answer
        self.turn = 0  # where the next turn of asking the waiting jobs starts
        self.steps = 0
        self.seconds = {"decoding": 0.0, "loop": 0.0}  # where the loop's time goes

    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def submit(self, job) -> bool:
        """Queue a job; False when `max_waiting` jobs already wait (reject it at once)."""
        with self.condition:
            if self.stopping or (self.max_waiting and len(self.waiting) >= self.max_waiting):
                return False
            job.queued_at = time.monotonic()
            self.waiting.append(job)
            self.condition.notify()
        return True

    def stop(self, message: str = "the model is unloading") -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()
        self.watch.close()
        for job in [*self.running, *self.waiting]:
            job.fail(message)
        self.running, self.waiting = [], deque()

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopping and not self.waiting and not self.running:
                    self.condition.wait()
                if self.stopping:
                    return
            try:
                self.iterate()
            except Exception as err:  # a failed step fails its rows' requests, not the loop
                self.on_error(err)
                for job in self.running:
                    job.fail(f"generation failed: {err}")
                self.running = []
                self.batch.clear()

    def _admit(self) -> list:
        """Waiting jobs that join now; cancelled and timed-out ones are answered."""
        room = self.max_rows - len(self.batch)
        joining, now = [], time.monotonic()
        with self.condition:
            kept: deque = deque()
            for job in self.waiting:
                if job in self.gone:
                    job.cancel()
                elif self.queue_timeout_s and now - job.queued_at > self.queue_timeout_s:
                    job.reject(TIMED_OUT)
                elif not kept and len(job.rows) <= room:
                    joining.append(job)
                    room -= len(job.rows)
                else:
                    kept.append(job)  # first come, first served: nobody passes a waiting job
            self.waiting = kept
        return joining

    def iterate(self) -> None:
        """One step boundary and one step (see module doc)."""
        began = time.perf_counter()
        try:
            self._iterate()
        finally:
            self.seconds["loop"] += time.perf_counter() - began

    def _iterate(self) -> None:
        joining = self._admit()  # answers the waiting jobs found cancelled
        self.gone = set()
        self.running += joining
        if joining and self.batch.joins_in_step():  # one call: the step and the prefill
            rows = [row for job in joining for row in job.rows]
            self._timed_pick(functools.partial(self.batch.step, rows), self.running, watch=True)
            return
        for group in self._prefills(joining):  # first tokens before the others' step
            rows = [row for job in group for row in job.rows]
            self._timed_pick(functools.partial(self.batch.join, rows), group)
        if len(self.batch):
            self._timed_pick(self.batch.step, self.running, watch=True)

    def _timed_pick(self, run, jobs: list, watch: bool = False) -> None:
        """Run a prefill or a step (while the watch asks who gave up, for a step), let each
        row pick its token, answer `jobs` (the ones that took part), and drop the rows and
        jobs that are done or cancelled."""
        if watch:
            with self.condition:
                self.watch.start([*self.running, *self._waiting_turn()])
        try:
            began = time.perf_counter()
            advanced = run()
            self.seconds["decoding"] += time.perf_counter() - began
        finally:  # nobody is answered while the watch may ask about them
            self.gone |= self.watch.found()
        dropped = self._drop_cancelled()
        for row, logits in advanced:
            if row not in dropped:
                row.pick(logits, self.eos)
        self.steps += 1
        finished = []
        for job in jobs:
            if job in self.gone:
                continue
            job.stepped()
            if all(row.done for row in job.rows):
                job.finish()
                finished.append(job)
        done = {row for job in jobs for row in job.rows if row.done}
        self.batch.remove(done)
        for row in done:
            row.rest()
        self.running = [job for job in self.running if job not in finished]

    def _prefills(self, joining: list) -> list[list]:
        """The joining jobs in groups that prefill together: of like prompt lengths (a job's
        rows together), or all in one with `prefill_waste` 0."""
        if not self.prefill_waste or len(joining) < 2:
            return [joining] if joining else []
        lengths = [max(len(row.prompt) for row in job.rows) for job in joining]
        sizes = [len(job.rows) for job in joining]
        groups = length_groups(lengths, sizes, self.prefill_waste, self.max_rows)
        return [[joining[i] for i in sorted(group)] for group in groups]

    def _waiting_turn(self) -> list:
        """The waiting jobs asked at this step: all of them, or `max_rows` in turn."""
        waiting = list(self.waiting)
        if len(waiting) <= self.max_rows:
            return waiting
        start = self.turn % len(waiting)
        self.turn = start + self.max_rows
        return (waiting[start:] + waiting[:start])[: self.max_rows]

    def _drop_cancelled(self) -> set:
        """Running jobs found cancelled leave and are answered; returns the rows that left
        (waiting jobs found cancelled are answered by `_admit`)."""
        gone = [job for job in self.running if job in self.gone]
        rows = {row for job in gone for row in job.rows}
        for job in gone:
            job.cancel()
        if gone:
            self.batch.remove(rows)
            self.running = [job for job in self.running if job not in gone]
        return rows
