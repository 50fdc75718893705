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


def alternating(systems: dict, concurrency: int, seconds: float, texts: list, slices: int) -> dict:
    """Each system (name: (setup, work)) measured as `closed_loop` does for `seconds`, in
    `slices` turns taken in alternation (A B A B ...), their answers pooled: a point per
    system that a load moving on a shared machine weighs on alike."""
    runs: dict[str, list] = {name: [] for name in systems}
    for _ in range(slices):
        for name, (setup, work) in systems.items():
            runs[name].append(run_loop(work, concurrency, seconds / slices, texts, setup))
    pooled = {}
    for name, parts in runs.items():
        raw = {key: [item for part in parts for item in part[key]] for key in RAW_LISTS}
        raw["elapsed"] = sum(part["elapsed"] for part in parts)
        raw["errors"] = sum(part["errors"] for part in parts)
        pooled[name] = point_of(raw, concurrency)
    return pooled


RAW_LISTS = ("latencies", "rejections", "failures")


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
    work, concurrency: int, seconds: float, texts: list, setup=None, backoff: float = 0.0
) -> dict:
    """`closed_loop`'s run, its figures raw: latencies, rejections and failures (lists),
    elapsed seconds, errors."""
    order, lock = itertools.count(), threading.Lock()
    latencies, errors, failures, rejections = [], [0], [], []
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
            began = time.perf_counter()
            if began >= clock["deadline"]:
                break
            rejected = False
            try:
                good = work(state, text)
            except Exception as err:  # every failure counts, and the first few are shown
                good = False
                rejected = any(words in str(err) for words in REJECTIONS)
                if not rejected:
                    failures.append(f"{type(err).__name__}: {err}"[:200])
            ended = time.perf_counter()
            with lock:
                clock["last"] = max(clock["last"], ended)
                if good:
                    latencies.append(ended - began)
                elif rejected:
                    rejections.append(ended - began)
                else:
                    errors[0] += 1
            if rejected and backoff:
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
    elapsed = max(clock["last"] - clock["start"], 0.0)  # 0: nothing answered
    return {
        "latencies": latencies,
        "rejections": rejections,
        "failures": failures,
        "elapsed": elapsed,
        "errors": errors[0],
    }
