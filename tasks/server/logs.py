"""Reading a tritonserver log: its own reasons for failing, and the lines that mean it will not
become ready."""

from __future__ import annotations

import re
from pathlib import Path

# A Triton log line: `E1124 05:34:53.493753 3385 model_lifecycle.cc:642] "message"`.
LOG_LINE = re.compile(r"^(?P<level>[IWE])\d{4} [\d:.]+ +\d+ (?P<source>[^\]]+)\] (?P<msg>.*)$")
# Error lines Triton prints on every CPU-only start (the second for each ensemble): harmless.
LOG_NOISE = ("CudaDriverHelper has not been initialized", "unable to create stream for ")
# Error messages after which the server will not become ready: stop waiting at once.
FATAL_MESSAGES = ("failed to load '", "Poll failed for model directory", "failed to start ")


def failure_reasons(log_text: str) -> list[str]:
    """The server's own error lines from a tritonserver log, unescaped, without known noise."""
    reasons: list[str] = []
    for line in log_text.splitlines():
        match = LOG_LINE.match(line)
        if match and match["level"] == "E":
            reason = _unquote(match["msg"])
        elif line.startswith(("error: ", "[libprotobuf ERROR")):
            reason = line.strip()
        else:
            continue
        if reason and reason not in reasons and not any(n in reason for n in LOG_NOISE):
            reasons.append(reason)
    # Triton logs a failing instance twice; keep the "failed to load 'model'" line only.
    instance = "Failed to create instance: "
    return [
        r
        for r in reasons
        if instance not in r
        or not any(o != r and r.split(instance, 1)[1].strip() in o for o in reasons)
    ]


def _unquote(message: str) -> str:
    if len(message) >= 2 and message[0] == message[-1] == '"':
        message = message[1:-1].replace("\\n", "\n").replace('\\"', '"')
    return message.rstrip()


def indent(reason: str) -> str:
    first, *rest = reason.splitlines() or [""]
    return "\n".join([f"  {first}", *(f"    {line}".rstrip() for line in rest)])


def is_fatal(line: str) -> bool:
    match = LOG_LINE.match(line)
    return bool(match and match["level"] == "E" and any(f in match["msg"] for f in FATAL_MESSAGES))


class LogFollower:
    """Complete lines appended to a log since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode(errors="replace").splitlines()
