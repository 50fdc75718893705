"""Closed-loop load generation for `doit bench` (encoder and generation tasks alike):
threads that each send a request as soon as their last one is answered, for a fixed time,
and the statistics of a point."""

from __future__ import annotations

import itertools
import statistics
import threading
import time

WARMUP_SECONDS = 1.0


# Triton's words for a rejection by a full queue (max_queue) or a queue timeout
REJECTIONS = ("Exceeds maximum queue size", "Request timeout expired")


def percentile_ms(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def summarize(latencies: list[float], elapsed: float, errors: int, concurrency: int) -> dict:
    """A point of the report; no answer at all gives null statistics, never NaN."""
    ordered = sorted(latencies)

    def pct(q: float) -> float | None:
        return percentile_ms(ordered, q)

    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "throughput": round(len(latencies) / elapsed, 2) if elapsed > 0 else 0.0,
        "p50_ms": pct(0.5),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2) if ordered else None,
    }


def closed_loop(
    work, concurrency: int, seconds: float, texts: list, setup=None, backoff: float = 0.0
) -> dict:
    """`concurrency` threads each run `work(state, text)` back to back, starting requests for
    `seconds`; throughput divides by the time until the last of them finished.

    `setup(state)` runs before the clock starts (clients connect there, unmeasured). `work`
    returns True for a good answer; anything else, or an exception, is an error, except a
    rejection by a full queue (max_queue), which is counted apart with how fast it came; a
    client waits `backoff` seconds after one, as a client told to retry later does."""
    return point_of(run_loop(work, concurrency, seconds, texts, setup, backoff), concurrency)


def alternating(
    systems: dict,
    concurrency: int,
    seconds: float,
    texts: list,
    slices: int,
    workers: dict | None = None,
    windows: dict | None = None,
    settle: float = 0.0,
    on_round=None,
) -> dict:
    """Each system (name: (setup, work)) measured as `closed_loop` does for `seconds`, in
    `slices` turns taken in alternation (A B A B ...), their answers pooled: a point per
    system that a load moving on a shared machine weighs on alike. Each system's turns go on
    through the texts where its last turn stopped, so all send the same mix.

    `workers` (name: threads) runs a system on threads of its own number (its point still
    says `concurrency`). Each turn lasts `settle` seconds more, and `windows`, when given,
    gets each system's turns less those first seconds, as (start, deadline) pairs of
    time.perf_counter(): what a caller counts in (every client starts at once in a turn).
    `on_round(done, slices)`, when given, is called after each round (progress)."""
    runs: dict[str, list] = {name: [] for name in systems}
    for done in range(1, slices + 1):
        for name, (setup, work) in systems.items():
            start = sum(part["started"] for part in runs[name])
            threads = (workers or {}).get(name, concurrency)
            turn = settle + seconds / slices
            runs[name].append(run_loop(work, threads, turn, texts, setup, 0, start))
        if on_round is not None:
            on_round(done, slices)
    if windows is not None:
        for name, parts in runs.items():
            windows[name] = [(start + settle, end) for start, end in (p["window"] for p in parts)]
    pooled = {}
    for name, parts in runs.items():
        raw = {key: [item for part in parts for item in part[key]] for key in RAW_LISTS}
        raw["elapsed"] = sum(part["elapsed"] for part in parts)
        raw["errors"] = sum(part["errors"] for part in parts)
        pooled[name] = point_of(raw, concurrency)
    return pooled


def in_step(systems: dict, seconds: float, texts: list) -> dict:
    """Concurrency 1 with the systems (name: (setup, work)) in step: each text goes to every
    system in turn, request by request (the first system first, then last, and so on), for
    about `seconds` each. Each point has `added_p50_ms`: the median over the texts sent of
    its latency less the first system's for the same text, a moment apart. Paired so, what
    one system adds to a request shows even where the load moves more than that from one
    second to the next, and texts of mixed lengths cannot tip the p50 from one to another."""
    states = {name: {} for name in systems}
    for name, (setup, _) in systems.items():
        if setup is not None:
            setup(states[name])
    raws = {name: new_raw() for name in systems}
    rounds, began, position = [], time.perf_counter(), 0
    while time.perf_counter() - began < seconds * len(systems):
        text, answered = texts[position % len(texts)], {}
        turns = list(systems.items())
        position += 1
        for name, (_, work) in turns if position % 2 else reversed(turns):
            kind, took, failure = attempt(work, states[name], text)
            raws[name]["elapsed"] += took
            record(raws[name], kind, took, failure)
            if kind == "good":
                answered[name] = took
        rounds.append(answered)
    for state in states.values():
        state.get("close", lambda: None)()
    first, points = next(iter(systems)), {}
    for name, raw in raws.items():
        points[name] = point_of(raw, 1)
        added = [r[name] - r[first] for r in rounds if name in r and first in r]
        points[name]["added_p50_ms"] = percentile_ms(added, 0.5)
    return points


RAW_LISTS = ("latencies", "rejections", "failures")


def new_raw() -> dict:
    return {"latencies": [], "rejections": [], "failures": [], "errors": 0, "elapsed": 0.0}


def attempt(work, state: dict, text) -> tuple[str, float, str]:
    """One request: good, rejected (by a full queue) or error; its seconds; what failed."""
    began = time.perf_counter()
    try:
        kind, failure = ("good" if work(state, text) else "error"), ""
    except Exception as err:  # every failure counts, and the first few are shown
        rejected = any(words in str(err) for words in REJECTIONS)
        kind, failure = ("rejected", "") if rejected else ("error", f"{type(err).__name__}: {err}")
    return kind, time.perf_counter() - began, failure[:200]


def record(raw: dict, kind: str, took: float, failure: str) -> None:
    if kind == "good":
        raw["latencies"].append(took)
    elif kind == "rejected":
        raw["rejections"].append(took)
    else:
        raw["errors"] += 1
    if failure:
        raw["failures"].append(failure)


def point_of(raw: dict, concurrency: int) -> dict:
    """A point of the report from one loop's (or pooled loops') raw figures."""
    latencies, rejections, failures = raw["latencies"], raw["rejections"], raw["failures"]
    point = summarize(latencies, raw["elapsed"], raw["errors"], concurrency)
    if rejections:
        point["rejected"] = len(rejections)
        point["rejected_share"] = round(len(rejections) / (len(rejections) + len(latencies)), 3)
        point["reject_p50_ms"] = percentile_ms(rejections, 0.5)
        point["reject_p99_ms"] = percentile_ms(rejections, 0.99)
    if failures:
        point["first_errors"] = sorted(set(failures))[:3]
    return point


def run_loop(
    work,
    concurrency: int,
    seconds: float,
    texts: list,
    setup=None,
    backoff: float = 0.0,
    start: int = 0,
) -> dict:
    """`closed_loop`'s run, from the text at `start`, its figures raw (`new_raw`'s) and how
    many requests were started."""
    order, lock, raw = itertools.count(start), threading.Lock(), new_raw()
    start_line = threading.Barrier(concurrency + 1)
    clock = {"start": 0.0, "deadline": 0.0, "last": 0.0}

    def worker() -> None:
        state: dict = {}
        if setup is not None:
            setup(state)
        start_line.wait()  # everyone is set up
        start_line.wait()  # the clock is set
        while True:
            with lock:
                text = texts[next(order) % len(texts)]
            if time.perf_counter() >= clock["deadline"]:
                break
            kind, took, failure = attempt(work, state, text)
            with lock:
                clock["last"] = max(clock["last"], time.perf_counter())
                record(raw, kind, took, failure)
            if kind == "rejected" and backoff:
                time.sleep(backoff)
        state.get("close", lambda: None)()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    start_line.wait()
    clock["start"] = time.perf_counter()
    clock["deadline"] = clock["start"] + seconds
    start_line.wait()
    for thread in threads:
        thread.join()
    raw["elapsed"] = max(clock["last"] - clock["start"], 0.0)  # 0: nothing answered
    raw["window"] = (clock["start"], clock["deadline"])  # when requests were started
    raw["started"] = len(raw["latencies"]) + raw["errors"] + len(raw["rejections"])
    return raw
