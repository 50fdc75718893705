"""Stage `soak`: minutes of mixed traffic against every deployment in models/, a stub killed
in the middle, and the server's memory watched for leaks.

    doit soak soak_minutes=10

Workers send requests to every deployed ensemble in turn, over gRPC and HTTP, at the levels
of `concurrency=` in turn (a segment each). One request in 20 is bad on purpose (an empty text,
bytes that are not UTF-8, a NUL, a batch over the max): it must get a client error. Halfway,
one python-backend stub is killed with SIGKILL: the supervisor must bring its model back, and
the errors meanwhile (and a client's until its first answer after, up to `CATCH_UP_SECONDS`)
are counted as the recovery's. Any other error is unexpected and fails the run.

Resident memory of the server and of every model's stubs is read at the end of the warm-up
(the first quarter), at the middle (before the kill) and at the end; a growth of more than
`LEAK_LIMIT` after warm-up fails the run (the killed model's stubs start afresh at the
middle, so they are compared from there). Latency drift compares each level's p50 in the
first and the last segment of that level. The report goes to model_zoo/soak/report.json and
report.md, beside the bench's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks import artifacts, catalog, paths
from tasks.errors import BuildError, fails_cleanly
from tasks.settings import Settings, current

LEAK_LIMIT = 0.10  # resident memory may grow this much after warm-up
BAD_EVERY = 20  # one request in 20 is bad on purpose (5%)
GENERATION_TOKENS = 4
MAX_SEGMENT = 20.0  # seconds at one concurrency level
# After a restart a gRPC client's channel reconnects on its own backoff (1 s, then 1.6x each
# try): a client still failing this long after the server is back, without an answer
# between, is counted unexpected; until then its errors are the recovery's.
CATCH_UP_SECONDS = 10.0
ERROR_PAUSE = 0.05  # seconds a worker waits after an error


@dataclass
class Deployment:
    """An ensemble in models/ and what a request to it looks like."""

    name: str
    text_inputs: list[str]
    generation: bool
    max_batch: int

    def good(self, index: int) -> list[tuple[str, str, list]]:
        """(input, datatype, rows) of the index-th good request."""
        if self.generation:
            texts = [catalog.GENERATION_PROMPTS[index % len(catalog.GENERATION_PROMPTS)]]
        elif len(self.text_inputs) == 2:
            question = catalog.SAMPLE_QUESTIONS[index % len(catalog.SAMPLE_QUESTIONS)]
            texts = [question, catalog.SAMPLE_TEXTS[index % len(catalog.SAMPLE_TEXTS)]]
        else:
            texts = [catalog.SAMPLE_TEXTS[index % len(catalog.SAMPLE_TEXTS)]]
        found = [(n, "BYTES", [t.encode()]) for n, t in zip(self.text_inputs, texts)]
        if self.generation:
            found.append(("MAX_NEW_TOKENS", "INT32", [GENERATION_TOKENS]))
        return found

    def bad(self, index: int) -> list[tuple[str, str, list]]:
        """A request that must get a client error, one of four kinds in turn."""
        good = self.good(index)
        name = self.text_inputs[0]
        kind = index % 4
        if kind == 3:  # a batch over the max
            return [(n, t, rows * (self.max_batch + 1)) for n, t, rows in good]
        value = [b"", b"caf\xe9 \xff", b"a\x00b"][kind]
        return [(n, t, [value] if n == name else rows) for n, t, rows in good]


def deployments(models: Path) -> list[Deployment]:
    """The ensembles in a model repository."""
    from tasks.pbtxt import parse_config

    found = []
    for config_file in sorted(models.glob("*/config.pbtxt")):
        config = parse_config(config_file.read_text(), str(config_file))
        if config.platform != "ensemble":
            continue
        texts = [i.name for i in config.input if not i.optional and i.data_type == 13]  # STRING
        generation = any(i.name == "MAX_NEW_TOKENS" for i in config.input)
        found.append(Deployment(config.name, texts, generation, config.max_batch_size))
    if not found:
        raise BuildError(f"no deployment in {models}: build one first (doit task=...)")
    return found


@dataclass
class Record:
    """What the workers saw."""

    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rows: list = field(default_factory=list)  # (t, level, deployment, kind, seconds, outcome)
    unexpected: list = field(default_factory=list)  # the first few, in words

    def add(self, level, deployment, kind, seconds, outcome, message="") -> None:
        with self.lock:
            self.rows.append(
                (time.monotonic() - self.started, level, deployment, kind, seconds, outcome)
            )
            if outcome == "unexpected" and len(self.unexpected) < 20:
                self.unexpected.append(f"{deployment} ({kind}): {message[:300]}")


def send(client_module, client, deployment: Deployment, inputs) -> None:
    import numpy as np

    tensors = []
    for name, datatype, rows in inputs:
        dtype = object if datatype == "BYTES" else np.int32
        tensor = client_module.InferInput(name, [len(rows), 1], datatype)
        tensor.set_data_from_numpy(np.array([[r] for r in rows], dtype=dtype))
        tensors.append(tensor)
    client.infer(deployment.name, tensors)


def worker(number: int, server, found: list[Deployment], plan, record: Record, stop, recovering):
    """Requests until `stop`, while its number is below the current level."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from tasks.server import authorize

    protocol = "grpc" if number % 2 == 0 else "http"
    module = grpcclient if protocol == "grpc" else httpclient
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = module.InferenceServerClient(url)
    authorize(client, protocol)
    index = number
    catching_up = 0.0  # until then, or its first answer, its errors are still the recovery's
    try:
        while not stop.is_set():
            level = plan(time.monotonic() - record.started)
            if number >= level:
                time.sleep(0.02)
                continue
            index += 1
            deployment = found[index % len(found)]
            bad = index % BAD_EVERY == 0
            inputs = deployment.bad(index // BAD_EVERY) if bad else deployment.good(index)
            kind = f"{protocol} {'bad' if bad else 'good'}"
            started = time.monotonic()
            try:
                send(module, client, deployment, inputs)
                outcome, message = (
                    ("unexpected", "a bad request was answered") if bad else ("ok", "")
                )
            except InferenceServerException as err:
                status, message = str(err.status()), err.message() or str(err)
                client_error = status in ("400", "StatusCode.INVALID_ARGUMENT")
                if bad and client_error:
                    outcome = "refused"
                elif recovering.is_set() or time.monotonic() < catching_up:
                    outcome = "during recovery"
                else:
                    outcome = "unexpected"
                message = f"{status} {message}"
            except Exception as err:  # a broken connection, a timeout
                message = f"{type(err).__name__}: {err}"
                late = recovering.is_set() or time.monotonic() < catching_up
                outcome = "during recovery" if late else "unexpected"
            record.add(level, deployment.name, kind, time.monotonic() - started, outcome, message)
            answered = outcome in ("ok", "refused")
            if recovering.is_set():
                catching_up = time.monotonic() + CATCH_UP_SECONDS
            elif answered:
                catching_up = 0.0
            if not answered:
                time.sleep(ERROR_PAUSE)  # as a client backs off: no thousands of errors a second
    finally:
        client.close()


def resident(server) -> dict[str, int]:
    """Resident memory in KiB: the server's, and each model's stubs' together."""
    from tasks.server import supervision

    def rss(pid: int) -> int:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return 0
        return int(status.split("VmRSS:")[1].split()[0]) if "VmRSS:" in status else 0

    found = {"tritonserver": rss(server.pid)}
    module = supervision()
    for pid, name in module.stubs(server.shm_prefix).items():
        model = module.strip_instance(name)
        found[model] = found.get(model, 0) + rss(pid)
    return found


def latency_table(rows: list, levels: tuple[int, ...], plan, seconds: float) -> dict:
    """p50 and p99 of good answers per level, for its first and its last segment."""
    import numpy as np

    segments: dict[int, list[int]] = {}
    step = segment_seconds(seconds, levels)
    for number in range(int(seconds // step)):  # whole segments only
        segments.setdefault(plan(number * step + step / 2), []).append(number)
    table = {}
    for level in levels:
        numbers = segments.get(level, [])
        if not numbers:
            continue
        picks = {"first": numbers[0], "last": numbers[-1]}
        entry = {}
        for which, number in picks.items():
            times = [
                r[4]
                for r in rows
                if r[5] == "ok" and number * step <= r[0] < (number + 1) * step and r[1] == level
            ]
            if times:
                entry[which] = {
                    "answers": len(times),
                    "p50_ms": round(float(np.percentile(times, 50)) * 1000, 2),
                    "p99_ms": round(float(np.percentile(times, 99)) * 1000, 2),
                }
        if "first" in entry and "last" in entry:
            entry["p50_drift"] = round(entry["last"]["p50_ms"] / entry["first"]["p50_ms"], 2)
        table[str(level)] = entry
    return table


def segment_seconds(seconds: float, levels: tuple[int, ...]) -> float:
    """Each level gets at least two segments (a first and a last), of at most MAX_SEGMENT."""
    return min(MAX_SEGMENT, seconds / (2 * len(levels)))


def growth(before: dict, after: dict, keys) -> dict:
    return {key: round(after.get(key, 0) / before[key] - 1, 3) for key in keys if before.get(key)}


def soak(settings: Settings) -> None:
    from tasks.bench import machine
    from tasks.server import EmbeddedTritonServer, supervision

    if settings.endpoints.server != "embedded":
        raise BuildError(
            f"doit soak kills a model's stub process and reads the server's memory in /proc, "
            f"which needs the server it starts itself; drop server={settings.endpoints.server}"
        )
    if settings.endpoints.replicas > 1:
        raise BuildError(
            f"replicas={settings.endpoints.replicas}: doit soak watches one server's memory "
            "and stubs; drop replicas= (doit bench measures replicas behind their balancer)"
        )
    seconds = settings.bench.soak_minutes * 60
    levels = settings.bench.concurrency
    found = deployments(paths.MODELS)
    step = segment_seconds(seconds, levels)

    def plan(t: float) -> int:
        return levels[int(t // step) % len(levels)]

    print(
        f"soak: {seconds / 60:.1f} min on {', '.join(d.name for d in found)}; concurrency "
        f"{', '.join(map(str, levels))} in turn, {step:.0f} s each; 1 request in {BAD_EVERY} bad",
        flush=True,
    )
    with EmbeddedTritonServer(
        paths.MODELS, log_file=paths.soak_dir() / "tritonserver.log"
    ) as server:
        record, stop, recovering = Record(), threading.Event(), threading.Event()
        threads = [
            threading.Thread(
                target=worker, args=(n, server, found, plan, record, stop, recovering), daemon=True
            )
            for n in range(max(levels))
        ]
        for thread in threads:
            thread.start()
        memory, killed = {}, {}
        try:
            time.sleep(seconds / 4)
            memory["warm"] = resident(server)
            print(f"soak: warm: {memory['warm']}", flush=True)
            time.sleep(seconds / 4)
            memory["middle"] = resident(server)
            killed = kill_one_stub(server, found, recovering, supervision())
            remaining = record.started + seconds - time.monotonic()
            time.sleep(max(remaining, 0))
            memory["end"] = resident(server)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
    rows = record.rows
    outcomes: dict[str, int] = {}
    for row in rows:
        outcomes[row[5]] = outcomes.get(row[5], 0) + 1
    restarted = killed.get("model")
    server_growth = growth(memory["warm"], memory["end"], ["tritonserver"])
    stub_growth = growth(
        memory["warm"], memory["end"], set(memory["warm"]) - {"tritonserver", restarted}
    )
    if restarted:  # its stubs started afresh at the kill: from the middle on
        stub_growth.update(growth(killed.get("memory_after", {}), memory["end"], [restarted]))
    leaks = {k: v for k, v in {**server_growth, **stub_growth}.items() if v > LEAK_LIMIT}
    report = {
        "seconds": seconds,
        "deployments": [d.name for d in found],
        "concurrency": list(levels),
        "requests": len(rows),
        "outcomes": outcomes,
        "unexpected_errors": record.unexpected,
        "stub_kill": killed,
        "resident_kib": memory,
        "growth_after_warm_up": {**server_growth, **stub_growth},
        "leaks": leaks,
        "latency": latency_table(rows, levels, plan, seconds),
        "machine": machine(),
    }
    write_report(report)
    problems = []
    if outcomes.get("unexpected"):
        problems.append(f"{outcomes['unexpected']} unexpected errors: {record.unexpected[:3]}")
    if leaks:
        problems.append(f"resident memory grew more than {LEAK_LIMIT:.0%} after warm-up: {leaks}")
    if killed and not killed.get("recovered"):
        problems.append(f"'{killed['model']}' did not come back after its stub was killed")
    if problems:
        raise BuildError(
            f"soak failed ({paths.soak_report().relative_to(paths.ROOT)}): " + "; ".join(problems)
        )
    print(f"soak: passed: {len(rows)} requests, {outcomes}", flush=True)


def kill_one_stub(server, found, recovering, module) -> dict:
    """SIGKILL the stubs of a python model the traffic goes through (the first deployment's
    model or decoding loop, else another of its parts); wait for it back: reloaded by the
    supervisor, or the whole server restarted (a generation model's)."""
    import os
    import signal

    stubs = module.stubs(server.shm_prefix)
    names = {module.strip_instance(n) for n in stubs.values()}
    mine = sorted(n for n in names if n.startswith(f"{found[0].name}_"))
    preferred = [f"{found[0].name}{suffix}" for suffix in ("_model", "_generate")]
    model = next((n for n in preferred if n in mine), mine[0] if mine else None)
    if model is None:
        return {}
    pids = [pid for pid, name in stubs.items() if module.strip_instance(name) == model]
    restarts = len(server.restarts)
    recovering.set()
    started = time.monotonic()
    print(f"soak: killing the stubs of '{model}' (pids {pids})", flush=True)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    recovered = False
    while time.monotonic() - started < 60:
        # a generation model's stubs hold requests past execute: the supervisor restarts the
        # whole server (no supervisor while it does), and the server counts the restart
        supervisor = server.supervisor
        reloaded = supervisor is not None and any(
            r["model"] == model and r["ok"] for r in supervisor.recoveries
        )
        if reloaded or len(server.restarts) > restarts:
            recovered = True
            break
        time.sleep(0.1)
    seconds = round(time.monotonic() - started, 2)
    time.sleep(1.0)  # requests already failing on their way back
    recovering.clear()
    print(f"soak: '{model}' {'back' if recovered else 'NOT back'} after {seconds} s", flush=True)
    return {
        "model": model,
        "pids": pids,
        "recovered": recovered,
        "seconds_to_recover": seconds,
        "memory_after": resident(server),
    }


def write_report(report: dict) -> None:
    artifacts.write_json(paths.soak_report(), report)
    lines = [
        f"# Soak: {report['seconds'] / 60:.1f} min, {report['requests']} requests",
        "",
        f"Deployments: {', '.join(report['deployments'])}; concurrency "
        f"{report['concurrency']} in turn; machine: {report['machine']['processor']}, "
        f"{report['machine']['cpus']} CPUs.",
        "",
        f"Outcomes: {report['outcomes']}. Unexpected errors: {len(report['unexpected_errors'])}.",
        "",
        f"Stub kill: {report['stub_kill'] or 'none'}.",
        "",
        "| process | warm (KiB) | middle | end | growth after warm-up |",
        "|---|---|---|---|---|",
    ]
    memory = report["resident_kib"]
    for key in memory.get("warm", {}):
        lines.append(
            f"| {key} | {memory['warm'].get(key)} | {memory.get('middle', {}).get(key)} | "
            f"{memory.get('end', {}).get(key)} | {report['growth_after_warm_up'].get(key)} |"
        )
    lines += ["", "| concurrency | p50 first (ms) | p50 last (ms) | drift | p99 last (ms) |"]
    lines.append("|---|---|---|---|---|")
    for level, entry in report["latency"].items():
        first, last = entry.get("first", {}), entry.get("last", {})
        lines.append(
            f"| {level} | {first.get('p50_ms')} | {last.get('p50_ms')} | "
            f"{entry.get('p50_drift')} | {last.get('p99_ms')} |"
        )
    artifacts.write_text(paths.soak_markdown(), "\n".join(lines) + "\n")
    print(f"soak: {paths.soak_markdown().relative_to(paths.ROOT)}", flush=True)


def task_soak():
    """Minutes of mixed traffic on every deployment in models/, a stub killed midway."""
    settings = current()
    targets = [paths.soak_report(), paths.soak_markdown()]
    return {
        "actions": [(fails_cleanly(soak), [settings])],
        "task_dep": ["repo"],
        "targets": targets,
        "uptodate": [False],
        "clean": [(artifacts.remove_artifacts, [targets])],
    }
