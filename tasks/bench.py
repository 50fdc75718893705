"""Stage `bench`: what users get, measured. The served ensemble (text in, over the network,
gRPC and HTTP) against what they would run instead, on the same texts, in one run:

- `triton`: our load generator on tritonclient (Python threads, one text per request, a
  closed loop per worker): a concurrency sweep with a fixed time per point, every response
  checked (every output present, one row, finite numbers), errors counted; or, with
  `loadgen=perf_analyzer`, NVIDIA's C++ load generator (tasks/perf_analyzer.py), which takes
  next to no CPU from the server it measures;
- `onnxruntime`: the same tokenizer and ONNX file in-process, the same concurrency (threads
  calling one session): the limit for the CPU backend;
- `onnxruntime_batched` (encoder tasks, every backend): the compute limit the server is
  measured against:
  in-process, the same texts `concurrency` at a time, tokenized and grouped by length as the
  served pipeline groups requests that arrive together (triton/tokenizer/encoding.py), each
  group one ONNX Runtime call;
- `pytorch`: the Hugging Face model in-process, one request at a time;
- `moe_dense_vs_topk` (a mixture-of-experts decoder the generic path exported): one MoE block
  in PyTorch on one thread, the exported fixed loop against top-k routing (tasks/moe_bench.py).

Writes model_zoo/<name>/bench/report.json, report.md and throughput.png.
"""

from __future__ import annotations

import itertools
import platform
import time

from tasks import artifacts, catalog, generation_bench, moe_bench, openai_bench, paths
from tasks.errors import BuildError, fails_cleanly
from tasks.facts import checkpoint_facts
from tasks.loadgen import WARMUP_SECONDS, closed_loop, summarize
from tasks.settings import Settings, current


def bench_texts(settings: Settings) -> list[tuple[str, ...]]:
    """Realistic inputs of mixed lengths: one text per ensemble input, per request.

    Generation refuses a prompt it would have to cut (never truncates it), so on a generation
    task only the texts this deployment takes are sent, by every system alike."""
    spec = settings.task
    sentences = list(catalog.SAMPLE_TEXTS)
    texts = [*sentences, *(" ".join(sentences[i : i + n]) for n in (2, 4) for i in range(4))]
    if len(spec.text_inputs) == 2:
        return [(q, t) for q, t in zip(itertools.cycle(catalog.SAMPLE_QUESTIONS), texts)]
    if not spec.generation:
        return [(t,) for t in texts]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(paths.source_tokenizer(settings.name)))
    tokenizer.no_truncation()  # count as the served tokenizer does
    tokenizer.no_padding()
    longest, why = settings.seq.max, "seq=MIN,OPT,MAX"
    positions = checkpoint_facts(settings.name)["max_positions"]
    if spec.generation == "causal" and positions and positions - new_tokens(settings) < longest:
        longest = positions - new_tokens(settings)
        why = f"the model's {positions} positions less {new_tokens(settings)} new tokens"
    fitting = [(t,) for t in texts if len(tokenizer.encode(t).ids) <= longest]
    if not fitting:
        raise BuildError(
            f"no benchmark text fits a prompt of {longest} tokens ({why}); "
            "bench a deployment built with a larger MAX, or a model with more positions"
        )
    print(f"bench: {len(fitting)} of {len(texts)} texts fit a prompt of {longest} tokens")
    return fitting


def new_tokens(settings: Settings) -> int:
    """New tokens per request on a generation task, every system alike."""
    return min(catalog.BENCH_NEW_TOKENS, settings.max_new_tokens)


def good_answer(arrays: list) -> bool:
    """Every output present, one row, finite numbers or decodable text."""
    import numpy as np

    for array in arrays:
        if array is None or len(array) != 1:
            return False
        if array.dtype == object:
            for value in array.reshape(-1):
                value.decode("utf-8")  # raises on bytes that are not text
        elif not np.isfinite(array).all():
            return False
    return True


def triton_work(settings: Settings, protocol: str, url: str):
    """One request through the ensemble, its answer checked."""
    import numpy as np

    if protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    spec, outputs = settings.task, settings.task.answers

    def setup(state: dict) -> None:
        from tasks.server import authorize

        state["client"] = client_module.InferenceServerClient(url)
        authorize(state["client"], protocol)
        state["close"] = state["client"].close

    def work(state: dict, text: tuple[str, ...]) -> bool:
        inputs = []
        for name, value in zip(spec.text_inputs, text):
            tensor = client_module.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[value.encode()]], dtype=object))
            inputs.append(tensor)
        if spec.generation:
            tensor = client_module.InferInput("MAX_NEW_TOKENS", [1, 1], "INT32")
            tensor.set_data_from_numpy(np.array([[new_tokens(settings)]], dtype=np.int32))
            inputs.append(tensor)
        result = state["client"].infer(settings.name, inputs)
        return good_answer([result.as_numpy(name) for name in outputs])

    return setup, work


def onnxruntime_work(settings: Settings):
    """The same tokenizer and ONNX file(s) in-process: what the CPU backend can do at best."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(paths.source_tokenizer(settings.name)))
    tokenizer.no_padding()  # as the served tokenizer: a tokenizer.json may pad to a fixed length
    tokenizer.enable_truncation(max_length=settings.seq.max)
    artifacts.load_runtime("runtime", "runtime.py").keep_heap()  # as every session of ours
    session = ort.InferenceSession(str(settings.model_file()), providers=["CPUExecutionProvider"])
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    names = [i.name for i in session.get_inputs()]

    def infer(state: dict, text: tuple[str, ...]) -> bool:
        encoding = tokenizer.encode(*text)
        feed = {n: np.array([getattr(encoding, fields[n])], dtype=np.int64) for n in names}
        return good_answer(session.run(None, feed))

    return infer


def batched_sweep(settings: Settings, texts: list) -> list[dict]:
    """`onnxruntime_batched`: each point takes the texts `concurrency` at a time (what that
    many clients send together) and runs them as the served pipeline would: one tokenizer
    call, groups by length, one ONNX Runtime call per group. Latency is per chunk."""
    import numpy as np
    import onnxruntime as ort

    from tasks.pbtxt import tokenizer_parameters

    runtime = artifacts.load_runtime("runtime", "runtime.py")
    encoding = artifacts.load_runtime("tokenizer", "encoding.py")
    values = {k: str(v) for k, v in tokenizer_parameters(settings, checkpoint_facts(settings.name))}
    params = runtime.Parameters(values, f"{settings.name} (bench)")
    encoder = encoding.TextEncoder(
        str(paths.source_tokenizer(settings.name)), params, settings.task.text_inputs,
        settings.batch.max,
    )  # fmt: skip
    serving = settings.serving  # as triton/pipeline/model.py makes its session
    options = runtime.session_options(serving.ort_threads, serving.ort_spin)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(settings.model_file()), options, providers=["CPUExecutionProvider"]
    )
    feeds = [(i.name, encoding.numpy_type(i.type)) for i in session.get_inputs()]
    waste = settings.serving.batch_waste

    def run_chunk(chunk: list) -> bool:
        items = [encoder.items([[text] for text in request]) for request in chunk]
        encoded = encoder.encode(items)
        if any(isinstance(e, encoding.RequestError) for e in encoded):
            return False  # the server refuses such a text too: an error, never a crash
        lengths, rows = [e.length for e in encoded], [len(e.rows) for e in encoded]
        for group in encoding.length_groups(lengths, rows, waste, settings.batch.max):
            longest = max(lengths[i] for i in group)
            arrays = [encoder.arrays(encoded[i], feeds, longest) for i in group]
            feed = {n: np.concatenate([a[n] for a in arrays]) for n, _ in feeds}
            if not good_answer([value[:1] for value in session.run(None, feed)]):
                return False
        return True

    points = []
    for size in settings.bench.concurrency:
        chunks = [
            [texts[(start + k) % len(texts)] for k in range(size)] for start in range(len(texts))
        ]
        for chunk in chunks[:2]:  # warm up
            run_chunk(chunk)
        latencies, errors, began = [], 0, time.perf_counter()
        for chunk in itertools.cycle(chunks):
            if time.perf_counter() - began >= settings.bench.seconds:
                break
            start = time.perf_counter()
            good = run_chunk(chunk)
            latencies += [time.perf_counter() - start] if good else []
            errors += 0 if good else size
        elapsed = time.perf_counter() - began
        point = summarize(latencies, elapsed, errors, size)
        point["requests"] = len(latencies) * size  # texts answered
        point["throughput"] = round(point["requests"] / elapsed, 2) if elapsed > 0 else 0.0
        points.append(point)
        print(
            f"bench: onnxruntime_batched, {size} texts at a time: {point['throughput']:.1f} "
            f"texts/s, p50 {point['p50_ms']} ms per chunk",
            flush=True,
        )
    return points


def pytorch_work(settings: Settings):
    """The Hugging Face model in-process, as a user would run it instead."""
    import torch
    import transformers

    source = paths.source_dir(settings.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = getattr(transformers, settings.task.auto_class).from_pretrained(source).eval()

    def infer(state: dict, text: tuple[str, ...]) -> bool:
        batch = tokenizer(*text, truncation=True, max_length=settings.seq.max, return_tensors="pt")
        with torch.inference_mode():
            if settings.task.generation:
                out = model.generate(
                    **batch,
                    max_new_tokens=new_tokens(settings),
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or 0,
                )
                return out.shape[0] == 1
            out = model(**batch)
        return all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v))

    return infer


def accuracy(name: str) -> dict:
    """What a deployment's parity proved: its precision, and its gates if it is quantized."""
    report = artifacts.read_json(paths.parity_report(name))
    found = report.get("results") if isinstance(report.get("results"), dict) else {}
    gates = (
        found.get("gates")
        or report.get("gated", {}).get("gates")  # fp16: element-wise, and its gates
        or report.get("generation", {}).get("gates")
    )
    return {"precision": report.get("precision"), "gates": gates or "element-wise (atol)"}


def compare_against(settings: Settings, served: list[dict], grpc_url: str, url: str, texts):
    """`against=NAME`: the same texts, concurrency and protocol (gRPC) through another
    deployment of the same task in the same server (say fp32 beside int8): the speedup of this
    one over it, and each one's accuracy, side by side."""
    from dataclasses import replace

    from tasks.server import http_ready

    other = settings.bench.against
    if not other:
        return {}
    wiring = {n: paths.wiring_report(n) for n in (settings.name, other)}
    if not http_ready(url, other) or not wiring[other].is_file():
        raise BuildError(
            f"against={other}: no such deployment is served from models/; build it first "
            f"(doit task={settings.task.name} name={other} ...)"
        )
    ours, theirs = (artifacts.read_json(wiring[n])["inputs"] for n in (settings.name, other))
    if ours != theirs:
        raise BuildError(
            f"against={other}: it takes {theirs}, {settings.name} takes {ours}; compare two "
            "deployments of the same task"
        )
    setup, work = triton_work(replace(settings, name=other), "grpc", grpc_url)
    points = sweep(
        f"triton {other} grpc", work, settings.bench.concurrency, settings.bench.seconds,
        texts, {"protocol": "grpc"}, setup,
    )  # fmt: skip
    mine = [p for p in served if p.get("protocol") == "grpc"]

    def best(found: list[dict]) -> float:
        return max((p["throughput"] for p in found), default=0.0)

    def single(found: list[dict]):
        return next((p["p50_ms"] for p in found if p["concurrency"] == 1), None)

    result = {
        "deployment": other,
        "points": points,
        "best_throughput": {settings.name: best(mine), other: best(points)},
        "p50_ms_at_concurrency_1": {settings.name: single(mine), other: single(points)},
        "speedup": round(best(mine) / best(points), 2) if best(points) else None,
        "accuracy": {settings.name: accuracy(settings.name), other: accuracy(other)},
    }
    print(
        f"bench: {settings.name} against {other} (gRPC): {result['best_throughput']} req/s "
        f"best, speedup {result['speedup']}x",
        flush=True,
    )
    return result


def overload_point(settings: Settings, served: list[dict], url: str, texts: list) -> dict:
    """gRPC at 4x the concurrency of the best served throughput: what accepted requests wait
    (p99) against the p99 at that capacity, how many are rejected (max_queue) and how fast."""
    grpc = [p for p in served if p.get("protocol") == "grpc" and p.get("throughput")]
    if not grpc:
        return {}
    capacity = max(grpc, key=lambda p: p["throughput"])
    concurrency = 4 * capacity["concurrency"]
    setup, work = triton_work(settings, "grpc", url)
    # a rejected client retries after what a request takes at capacity, not at once: at once,
    # two cores spend themselves on rejections (measured: 99% rejected, 24 answers/s)
    backoff = (capacity.get("p50_ms") or 0) / 1000
    point = closed_loop(work, concurrency, settings.bench.seconds, texts, setup, backoff)
    found = {
        "max_queue": settings.serving.max_queue,
        "queue_timeout_ms": settings.serving.queue_timeout_ms,
        "capacity_concurrency": capacity["concurrency"],
        "retry_after_ms": round(backoff * 1000, 2),
        "capacity_p99_ms": capacity.get("p99_ms"),
        **point,
    }
    if point["p99_ms"] and capacity.get("p99_ms"):
        found["accepted_p99_vs_capacity"] = round(point["p99_ms"] / capacity["p99_ms"], 2)
    print(
        f"bench: overload, gRPC concurrency {concurrency} (4x {capacity['concurrency']}): "
        f"{point['throughput']:.1f} answers/s, accepted p99 {point['p99_ms']} ms (at capacity "
        f"{capacity.get('p99_ms')} ms), rejected {point.get('rejected_share', 0):.0%} in "
        f"{point.get('reject_p50_ms')} ms (p50)",
        flush=True,
    )
    return found


def sweep(
    name: str, work, levels, seconds: float, texts: list, extra: dict, setup=None
) -> list[dict]:
    points = []
    for concurrency in levels:
        closed_loop(work, concurrency, min(WARMUP_SECONDS, seconds), texts, setup)  # warm up
        point = {**extra, **closed_loop(work, concurrency, seconds, texts, setup)}
        points.append(point)
        print(
            f"bench: {name} concurrency {concurrency}: {point['throughput']:.1f} req/s, "
            f"p50 {point['p50_ms']} ms, p95 {point['p95_ms']} ms, {point['errors']} errors",
            flush=True,
        )
    return points


def machine() -> dict:
    import os

    memory = None
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as handle:
            memory = handle.readline().split()[1] + " kB"
    processor = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):  # the model name: measurements differ between them
        with open("/proc/cpuinfo") as handle:
            names = [
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            ]
        processor = names[0] if names else processor
    return {
        "cpus": os.cpu_count(),
        "processor": processor,
        "memory": memory,
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def interrupt(*_) -> None:
    raise KeyboardInterrupt  # SIGTERM: the servers the bench started stop in `finally`


def run(settings: Settings) -> None:
    import signal

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        measure(settings)
    finally:
        signal.signal(signal.SIGTERM, previous)


def measure(settings: Settings) -> None:
    from tasks.server import http_ready, make_server

    bench, endpoints = settings.bench, settings.endpoints
    texts = bench_texts(settings)
    url = f"{endpoints.host}:{endpoints.http_port}"
    grpc_url = f"{endpoints.host}:{endpoints.grpc_port}"
    server = None
    if http_ready(url):
        if not http_ready(url, settings.name):
            raise BuildError(
                f"the Triton server at {url} does not serve '{settings.name}'; "
                "stop it, or bench on other ports (http_port=... grpc_port=...)"
            )
        print(
            f"bench: reusing the Triton server at {url}, which serves '{settings.name}'", flush=True
        )
    else:
        if settings.storage.location is not None:  # a missing bucket in one line, as serve
            from tasks import storage

            storage.check_published(settings.storage.location)
        server = make_server(endpoints, repo=settings.storage.repo).start()  # docker, replicas
    systems: dict[str, list] = {
        name: [] for name in ("triton", "openai", "onnxruntime", "onnxruntime_batched", "pytorch")
    }
    mix = generation_bench.workload(settings, texts) if settings.task.generation else []
    try:
        if mix:  # tokens per second, time to first token, inter-token latency
            systems.update(generation_bench.served(settings, grpc_url, mix))
            overload, comparison = {}, {}
        else:
            overload, comparison = served_sweeps(settings, systems, url, grpc_url, texts)
            # the same requests through the OpenAI API (generation's served figures are a
            # stream's, which the API's whole answers are not comparable with)
            systems["openai"] = openai_bench.measure(
                settings,
                grpc_url,
                texts,
                new_tokens(settings),
                triton_work(settings, "grpc", grpc_url),
                server,
            )
    finally:
        if server is not None:
            server.stop()
    if not mix:
        systems["onnxruntime"] = sweep(
            "onnxruntime in-process",
            onnxruntime_work(settings),
            bench.concurrency,
            bench.seconds,
            texts,
            {},
        )
        systems["onnxruntime_batched"] = batched_sweep(settings, texts)
    systems["pytorch"] = sweep(
        "pytorch in-process, one at a time", pytorch_work(settings), [1], bench.seconds, texts, {}
    )
    moe = moe_bench.measure(settings) if mix else None
    points = [p for found in systems.values() for p in found]
    errors = sum(p["errors"] + p.get("grpc_beside", {}).get("errors", 0) for p in points)
    errors += overload.get("errors", 0)
    report = {
        "deployment": settings.name,
        "task": settings.task.name,
        "load_generator": load_generator(bench.loadgen),
        "texts": len(texts),
        "seconds_per_point": bench.seconds,
        "systems": systems,
        "summary": summary(systems),
        "overload": overload,
        "comparison": comparison,
        **(
            {
                "targets": generation_bench.targets(systems),
                "gap": generation_bench.gap(systems),
                "workload": len(mix),
            }
            if mix
            else {}
        ),
        **({"moe_dense_vs_topk": moe} if moe else {}),
        "errors": errors,
        "machine": machine(),
        "settings": {
            "batch": settings.batch.points(),
            "seq": settings.seq.points(),
            "backend": settings.backend,
            "precision": settings.precision,
            "serving": settings.serving.as_dict(),
            "repo": settings.storage.repo,
            "replicas": settings.endpoints.replicas,
        },
        # replicas=N: each replica restarted while the bench ran (killed: what failed with it)
        "restarts": list(getattr(server, "restarts", [])),
        "versions": artifacts.versions(
            "tritonclient", "nvidia-pytriton", "onnxruntime", "torch", "transformers"
        ),
    }
    write_reports(settings.name, report)
    if errors:
        raise BuildError(
            f"{errors} requests failed during the benchmark; see "
            f"{paths.bench_report(settings.name).relative_to(paths.ROOT)}"
        )


def served_sweeps(settings: Settings, systems: dict, url: str, grpc_url: str, texts) -> tuple:
    """The served ensemble over gRPC and HTTP (an encoder task), then its overload point and
    the `against=` comparison."""
    bench = settings.bench
    for protocol, address in (("grpc", grpc_url), ("http", url)):
        if bench.loadgen == "perf_analyzer":
            from tasks import perf_analyzer

            systems["triton"] += perf_analyzer.sweep(
                settings, protocol, address, texts, new_tokens(settings)
            )
            continue
        setup, work = triton_work(settings, protocol, address)
        systems["triton"] += sweep(
            f"triton {protocol}",
            work,
            bench.concurrency,
            bench.seconds,
            texts,
            {"protocol": protocol},
            setup,
        )
    overload = overload_point(settings, systems["triton"], grpc_url, texts)
    return overload, compare_against(settings, systems["triton"], grpc_url, url, texts)


def load_generator(loadgen: str) -> str:
    if loadgen == "perf_analyzer":
        from tasks.perf_analyzer import LOAD_GENERATOR

        return LOAD_GENERATOR
    return (
        "llm-in-triton's own, on tritonclient: Python threads, one text per request, closed "
        "loop per worker, every response checked"
    )


def summary(systems: dict) -> dict:
    """Best throughput per system, the served one against each in-process one, and p50 at
    concurrency 1 (gRPC for the served); generation adds new tokens per second."""
    best = {
        name: max((p["throughput"] for p in points), default=0.0)
        for name, points in systems.items()
    }

    def ratio(other: str):
        return round(best["triton"] / best[other], 2) if best.get(other) else None

    single = {
        name: next((p["p50_ms"] for p in points if p["concurrency"] == 1), None)
        for name, points in systems.items()
    }
    single["triton"] = next(
        (
            p["p50_ms"]
            for p in systems["triton"]
            if p["concurrency"] == 1 and p.get("protocol") == "grpc"
        ),
        None,
    )
    found = {
        "best_throughput": best,
        "triton_vs_onnxruntime": ratio("onnxruntime"),
        "triton_vs_onnxruntime_batched": ratio("onnxruntime_batched"),
        "triton_vs_pytorch": ratio("pytorch"),
        "p50_ms_at_concurrency_1": single,
    }
    openai = systems.get("openai") or []  # against gRPC measured beside each of its points
    beside = [p["grpc_beside"] for p in openai if p.get("grpc_beside", {}).get("throughput")]
    at_one = next((p for p in openai if p["concurrency"] == 1), {})
    if beside and at_one.get("added_p50_ms") is not None:
        found["openai_vs_triton"] = round(best["openai"] / max(b["throughput"] for b in beside), 2)
        found["openai_added_p50_ms"] = at_one["added_p50_ms"]
    tokens = {
        name: max(p["tokens_per_s"] for p in points if "tokens_per_s" in p)
        for name, points in systems.items()
        if any("tokens_per_s" in p for p in points)  # a system without a figure has none
    }
    if tokens:
        found["best_tokens_per_second"] = tokens
    return found


def write_reports(name: str, report: dict) -> None:
    artifacts.write_json(paths.bench_report(name), report)
    lines = [
        f"# Benchmark: {name} ({report['task']})",
        "",
        f"{report['load_generator']}; {report['seconds_per_point']} s per point, "
        f"{report['texts']} texts of mixed lengths; machine: {report['machine']['cpus']} "
        f"CPUs, {report['machine']['processor']}.",
        "",
        "| system | protocol | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, points in report["systems"].items():
        for p in points:
            lines.append(
                f"| {system} | {p.get('protocol', 'in-process')} | {p['concurrency']} | "
                f"{p['throughput']} | {p['p50_ms']} | {p['p95_ms']} | {p['p99_ms']} | "
                f"{p['errors']} |"
            )
    s = report["summary"]
    lines += [
        "",
        f"Best served throughput / in-process ONNX Runtime: {s['triton_vs_onnxruntime']}; "
        f"/ ONNX Runtime batched as the server batches: {s['triton_vs_onnxruntime_batched']}; "
        f"/ PyTorch one at a time: {s['triton_vs_pytorch']}. p50 at concurrency 1 (ms): "
        f"{s['p50_ms_at_concurrency_1']}.",
        "",
    ]
    if report["settings"]["replicas"] > 1:
        restarts = report["restarts"]
        restarted = "; ".join(
            f"replica {r['replica']} (pid {r['pid']}) back in {r['seconds']} s" for r in restarts
        )
        lines[-1:-1] = [
            f"{report['settings']['replicas']} replicas behind nginx; restarted while measured: "
            f"{restarted or 'none'}.",
            "",
        ]
    if "openai_vs_triton" in s:  # the OpenAI API in front of the same server
        lines[-1:-1] = [
            f"Through the OpenAI API: {s['openai_vs_triton']}x the best Triton gRPC "
            f"throughput, {s['openai_added_p50_ms']} ms added to a request at concurrency 1 "
            "(p50; gRPC measured beside each API point, the same concurrency and texts, in "
            "turns: at concurrency 1 request by request).",
            "",
        ]
    if "best_tokens_per_second" in s:  # generation
        lines[-1:-1] = [f"Best new tokens per second: {s['best_tokens_per_second']}.", ""]
        lines += generation_bench.report_lines(report)
    if "moe_dense_vs_topk" in report:
        lines += [f"Mixture of experts: {moe_bench.report_line(report['moe_dense_vs_topk'])}.", ""]
    if report.get("comparison"):
        c = report["comparison"]
        lines += ["| deployment | best req/s (gRPC) | p50 at 1 (ms) | precision | accuracy |"]
        lines.append("|---|---|---|---|---|")
        for deployment, found in c["accuracy"].items():
            gates = found["gates"]
            shown = (
                gates
                if isinstance(gates, str)
                else "; ".join(f"{g['metric']} {g['value']} ({g['gate']})" for g in gates)
            )
            lines.append(
                f"| {deployment} | {c['best_throughput'][deployment]} | "
                f"{c['p50_ms_at_concurrency_1'][deployment]} | {found['precision']} | {shown} |"
            )
        lines += ["", f"Speedup of {name} over {c['deployment']}: {c['speedup']}x.", ""]
    artifacts.write_text(paths.bench_markdown(name), "\n".join(lines))
    plot(report, paths.bench_plot(name))
    print(
        f"bench: {paths.bench_markdown(name).relative_to(paths.ROOT)}\n" + "\n".join(lines),
        flush=True,
    )


def plot(report: dict, target) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = {}
    for system, points in report["systems"].items():
        for p in points:
            label = f"{system} {p['protocol']}" if "protocol" in p else system
            series.setdefault(label, []).append(p)
    for label, points in series.items():
        x = [p["concurrency"] for p in points]
        style = "o-" if len(points) > 1 else "s"
        nan = float("nan")  # a point without an answer has no latency
        left.plot(x, [p["throughput"] for p in points], style, label=label)
        right.plot(x, [nan if p["p95_ms"] is None else p["p95_ms"] for p in points], style)
    for axis, title in ((left, "throughput (requests/s)"), (right, "p95 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle(f"{report['deployment']} ({report['task']}), {report['machine']['cpus']} CPUs")
    figure.tight_layout()
    with artifacts.atomic_target(target) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def task_bench():
    """Benchmark the served ensemble (gRPC, HTTP) against ONNX Runtime and PyTorch in-process."""
    settings = current()
    targets = [
        paths.bench_report(settings.name),
        paths.bench_markdown(settings.name),
        paths.bench_plot(settings.name),
    ]
    modules = [  # the code that decides the report (it is rewritten on every run anyway)
        "bench",
        "facts",  # max_positions, pad id
        "pbtxt",  # the tokenizer parameters of the in-process batching
        *(
            ["generation_parity", "generation_bench", "moe_bench", "export_torch"]
            if settings.task.generation
            else []
        ),
        *(["perf_analyzer"] if settings.bench.loadgen == "perf_analyzer" else []),
        "openai_bench",
    ]
    return {
        "actions": [(fails_cleanly(run), [settings])],
        "task_dep": ["repo"],
        "file_dep": [paths.stage_module(m) for m in modules],
        "targets": targets,
        "uptodate": [False],
        "clean": [(artifacts.remove_artifacts, [targets])],
    }
