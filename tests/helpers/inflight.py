"""A request as the in-flight loop (triton/inflight/scheduler.py) takes one, outside Triton."""

from __future__ import annotations


class LocalJob:
    """A request as the in-flight loop takes it, outside Triton: its rows and its outcome."""

    def __init__(self, rows: list) -> None:
        self.rows, self.outcome, self.steps = rows, None, 0

    def cancelled(self) -> bool:
        return False

    def stepped(self) -> None:
        self.steps += 1

    def finish(self) -> None:
        self.outcome = "finished"

    def cancel(self) -> None:
        self.outcome = "cancelled"

    def reject(self, message: str) -> None:
        self.outcome = message

    def fail(self, message: str) -> None:
        self.outcome = message
