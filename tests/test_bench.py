"""`doit bench`: a real (short) benchmark run, and the honesty of its load generator."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from tasks import bench, loadgen, moe_bench, paths
from tests.helpers.project import doit_bench


def test_the_load_generator_counts_every_failure_and_times_only_good_answers():
    calls = []

    def work(state, text):
        calls.append(text)
        if len(calls) % 3 == 0:
            raise ConnectionError("server went away")
        return len(calls) % 3 == 1  # every third is a wrong answer, every third an exception

    point = loadgen.closed_loop(work, concurrency=2, seconds=0.3, texts=[("a",), ("b",)])
    assert point["requests"] + point["errors"] == len(calls)
    assert point["errors"] >= len(calls) * 2 // 3 - 2
    assert point["first_errors"] == ["ConnectionError: server went away"]
    assert 0.9 * point["requests"] / 0.3 <= point["throughput"] <= 1.5 * point["requests"] / 0.3


def test_no_good_answer_gives_null_statistics_not_nan():
    point = loadgen.closed_loop(lambda state, text: False, 1, 0.1, [("a",)])
    assert point["requests"] == 0 and point["errors"] > 0
    assert point["p50_ms"] is None and point["throughput"] == 0.0
    json.dumps(point, allow_nan=False)


def test_systems_compared_side_by_side_take_turns_and_pool_their_answers():
    order, texts = [], [(str(i),) for i in range(5)]

    def work_of(name, seconds):
        def work(state, text):
            order.append((name, text[0]))
            time.sleep(seconds * (1 + int(text[0])))
            return name != "b" or len(order) % 5 != 0  # b answers wrong now and then

        return None, work

    systems = {"a": work_of("a", 0.002), "b": work_of("b", 0.004)}
    found = loadgen.alternating(systems, concurrency=2, seconds=0.4, texts=texts, slices=4)
    names = [name for name, _ in order]
    turns = [name for i, name in enumerate(names) if i == 0 or names[i - 1] != name]
    assert turns == ["a", "b"] * 4  # A B A B: a moving load weighs on both alike
    for name, point in found.items():
        sent = [text for n, text in order if n == name]
        assert point["requests"] + point["errors"] == len(sent)
        assert 0.8 * point["requests"] / 0.4 <= point["throughput"] <= 1.5 * point["requests"] / 0.4
        counts = [sent.count(text) for (text,) in texts]  # each turn goes on where one stopped
        assert max(counts) - min(counts) <= 3, counts
    assert found["b"]["errors"] > 0 and found["a"]["errors"] == 0
    assert found["a"]["p50_ms"] < found["b"]["p50_ms"]


def test_a_system_in_turns_may_run_on_fewer_threads_and_its_turns_are_reported():
    """The decode limit takes turns beside 16 streams as one thread (a step of 16 rows is one
    call); each system's turns come back as windows that leave out their settling start."""
    lock, active, most = threading.Lock(), {"a": 0, "b": 0}, {"a": 0, "b": 0}

    def work_of(name):
        def work(state, text):
            with lock:
                active[name] += 1
                most[name] = max(most[name], active[name])
            time.sleep(0.01)
            with lock:
                active[name] -= 1
            return True

        return None, work

    systems = {"a": work_of("a"), "b": work_of("b")}
    windows: dict = {}
    began = time.perf_counter()
    loadgen.alternating(
        systems, 3, 0.3, [("x",)], slices=3, workers={"b": 1}, windows=windows, settle=0.05
    )
    assert most == {"a": 3, "b": 1}
    assert windows["a"][0][0] - began >= 0.05  # a turn settles before it counts
    for name in systems:
        assert len(windows[name]) == 3
        assert all(abs(end - start - 0.1) < 1e-9 for start, end in windows[name])
    starts = sorted((start, name) for name in systems for start, _ in windows[name])
    assert [name for _, name in starts] == ["a", "b"] * 3


def test_tokens_and_latencies_count_within_the_turns_settled_windows():
    """tokens_per_s counts the tokens made inside the windows (neither a turn's settling start
    nor its tail, with fewer clients left); latencies are those of requests begun inside."""
    from tasks import generation_bench

    def stream(began, ttft, gap, tokens):
        times = [began + ttft + gap * k for k in range(tokens)]
        return {"tokens": tokens, "times": times, "began": began, "ttft": ttft,
                "gaps": [gap] * (tokens - 1)}  # fmt: skip

    records = [
        stream(0.0, 0.5, 0.1, 4),  # begun while the turn settled: its 4 tokens come after
        stream(1.0, 0.02, 0.01, 10),  # 10 tokens inside the window
        stream(1.9, 0.02, 0.05, 10),  # 2 inside (1.92, 1.97), 8 after the deadline
        stream(10.0, 0.02, 0.01, 3),  # a second turn: all 3 inside
    ]
    found = generation_bench.token_figures(records, [(0.5, 2.0), (10.0, 11.0)])
    assert found["tokens"] == 27
    assert found["tokens_per_s"] == round((4 + 10 + 2 + 3) / 2.5, 1)
    assert found["ttft_p50_ms"] == 20.0 and found["ttft_p99_ms"] == 20.0
    assert found["itl_p99_ms"] == 50.0
    # the in-process in-flight loop, a record a step: its requests and prompts within too
    steps = [
        {"tokens": 3, "times": [0.6] * 3, "at": 0.6, "prompt_tokens": 7, "answered": 1},
        {"tokens": 2, "times": [2.5] * 2, "at": 2.5, "prompt_tokens": 5, "answered": 1},
    ]
    found = generation_bench.token_figures(steps, [(0.5, 2.0)])
    assert (found["tokens_per_s"], found["requests"], found["throughput"]) == (2.0, 1, 0.67)
    assert found["prompt_share"] == 0.7 and found["p50_ms"] is None
    # a whole answer's tokens count evenly over its request's time: 2 of 4 within the turn
    assert generation_bench.spread(1.0, 3.0, 4) == [1.5, 2.0, 2.5, 3.0]
    whole = [{"tokens": 4, "times": generation_bench.spread(1.0, 3.0, 4)}]
    assert generation_bench.token_figures(whole, [(0.0, 2.01)]) == {
        "tokens": 4, "tokens_per_s": round(2 / 2.01, 1)
    }  # fmt: skip


def test_at_concurrency_one_systems_go_in_step_and_what_one_adds_is_paired():
    order = []

    def work_of(name, extra):
        def work(state, text):
            order.append((name, text[0]))
            time.sleep(0.002 * (1 + int(text[0])) + extra)  # one text 2 ms, the next 4...
            return True

        return None, work

    texts = [(str(i),) for i in range(4)]
    systems = {"grpc": work_of("grpc", 0.0), "api": work_of("api", 0.003)}
    found = loadgen.in_step(systems, seconds=0.3, texts=texts)
    assert order[:4] == [("grpc", "0"), ("api", "0"), ("api", "1"), ("grpc", "1")]
    assert found["grpc"]["added_p50_ms"] == 0
    assert 2.5 <= found["api"]["added_p50_ms"] <= 4.5  # the 3 ms it adds, whatever the text
    assert found["api"]["requests"] == found["grpc"]["requests"] == len(order) // 2
    assert found["api"]["throughput"] < found["grpc"]["throughput"]


def test_clients_connect_before_the_clock_starts():
    def setup(state):
        time.sleep(0.2)  # a slow connection must not be measured
        state["ready"] = True

    point = loadgen.closed_loop(lambda state, text: state["ready"], 2, 0.2, [("a",)], setup)
    assert point["errors"] == 0 and point["p99_ms"] < 100


def test_an_answer_is_good_only_when_complete_and_finite():
    assert bench.good_answer([np.ones((1, 4)), np.array([[b"label"]], dtype=object)])
    assert not bench.good_answer([np.array([[np.nan]])])
    assert not bench.good_answer([None])
    assert not bench.good_answer([np.ones((2, 4))])  # one text sent, one row expected


def summary_has_openai(summary: dict) -> bool:
    return summary["openai_vs_triton"] > 0 and summary["openai_added_p50_ms"] is not None


@pytest.mark.server
def test_doit_bench_writes_its_three_reports(project, tiny_roberta_dir):
    run = doit_bench(
        project, "task=encode", f"model={tiny_roberta_dir}", "seq=1,16,128", "concurrency=1,2"
    )
    assert "bench: triton grpc concurrency 2:" in run.output
    report = json.loads(project.path(paths.bench_report("encode")).read_text())
    systems = {"triton", "openai", "onnxruntime", "onnxruntime_batched", "pytorch"}
    assert set(report["systems"]) == systems
    assert [p["concurrency"] for p in report["systems"]["openai"]] == [1, 2]  # its API
    assert summary_has_openai(report["summary"])
    batched = report["systems"]["onnxruntime_batched"]
    assert [p["concurrency"] for p in batched] == [1, 2]  # texts at a time
    summary = report["summary"]
    assert summary["triton_vs_onnxruntime_batched"] > 0 and summary["triton_vs_onnxruntime"] > 0
    assert set(summary["p50_ms_at_concurrency_1"]) == set(report["systems"])
    assert all(summary["p50_ms_at_concurrency_1"].values())
    assert [(p["protocol"], p["concurrency"]) for p in report["systems"]["triton"]] == [
        ("grpc", 1),
        ("grpc", 2),
        ("http", 1),
        ("http", 2),
    ]
    for points in report["systems"].values():
        for point in points:
            assert point["errors"] == 0 and point["throughput"] > 0
            assert point["p50_ms"] <= point["p95_ms"] <= point["p99_ms"]
    assert report["errors"] == 0 and report["machine"]["cpus"]
    assert report["settings"]["serving"]["queue_delay_us"] >= 0
    markdown = project.path(paths.bench_markdown("encode")).read_text()
    assert "| triton | grpc | 1 |" in markdown and "| pytorch | in-process | 1 |" in markdown
    assert "| openai | http | 1 |" in markdown and "Through the OpenAI API" in markdown
    assert "| onnxruntime_batched | in-process | 2 |" in markdown
    assert project.path(paths.bench_plot("encode")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    project.doit("task=encode", f"model={tiny_roberta_dir}", "seq=1,16,128", "clean")
    left = project.git("status", "--porcelain", "--ignored", "--untracked-files=all").splitlines()
    kept = (".doit.db", "__pycache__", ".secrets/")  # the admin secret is no build artifact
    assert [line for line in left if not any(k in line for k in kept)] == []


@pytest.mark.server
@pytest.mark.slow
def test_bench_on_generation_sends_only_prompts_the_deployment_takes(project, generation_models):
    """Generation refuses a prompt longer than the max seq: the bench must not count those
    refusals as the server's failures, nor let the baselines truncate them."""
    run = doit_bench(project, "task=causallm", f"model={generation_models['gpt2']}", "seq=1,16,32")
    assert "texts fit a prompt of 32 tokens" in run.output
    report = json.loads(project.path(paths.bench_report("causallm")).read_text())
    assert 0 < report["texts"] < 16 and report["errors"] == 0
    assert all(p["requests"] > 0 for points in report["systems"].values() for p in points)
    systems = report["systems"]  # every system at every concurrency (1 here), in turns
    assert [(p["protocol"], p["concurrency"]) for p in systems["triton"]] == [
        ("grpc_stream", 1), ("grpc", 1)
    ]  # fmt: skip
    [limit] = systems["onnxruntime_decode_limit"]  # batch = concurrency, a median step's
    assert (limit["concurrency"], limit["batch"]) == (1, 1) and limit["cache_length"] > 0
    assert limit["tokens_per_s"] == round(1000 / limit["p50_ms"], 1)
    assert limit["itl_p50_ms"] == limit["p50_ms"]
    assert [p["concurrency"] for p in systems["onnxruntime"]] == [1]
    [inflight] = systems["onnxruntime_inflight"]  # the server's loop, highest concurrency
    assert inflight["concurrency"] == 1 and inflight["tokens_per_s"] > 0
    assert report["targets"]["served_1_vs_served_1"]["value"] is None  # one level: no ratio
    assert set(report["gap"]) == {
        "concurrency", "loop_vs_decode_limit", "whole_vs_loop", "stream_vs_whole", "prompt_share"
    }  # fmt: skip
    assert 0 < report["gap"]["prompt_share"] < 1


def test_the_gap_to_the_decode_limit_splits_into_factors_of_the_same_run():
    """The figures of the bench run at 01:43 UTC on 2026-12-07 (AMD EPYC): the three factors
    multiply to the served stream's share of the decode limit."""
    from tasks import generation_bench

    def point(tokens, concurrency=16, protocol=None):
        return {"concurrency": concurrency, "tokens_per_s": tokens, "protocol": protocol}

    systems = {
        "triton": [
            point(185.4, 1, "grpc_stream"), point(636.7, 16, "grpc_stream"),
            point(228.2, 1, "grpc"), point(819.5, 16, "grpc"),
        ],
        "onnxruntime_inflight": [{**point(976.9), "prompt_share": 0.25}],
        "onnxruntime_decode_limit": [point(258.4, 1), point(1888.0)],
    }  # fmt: skip
    found = generation_bench.gap(systems)
    assert found == {
        "concurrency": 16,
        "loop_vs_decode_limit": 0.52,
        "whole_vs_loop": 0.84,
        "stream_vs_whole": 0.78,
        "prompt_share": 0.25,
    }
    served = generation_bench.targets(systems)["served_16_vs_decode_limit_16"]["value"]
    product = found["loop_vs_decode_limit"] * found["whole_vs_loop"] * found["stream_vs_whole"]
    assert abs(product - served) < 0.01


@pytest.mark.server
@pytest.mark.slow
def test_bench_on_a_mixture_of_experts_reports_the_fixed_loops_cost(project, decoder_models):
    """A mixtral the generic path exported: the report holds the fixed loop against top-k
    routing at each token count (their values are the machine's)."""
    model = f"model={decoder_models('mixtral')}"
    run = doit_bench(project, "task=causallm", model, "batch=1,4,8", "seq=1,32,64")
    report = json.loads(project.path(paths.bench_report("causallm")).read_text())
    moe = report["moe_dense_vs_topk"]
    assert moe["block"] == "MixtralSparseMoeBlock" and moe["threads"] == 1
    assert [p["tokens"] for p in moe["points"]] == list(moe_bench.TOKENS)
    assert all(p["topk_ms"] > 0 and p["fixed_loop_ms"] > 0 for p in moe["points"])
    assert "Mixture of experts: MixtralSparseMoeBlock" in run.output


@pytest.mark.server
@pytest.mark.slow
def test_bench_with_perf_analyzer_reports_its_points(project, tiny_roberta_dir):
    """NVIDIA's perf_analyzer, fetched once from the tritonclient wheel of the server's
    release (into the user's cache: the only test that needs the network, once)."""
    variables = ("task=encode", f"model={tiny_roberta_dir}", "seq=1,16,128")
    run = project.doit(*variables, "repo")  # built first: a failed fetch must be the fetch's
    try:
        run = doit_bench(project, *variables, "loadgen=perf_analyzer", "seconds=0.6")
    except AssertionError as failed:
        if "could not download tritonclient==" in str(failed):
            pytest.skip("no network to fetch perf_analyzer from PyPI (loadgen=python works)")
        raise
    assert "bench: triton grpc (perf_analyzer) concurrency 1:" in run.output
    report = json.loads(project.path(paths.bench_report("encode")).read_text())
    assert report["load_generator"].startswith("NVIDIA perf_analyzer 2.51.0")
    points = report["systems"]["triton"]
    assert [(p["protocol"], p["concurrency"]) for p in points] == [("grpc", 1), ("http", 1)]
    assert all(p["throughput"] > 0 and p["p50_ms"] <= p["p99_ms"] for p in points)
