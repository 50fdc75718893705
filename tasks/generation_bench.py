"""`doit bench` on a generation task: what LLM users compare (the bench stage calls this).

A seeded mix of the bench's prompts, each asking 4 to 128 new tokens (as many as the
deployment and the model's positions allow), closed loop at each concurrency, every system
at every concurrency taking turns (`served`), through:
- `triton` `grpc_stream`: `<name>_stream`; time to first token and inter-token latency from
  the responses as they arrive (a response of several tokens, with stream_interval > 1,
  spread over the gap before it), output tokens per second, request latency;
- `triton` `grpc`: `<name>` (the ensemble), whole answers: request latency, tokens per second;
- `onnxruntime`: the in-process decoding loop (decoding.Generator), one request at a time,
  at concurrency 1 (the server idles through its turns);
- `onnxruntime_inflight`: the server's in-flight loop (triton/inflight/) in-process, on the
  same steps, at the highest concurrency: what the loop itself allows, without Triton's
  responses;
- `onnxruntime_decode_limit`: the decode step alone (the exported `decoder_with_past_model`,
  or decoder=slots' graph), in-process, at batch = concurrency and a realistic cache (the
  mix's mean prompt plus half its mean new tokens), steps back to back: the most tokens per
  second the decode step allows, the served loop's ceiling;
- `pytorch`: Hugging Face `generate()`, one request at a time.
"""

from __future__ import annotations

import itertools
import statistics
import time

from tasks import artifacts, catalog, paths
from tasks.facts import checkpoint_facts
from tasks.loadgen import WARMUP_SECONDS, alternating
from tasks.server import authorize
from tasks.settings import Settings

SEED = 0
LEAST_NEW, MOST_NEW = 4, 128
TURN_SECONDS = 2.0  # a turn of a system at a concurrency: several requests each


def prompt_tokenizer(settings: Settings):
    """The checkpoint's tokenizer as the server tokenizes a prompt: whole, alone (no padding,
    no truncation)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(paths.source_tokenizer(settings.name)))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def workload(settings: Settings, texts: list) -> list[tuple[str, int]]:
    """(prompt, MAX_NEW_TOKENS) pairs: the bench's prompts, each asking 4 to 128 new tokens,
    seeded, within the deployment's MAX and the model's positions."""
    import numpy as np

    tokenizer = prompt_tokenizer(settings)
    positions = checkpoint_facts(settings.name)["max_positions"]
    rng = np.random.default_rng(SEED)
    mix = []
    for _ in range(4):
        for (text,) in texts:
            most = min(MOST_NEW, settings.max_new_tokens)
            if settings.task.generation == "causal" and positions:
                most = min(most, positions - len(tokenizer.encode(text).ids))
            if most >= LEAST_NEW:
                mix.append((text, int(rng.integers(LEAST_NEW, most + 1))))
    rng.shuffle(mix)
    return mix


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def token_figures(records: list[dict], windows: list[tuple[float, float]]) -> dict:
    """tokens_per_s, ttft and itl percentiles of a closed-loop point from its requests, within
    `windows` (of each turn, from when it settled to its deadline).

    tokens_per_s counts the tokens made within the windows over their length, each at its
    record's `times` (a stream's tokens as they arrive, a whole answer's `spread`): neither a
    turn's start, when every client sends at once, nor its tail, while its last requests
    finish with fewer clients, counts. Time to first token is that of the requests begun
    within them, and inter-token latency that of their tokens that arrived within them.

    A loop driven here a step at a time (`inflight`: a record per step, `at` its end) counts
    its requests from the ones its steps `answered`, and the share of the tokens it computed
    that were prompts (`prompt_tokens`, prefilled)."""

    def inside(t: float) -> bool:
        return any(start <= t < end for start, end in windows)

    span = sum(end - start for start, end in windows)
    made = sum(1 for r in records for t in r["times"] if inside(t))
    found = {"tokens": sum(r["tokens"] for r in records)}
    if span > 0 and made:
        found["tokens_per_s"] = round(made / span, 1)
    timed = [r for r in records if "ttft" in r and inside(r["began"])]
    if timed:
        firsts = [r["ttft"] for r in timed]
        gaps = [gap for r in timed for gap, t in zip(r["gaps"], r["times"][1:]) if inside(t)]
        found.update(
            ttft_p50_ms=percentile(firsts, 0.5),
            ttft_p99_ms=percentile(firsts, 0.99),
            itl_p50_ms=percentile(gaps, 0.5),
            itl_p99_ms=percentile(gaps, 0.99),
        )
    steps = [r for r in records if "answered" in r and inside(r["at"])]
    if steps and span > 0:  # its requests' latency would hold the other systems' turns
        answered, prompts = (sum(r[key] for r in steps) for key in ("answered", "prompt_tokens"))
        found.update(requests=answered, throughput=round(answered / span, 2))
        found.update(dict.fromkeys(("p50_ms", "p95_ms", "p99_ms", "mean_ms")))
        # the decode limit counts new tokens only, so where compute bounds a step (a CPU) the
        # loop reaches at most about 1 - this share of it
        found["prompt_share"] = round(prompts / (prompts + made), 2) if made else None
    return found


def stream_work(settings: Settings, url: str, records: list):
    """One request through `<name>_stream` (gRPC), each response's arrival timed."""
    import queue

    import tritonclient.grpc as grpc

    def setup(state: dict) -> None:
        state["client"] = client = grpc.InferenceServerClient(url)
        authorize(client, "grpc")
        state["responses"] = responses = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))

        def close() -> None:
            client.stop_stream()
            client.close()

        state["close"] = close

    def work(state: dict, item: tuple[str, int]) -> bool:
        text, new = item
        inputs = prompt_inputs(text, new)
        began = time.perf_counter()
        state["client"].async_stream_infer(
            f"{settings.name}_stream", inputs, enable_empty_final_response=True
        )
        times = []
        while True:
            result, error = state["responses"].get(timeout=120)
            if error is not None:
                raise error
            response = result.get_response()
            if response.outputs:
                made = int((result.as_numpy("OUTPUT_IDS")[0] != -1).sum())
                arrived(times, time.perf_counter(), made)
            if response.parameters["triton_final_response"].bool_param:
                break
        if not times:
            return False
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        records.append({
            "tokens": len(times), "times": times, "began": began, "ttft": times[0] - began,
            "gaps": gaps,
        })  # fmt: skip
        return True

    return setup, work


def arrived(times: list[float], now: float, made: int) -> None:
    """Add the arrival times of `made` tokens that came in one response at `now`: with
    stream_interval > 1 a response holds several, counted as if they had come one by one
    since the response before (the mean inter-token latency of that gap)."""
    last = times[-1] if times else now
    times += [last + (now - last) * (k + 1) / made for k in range(made)]


def spread(began: float, ended: float, made: int) -> list[float]:
    """When an answer that comes whole made its `made` tokens, as `token_figures` counts
    them: evenly over its request's time, the last as it ended. Counted at the end, the tokens
    of the requests still running when a turn ends would be lost to it (about half of whole
    answers' tokens/s at 16 clients in 2 s turns: 531 against 1037 to 1131 spread, bench-llama,
    AMD EPYC), where a stream's count as they come."""
    return [began + (ended - began) * (k + 1) / made for k in range(made)]


def prompt_inputs(text: str, new: int) -> list:
    """One prompt and the new tokens it asks for, as gRPC inputs of `<name>` and `_stream`."""
    import numpy as np
    import tritonclient.grpc as grpc

    inputs = [
        grpc.InferInput("TEXT", [1, 1], "BYTES"),
        grpc.InferInput("MAX_NEW_TOKENS", [1, 1], "INT32"),
    ]
    inputs[0].set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[new]], dtype=np.int32))
    return inputs


def whole_work(settings: Settings, url: str, records: list):
    """One request through the ensemble `<name>` (gRPC), answered whole."""
    import tritonclient.grpc as grpc

    def setup(state: dict) -> None:
        state["client"] = grpc.InferenceServerClient(url)
        authorize(state["client"], "grpc")
        state["close"] = state["client"].close

    def work(state: dict, item: tuple[str, int]) -> bool:
        text, new = item
        inputs = prompt_inputs(text, new)
        began = time.perf_counter()
        ids = state["client"].infer(settings.name, inputs).as_numpy("OUTPUT_IDS")
        made = int((ids[0] != -1).sum())
        records.append({"tokens": made, "times": spread(began, time.perf_counter(), made)})
        return made >= 1

    return setup, work


def loop_work(settings: Settings, records: list):
    """The in-process decoding loop, a request at a time (tokenized as the server does)."""
    import numpy as np

    from tasks.generation_parity import make_generator

    tokenizer = prompt_tokenizer(settings)
    decoding, generator = make_generator(settings, checkpoint_facts(settings.name))

    def work(state: dict, item: tuple[str, int]) -> bool:
        text, new = item
        ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
        began = time.perf_counter()
        out = generator.generate(ids, np.ones_like(ids), [decoding.RowParams(new)])
        records.append(
            {"tokens": len(out[0]), "times": spread(began, time.perf_counter(), len(out[0]))}
        )
        return len(out[0]) >= 1

    return work


def decode_feed(io: dict, batch: int, cache: int, prompt: int) -> dict:
    """Inputs of a decoder_with_past_model at `batch` rows and a `cache`-long past (seq2seq:
    over a `prompt`-long encoder output), from its io.json: random values, real shapes."""
    import numpy as np

    sizes = {
        "batch_size": batch,
        "past_sequence_length": cache,
        "past_decoder_sequence_length": cache,
        "encoder_sequence_length": prompt,
        "sequence_length": 1,
        "decoder_sequence_length": 1,
    }
    rng = np.random.default_rng(SEED)
    feed = {}
    for tensor in io["inputs"]:
        shape = []
        for dim in tensor["shape"]:
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            else:
                shape.append(sum(sizes.get(t.strip(), 0) or int(t) for t in str(dim).split("+")))
        name, dtype = tensor["name"], tensor["dtype"]
        if name in ("attention_mask", "encoder_attention_mask"):
            feed[name] = np.ones(shape, dtype=np.int64)
        elif name == "position_ids":
            feed[name] = np.full(shape, cache, dtype=np.int64)
        elif dtype == "int64":
            feed[name] = rng.integers(3, 100, shape).astype(np.int64)
        else:
            feed[name] = rng.standard_normal(shape).astype(dtype)
    return feed


def decode_steps(settings: Settings, cache: int, prompt: int):
    """A function of the batch size giving a callable that runs one decode step of that many
    rows over a `cache`-long past: the exported `decoder_with_past_model`, or with
    decoder=slots the slot decoder's graph (what the server decodes with)."""
    import numpy as np

    from tasks.generation_parity import load_decoding, slot_step

    decoding, serving = load_decoding(), settings.serving
    if settings.decoder == "slots":
        # the step alone, as the limit decodes no prompt
        slots = slot_step(settings, decoding, max(settings.bench.concurrency), cache + 2, False)

        def slot_batch(batch: int):
            ids = np.ones((batch, 1), np.int64)
            mask = np.ones((batch, cache + 1), np.int64)  # each row `cache` long, and its token
            return lambda: slots(ids, mask, 0)

        return slot_batch
    part = "decoder_with_past_model"
    step = decoding.OnnxRuntimeStep(
        settings.model_file(part), serving.ort_threads, serving.ort_spin
    )
    io = artifacts.read_json(paths.onnx_io(settings.name, part))

    def exported_step(batch: int):
        feed = decode_feed(io, batch, cache, prompt)
        return lambda: step(feed)

    return exported_step


def decode_limit(settings: Settings, mix: list[tuple[str, int]]):
    """`onnxruntime_decode_limit`: the decode step alone (on the graph the server decodes
    with: the exported one, or decoder=slots' own) over a realistic cache: the mix's mean
    prompt plus half its mean new tokens (seq2seq: half its new tokens). Returns (`limit`,
    the cache length): `limit(batch)` is a system for `token_points` (a maker of (setup,
    work)) whose one thread runs steps of `batch` rows back to back, each a record of
    `batch` tokens. Its point's tokens_per_s is `batch` over the median step (a ceiling: a
    step the host slowed does not lower it), tokens_per_s_in_turns what its turns made."""
    tokenizer = prompt_tokenizer(settings)
    prompt = round(statistics.fmean(len(tokenizer.encode(t).ids) for t, _ in mix))
    new = round(statistics.fmean(n for _, n in mix))
    cache = prompt + new // 2 if settings.task.generation == "causal" else new // 2
    steps = decode_steps(settings, cache, prompt)

    def limit(batch: int):
        step = steps(batch)

        def make(records: list):
            def work(state: dict, item) -> bool:
                step()
                records.append({"tokens": batch, "times": [time.perf_counter()] * batch})
                return True

            return None, work

        return make

    return limit, cache


def token_points(makers: dict, workers: dict, seconds: float, mix: list, slices: int) -> dict:
    """Each system (name: `make_work(records)`, giving (setup, work) that append one record
    per good request) closed loop on its `workers` threads, in `slices` turns each
    (`loadgen.alternating`), each turn settling (up to WARMUP_SECONDS) before it counts, with
    token figures."""
    records = {name: [] for name in makers}
    systems = {name: make(records[name]) for name, make in makers.items()}
    windows: dict = {}
    settle = min(WARMUP_SECONDS, seconds / slices)
    turn = settle + seconds / slices
    print(
        f"bench: {len(systems)} systems in turns of {turn:g} s, {slices} rounds "
        f"(about {len(systems) * turn * slices:.0f} s)",
        flush=True,
    )

    def done(round_: int, rounds: int) -> None:
        print(f"bench: round {round_} of {rounds} done", flush=True)

    found = alternating(systems, 1, seconds, mix, slices, workers, windows, settle, done)
    return {
        name: {**point, **token_figures(records[name], windows[name])}
        for name, point in found.items()
    }


def shown(name: str, point: dict) -> None:
    """A point's token figures, printed as the bench goes."""
    print(
        f"bench: {name} concurrency {point['concurrency']}: {point.get('tokens_per_s')} "
        f"tokens/s, ttft p50 {point.get('ttft_p50_ms')} ms, itl p50 {point.get('itl_p50_ms')} "
        f"ms, request p50 {point['p50_ms']} ms, {point['errors']} errors",
        flush=True,
    )


def served(settings: Settings, grpc_url: str, mix: list) -> dict[str, list]:
    """Every system at every concurrency, each in turn, round after round (`token_points`):
    `triton`'s stream and whole answers and `onnxruntime_decode_limit` at batch = the
    concurrency, `onnxruntime`, the in-process loop one at a time, at 1, and
    `onnxruntime_inflight`, the server's in-flight loop in-process, at the highest. The
    server idles through the in-process turns. A host whose speed moves so weighs on all the
    figures alike that the targets compare: measured a minute apart, served / limit once read
    0.60 where the host had slowed by a third in between (the 08:16 UTC run of 2026-12-07)."""
    bench = settings.bench
    limit, cache = decode_limit(settings, mix)
    high = max(bench.concurrency)
    looping, stop = inflight(settings, mix, high)
    makers = {("loop", 1): lambda records: (None, loop_work(settings, records))}
    for level in bench.concurrency:
        makers[("stream", level)] = lambda records: stream_work(settings, grpc_url, records)
        makers[("whole", level)] = lambda records: whole_work(settings, grpc_url, records)
        makers[("limit", level)] = limit(level)
    makers[("inflight", high)] = looping
    one_thread = ("loop", "limit", "inflight")  # a step of `level` rows is one call
    workers = {(name, level): 1 if name in one_thread else level for name, level in makers}
    slices = max(2, round(bench.seconds / TURN_SECONDS))  # each system twice at least
    try:
        points = token_points(makers, workers, bench.seconds, mix, slices)
    finally:
        stop()
    found: dict[str, list] = {system: [] for system, _ in SYSTEMS.values()}
    for (name, level), point in points.items():
        point["concurrency"] = level
        if name == "limit":  # the ceiling: a median step's, as over its turns it ran slower
            point.update(
                batch=level,
                cache_length=cache,
                itl_p50_ms=point["p50_ms"],
                tokens_per_s_in_turns=point.get("tokens_per_s"),
                tokens_per_s=round(level / point["p50_ms"] * 1000, 1),
            )
        system, protocol = SYSTEMS[name]
        found[system].append({"protocol": protocol, **point} if protocol else point)
        shown(f"{system} {protocol or 'in-process'}", point)
    return found


# the systems that take turns: (report.json's system, protocol)
SYSTEMS = {
    "loop": ("onnxruntime", None),
    "inflight": ("onnxruntime_inflight", None),
    "stream": ("triton", "grpc_stream"),
    "whole": ("triton", "grpc"),
    "limit": ("onnxruntime_decode_limit", None),
}


def inflight(settings: Settings, mix: list, concurrency: int):
    """`onnxruntime_inflight`: `concurrency` clients, each sending its next request of the mix
    as the last one finishes, into the server's in-flight loop driven here step by step. A
    system for `token_points` on one thread: each call is a step boundary and a step, its
    record the tokens made, the prompts prefilled and the requests answered
    (`token_figures`); between its turns the loop waits with its requests in it. Returns
    (the system's maker, a function that stops the loop)."""
    import numpy as np

    from tasks.generation_parity import LoopJob, load_inflight, running_batch

    facts = checkpoint_facts(settings.name)
    modules = load_inflight()
    running = running_batch(settings, facts, modules)  # its steps, as the server makes them
    loop = modules["scheduler"].Scheduler(
        running,
        facts["eos_ids"],
        max_rows=settings.batch.max,
        prefill_waste=catalog.PREFILL_WASTE[settings.task.generation],  # as the server's
    )
    tokenizer = prompt_tokenizer(settings)
    prompts = itertools.cycle(  # tokenized before the clock, as the server's execute does
        [(np.array(tokenizer.encode(text).ids, dtype=np.int64), new) for text, new in mix]
    )

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    def request() -> LoopJob:
        prompt, new = next(prompts)
        params = modules["decoding"].RowParams(new)
        job = LoopJob(
            modules["scheduler"].Row(prompt, params, modules["detokenizer"].TextStream(decode))
        )
        loop.submit(job)
        return job

    clients: list[LoopJob] = []

    def make(records: list):
        def work(state: dict, item) -> bool:
            clients.extend(request() for _ in range(concurrency - len(clients)))
            before = [len(job.rows[0].tokens) for job in clients]
            loop.iterate()
            at, tokens, prefilled, answered = time.perf_counter(), 0, 0, 0
            for index, (job, had) in enumerate(zip(clients, before)):
                row = job.rows[0]
                tokens += len(row.tokens) - had
                prefilled += len(row.prompt) if had == 0 < len(row.tokens) else 0
                if job.ended is not None:
                    answered += 1
                    clients[index] = request()
            records.append({
                "tokens": tokens, "times": [at] * tokens, "at": at,
                "prompt_tokens": prefilled, "answered": answered,
            })  # fmt: skip
            return True

        return None, work

    return make, loop.stop


def _at(systems: dict, system: str, concurrency: int, key: str, protocol: str | None = None):
    """`key` of a system's point at a concurrency (and protocol), or None."""
    for p in systems.get(system, []):
        if p["concurrency"] == concurrency and (protocol is None or p.get("protocol") == protocol):
            return p.get(key)
    return None


def _ratio(a, b) -> float | None:
    return round(a / b, 2) if a and b else None


def _percent(share: float | None) -> str:
    return "an unknown share" if share is None else f"{share:.0%}"


def gap(systems: dict) -> dict:
    """Where the served stream's tokens/s at the highest concurrency go, against the decode
    limit, as factors of one run that multiply to served / limit: the loop itself (its
    in-process in-flight figure / the limit: prefill, padding, cache copies; its
    `prompt_share`, of the tokens it made, bounds it), Triton answering whole (whole answers /
    the loop in-process) and the stream's responses (stream / whole)."""
    high = max((p["concurrency"] for p in systems.get("triton", [])), default=1)
    loop = _at(systems, "onnxruntime_inflight", high, "tokens_per_s")
    whole = _at(systems, "triton", high, "tokens_per_s", "grpc")
    return {
        "concurrency": high,
        "loop_vs_decode_limit": _ratio(
            loop, _at(systems, "onnxruntime_decode_limit", high, "tokens_per_s")
        ),
        "whole_vs_loop": _ratio(whole, loop),
        "stream_vs_whole": _ratio(
            _at(systems, "triton", high, "tokens_per_s", "grpc_stream"), whole
        ),
        "prompt_share": _at(systems, "onnxruntime_inflight", high, "prompt_share"),
    }


def targets(systems: dict) -> dict:
    """The issue's targets, from one run: each ratio, and whether it is met."""
    high = max((p["concurrency"] for p in systems.get("triton", [])), default=1)
    served_high = _at(systems, "triton", high, "tokens_per_s", "grpc_stream")
    served_one = _at(systems, "triton", 1, "tokens_per_s", "grpc_stream")
    found = {
        f"served_{high}_vs_decode_limit_{high}": (
            _ratio(served_high, _at(systems, "onnxruntime_decode_limit", high, "tokens_per_s")),
            0.6,
        ),
        f"served_{high}_vs_served_1": (_ratio(served_high, served_one) if high > 1 else None, 4.0),
        f"ttft_p50_{high}_vs_1": (
            _ratio(
                _at(systems, "triton", high, "ttft_p50_ms", "grpc_stream"),
                _at(systems, "triton", 1, "ttft_p50_ms", "grpc_stream"),
            )
            if high > 1  # one level alone compares nothing
            else None,
            4.0,
        ),
        "served_1_vs_inprocess_loop_1": (
            _ratio(served_one, _at(systems, "onnxruntime", 1, "tokens_per_s")),
            0.85,
        ),
    }
    return {
        name: {
            "value": value,
            "target": target,
            "met": None
            if value is None
            else (value <= target if name.startswith("ttft") else value >= target),
        }
        for name, (value, target) in found.items()
    }


def report_lines(report: dict) -> list[str]:
    """report.md's generation table and targets."""
    lines = [
        "| system | protocol | concurrency | tokens/s | ttft p50 | ttft p99 | itl p50 | itl p99 "
        "| request p50 (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, points in report["systems"].items():
        for p in points:
            if "tokens_per_s" in p:
                lines.append(
                    f"| {system} | {p.get('protocol', 'in-process')} | {p['concurrency']} | "
                    f"{p['tokens_per_s']} | {p.get('ttft_p50_ms')} | {p.get('ttft_p99_ms')} | "
                    f"{p.get('itl_p50_ms')} | {p.get('itl_p99_ms')} | {p['p50_ms']} |"
                )
    lines += ["", "| target | value | wanted | met |", "|---|---|---|---|"]
    for name, found in report.get("targets", {}).items():
        wanted = ("<= " if name.startswith("ttft") else ">= ") + str(found["target"])
        lines.append(f"| {name} | {found['value']} | {wanted} | {found['met']} |")
    if report.get("gap"):
        share = report["gap"]
        lines += [
            "",
            f"Where the stream's tokens/s at concurrency {share['concurrency']} go, against the "
            f"decode limit (factors that multiply to served / limit): the loop itself "
            f"{share['loop_vs_decode_limit']} (in-process in-flight / limit; the prompts are "
            f"{_percent(share.get('prompt_share'))} of the tokens it computes, which the limit "
            "does not count: where compute bounds a step, the loop reaches at most about the "
            "rest), "
            "Triton answering "
            f"whole {share['whole_vs_loop']} (whole answers / the loop), the stream's responses "
            f"{share['stream_vs_whole']} (stream / whole).",
        ]
    return [*lines, ""]
