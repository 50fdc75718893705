"""The deployments of `served` (tests/helpers/serving.py) served together by a real
tritonserver, queried over HTTP and gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tasks import paths
from tests.helpers.client import Client, infer, raw_request, text_array
from tests.helpers.models import MARKERS
from tests.helpers.project import OFFLINE_ENV
from tests.helpers.serving import SERVED_MODELS, SERVED_SHAPES, counted, kill_stubs_and_wait

pytestmark = pytest.mark.server

TEXTS = [
    "Triton serves the model.",
    "Hi.",
    "Ce modèle encode des phrases; ça marche.",
    "東京は日本の首都です。",
    "a text longer than the max sequence " * 30,
]
QUESTIONS = ["Who met whom?", "Was ist das?", "Wo?"]
CONTEXTS = [f"Ann met the {MARKERS[0]} and the {MARKERS[1]}.", "Das ist ein Haus.", "Hier."]


def reference(project, task: str, first: list[str], second: list[str] | None = None):
    """The PyTorch model in-process, from the checkpoint the build used (head included)."""
    import torch
    import transformers

    from tasks import catalog

    source = project.path(paths.source_dir(task))
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = getattr(transformers, catalog.TASKS[task].auto_class).from_pretrained(source).eval()
    batch = tokenizer(
        first,
        second,
        padding=True,
        truncation="only_second" if second else True,
        max_length=128,
        return_tensors="pt",
    )
    with torch.inference_mode():
        return batch["attention_mask"].numpy().astype(bool), model(**batch)


def close(served_array, reference_array, mask=None):
    reference_array = np.asarray(reference_array)
    if mask is not None:
        served_array, reference_array = served_array[mask], reference_array[mask]
    np.testing.assert_allclose(served_array, reference_array, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_encode_answers_as_pytorch_does(served, protocol):
    from tasks.compare import mean_pooled

    project, server = served
    out = infer(server, protocol, "encode", {"TEXT": TEXTS})
    mask, reference_out = reference(project, "encode", TEXTS)
    hidden = reference_out.last_hidden_state
    assert out["HIDDEN_STATE"].shape == tuple(hidden.shape) == (len(TEXTS), 128, 384)
    close(out["HIDDEN_STATE"], hidden.numpy(), mask)
    import torch

    close(out["EMBEDDING"], mean_pooled(hidden, torch.from_numpy(mask.astype(np.int64))).numpy())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_seqcls_answers_with_pytorch_logits_and_a_label(served, protocol):
    project, server = served
    out = infer(server, protocol, "seqcls", {"TEXT": TEXTS})
    _, reference_out = reference(project, "seqcls", TEXTS)
    logits = reference_out.logits.numpy()
    close(out["LOGITS"], logits)
    labels = {0: "negative", 1: "positive"}
    assert [v[0].decode() for v in out["LABEL"]] == [labels[i] for i in logits.argmax(axis=1)]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    close(out["SCORE"][:, 0], probabilities.max(axis=1))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_qa_answers_with_pytorch_logits_and_the_answer_text(served, protocol):
    project, server = served
    out = infer(server, protocol, "qa", {"QUESTION": QUESTIONS, "CONTEXT": CONTEXTS})
    mask, reference_out = reference(project, "qa", QUESTIONS, CONTEXTS)
    close(out["START_LOGITS"], reference_out.start_logits.numpy(), mask)
    close(out["END_LOGITS"], reference_out.end_logits.numpy(), mask)
    answers = [v[0].decode() for v in out["ANSWER"]]
    assert answers[0] == f"{MARKERS[0]} and the {MARKERS[1]}"
    assert all(answer in context for answer, context in zip(answers, CONTEXTS))
    assert out["SCORE"][0, 0] > 0.99


def test_qa_finds_an_answer_near_the_end_of_a_context_three_times_the_max_seq(served):
    from transformers import AutoTokenizer

    project, server = served
    filler = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    context = f"{filler} and the secret is {MARKERS[0]} stripes and {MARKERS[1]} necks. The end."
    tokenizer = AutoTokenizer.from_pretrained(project.path(paths.source_dir("qa")))
    assert len(tokenizer(context)["input_ids"]) > 3 * 128
    out = infer(server, "http", "qa", {"QUESTION": ["What is the secret?"], "CONTEXT": [context]})
    assert out["ANSWER"][0, 0].decode() == f"{MARKERS[0]} stripes and {MARKERS[1]}"


def test_a_question_too_long_for_the_windows_is_a_bad_request(served):
    _, server = served
    long_question = "why " * 200
    error = raw_request(
        server,
        "qa",
        [
            ("QUESTION", [1, 1], "BYTES", np.array([[long_question.encode()]], dtype=object)),
            ("CONTEXT", [1, 1], "BYTES", text_array(1)),
        ],
    )
    assert "[400]" in error and "QUESTION has" in error and "may have at most" in error
    assert infer(server, "http", "qa", {"QUESTION": QUESTIONS[:1], "CONTEXT": CONTEXTS[:1]})


def test_every_deployment_in_the_repository_is_served(served):
    import tritonclient.http as httpclient

    _, server = served
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        for name in SERVED_MODELS:
            for model in (name, f"{name}_model"):  # the python backend's one hop
                assert client.is_model_ready(model), model
            assert not client.is_model_ready(f"{name}_tokenizer")
            steps = f"{name}_steps"  # one_hop=0: the steps native backends run
            for model in (steps, f"{steps}_tokenizer", f"{steps}_model", f"{steps}_post"):
                assert client.is_model_ready(model), model
    finally:
        client.close()


MIXED = {  # one word to over the max seq, sent together
    "encode": [{"TEXT": [t]} for t in ["Hi", *TEXTS, "word " * 200]],
    "seqcls": [{"TEXT": [t]} for t in ["Hi", *TEXTS, "word " * 200]],
    "qa": [
        {"QUESTION": [q], "CONTEXT": [c]}
        for q, c in [*zip(QUESTIONS, CONTEXTS), ("Who?", f"{CONTEXTS[0]} " + "filler " * 60)]
    ],
}


@pytest.mark.parametrize("task", sorted(MIXED))
@pytest.mark.parametrize("steps", ["", "_steps"], ids=["one_hop", "tokenizer_model_post"])
def test_concurrent_requests_of_very_different_lengths_get_their_answers_alone(served, task, steps):
    """Requests that arrive together run as padded batches: each answer, HIDDEN_STATE's shape
    included, is the one the request gets alone. In one hop the pipeline pads; in the steps
    of the native backends the tokenizer pads a call's requests to one length (so the model
    batches them) and the answer step cuts them back."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    _, server = served
    deployment = task + steps
    requests = MIXED[task] * 3
    alone = [infer(server, "grpc", deployment, r) for r in MIXED[task]]
    clients = [Client(server, "grpc") for _ in requests]  # connected before the burst
    start = threading.Barrier(len(requests))

    def send(index: int) -> dict:
        start.wait()  # all at once: the server sees them arrive together
        return clients[index].infer(deployment, requests[index])

    try:
        for _attempt in range(3):  # sharing needs arrivals within the queue delay
            before = model_counts(server, f"{deployment}_model")
            with ThreadPoolExecutor(len(requests)) as pool:
                together = list(pool.map(send, range(len(requests))))
            after = model_counts(server, f"{deployment}_model", before[0] + len(requests))
            inferences, executions = np.subtract(after, before)
            for index, answer in enumerate(together):  # every attempt answers right
                expected = alone[index % len(alone)]
                assert set(answer) == set(expected)
                for name, value in expected.items():
                    assert answer[name].shape == value.shape, (index, name)
                    if value.dtype == object:
                        assert answer[name].tolist() == value.tolist(), (index, name)
                    else:
                        np.testing.assert_allclose(answer[name], value, atol=1e-4, rtol=1e-3)
            if executions < len(requests):
                break
    finally:
        for client in clients:
            client.close()
    # rows (a QA context's windows each count) run in fewer calls: requests shared them
    assert inferences >= len(requests) and executions < len(requests)


def model_counts(server, model: str, at_least: int = 0) -> tuple[int, int]:
    """(requests answered, calls that answered them) by a model so far; with `at_least`, once
    the first reaches it (helpers.serving.counted)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)

    def read() -> tuple[int, int]:
        stats = client.get_inference_statistics(model)["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])

    try:
        return counted(read, lambda counts: counts[0] >= at_least)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("model", "inputs", "expected"),
    [
        (
            "encode",
            [("TEXTS", [1, 1], "BYTES", text_array(1))],
            "unexpected inference input 'TEXTS'",
        ),
        (
            "encode",
            [("TEXT", [1, 1], "INT32", np.array([[7]], dtype=np.int32))],
            "inference input 'TEXT' data-type is 'INT32', but model 'encode' expects 'BYTES'",
        ),
        ("encode", [("TEXT", [9, 1], "BYTES", text_array(9))], "batch-size must be <= 8"),
        ("qa", [("QUESTION", [1, 1], "BYTES", text_array(1))], "expected 2 inputs but got 1"),
    ],
    ids=["wrong-name", "wrong-datatype", "batch-too-big", "missing-input"],
)
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(
    served, model, inputs, expected
):
    _, server = served
    assert expected in raw_request(server, model, inputs)
    assert (
        raw_request(
            server,
            model,
            [
                (n, [1, 1], "BYTES", text_array(1))
                for n in (("TEXT",) if model == "encode" else ("QUESTION", "CONTEXT"))
            ],
        )
        == ""
    )


def run_client(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(paths.CLIENT), *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_client_prints_labels_answers_and_statistics(served):
    _, server = served
    out = run_client("-u", server.http_url, "-m", "seqcls", "-t", "I like it", "--statistics")
    assert "LABEL: object [1, 1]" in out and ("'negative'" in out or "'positive'" in out)
    assert "seqcls_model v1:" in out and "queue" in out and "infer" in out
    out = run_client(
        "--protocol",
        "grpc",
        "-u",
        server.grpc_url,
        "-m",
        "qa",
        "-i",
        "QUESTION:CONTEXT",
        "-t",
        QUESTIONS[0],
        "-t",
        CONTEXTS[0],
        "-o",
        "ANSWER",
    )
    assert f"[0] '{MARKERS[0]} and the {MARKERS[1]}'" in out
    out = run_client("-u", server.http_url, "-m", "encode", "-b", "3")
    assert "EMBEDDING: float32 [3, 384]" in out and "L2 norm 1.0000" in out


def free_ports() -> list[int]:
    from tasks.server import free_port

    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    return sorted(ports)


def start_serve(project, ports: list[int]) -> subprocess.Popen:
    http, grpc, metrics = ports
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "doit",
            "serve",
            f"http_port={http}",
            f"grpc_port={grpc}",
            f"metrics_port={metrics}",
            "openai_port=0",  # tests/test_openai_api.py serves the API on ports of its own
            "task=encode",
            *SERVED_SHAPES,
        ],
        cwd=project.root,
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} in:\n{''.join(seen)}")


@pytest.mark.slow  # 21 s; tests/test_access.py's doit serve stops on SIGTERM in the lean run
def test_serve_stops_cleanly_on_sigterm_and_starts_again(served):
    from tasks.server import port_is_free

    project, _ = served
    ports = free_ports()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        proc = start_serve(project, ports)
        try:
            out = read_until(proc, "serve: Ctrl-C stops the server")
            assert "EMBEDDING: float32 [1, 384]" in out  # it answered its sample request
            proc.send_signal(stop_signal)
            rest, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0, out + rest
        assert "tritonserver: stopped" in rest and "exit 0" in rest
        assert all(port_is_free("127.0.0.1", p) for p in ports)


def test_serve_stops_at_once_when_interrupted_while_starting(served):
    project, _ = served
    proc = start_serve(project, free_ports())
    try:
        read_until(proc, "tritonserver: starting")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "serve: interrupted while the server was starting" in out


def test_serve_reports_a_port_in_use_at_once(served):
    project, server = served
    started = time.monotonic()
    proc = start_serve(
        project, [server.ports["http"], *(p + 1000 for p in server.ports.values())][:3]
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"port {server.ports['http']} (http) is already in use on 127.0.0.1" in out
    assert time.monotonic() - started < 30


def test_serve_fails_within_seconds_with_the_reason_when_a_model_does_not_load(served):
    project, _ = served
    code = project.root / "models/encode_model/1/model.py"
    original = code.read_text()
    code.write_text(
        original.replace(
            "def initialize(self, args):",
            "def initialize(self, args):\n        raise RuntimeError('a model that cannot load')",
            1,
        )
    )
    try:
        started = time.monotonic()
        proc = start_serve(project, free_ports())
        out, _ = proc.communicate(timeout=120)
    finally:
        code.write_text(original)
    assert proc.returncode == 1
    assert "failed to load 'encode_model'" in out and "a model that cannot load" in out
    assert time.monotonic() - started < 60


def test_a_bad_request_among_good_ones_fails_alone(served):
    """One dynamic batch: the request the pipeline refuses gets its own error, the others
    their answers."""
    from concurrent.futures import ThreadPoolExecutor

    _, server = served
    good = {"QUESTION": QUESTIONS[:1], "CONTEXT": CONTEXTS[:1]}
    bad = [
        ("QUESTION", [1, 1], "BYTES", np.array([[b"why " * 200]], dtype=object)),
        ("CONTEXT", [1, 1], "BYTES", text_array(1)),
    ]
    with ThreadPoolExecutor(12) as pool:
        answers = [pool.submit(infer, server, "grpc", "qa", good) for _ in range(8)]
        errors = [pool.submit(raw_request, server, "qa", bad) for _ in range(4)]
        assert all(
            a.result()["ANSWER"].tolist() == [[f"{MARKERS[0]} and the {MARKERS[1]}".encode()]]
            for a in answers
        )
        assert all("QUESTION has" in e.result() for e in errors)


@pytest.mark.parametrize(
    "model", ["encode_model", "encode_steps_tokenizer", "encode_steps_model", "encode_steps_post"]
)
def test_a_killed_stub_is_replaced_and_its_deployment_answers_again(served, model):
    """SIGKILL of a python model's process (the OOM killer, a segfault): readiness says
    not-ready, the supervisor reloads the model, and the same answers come back."""
    _, server = served
    deployment = model.rsplit("_", 1)[0]
    before = infer(server, "grpc", deployment, {"TEXT": TEXTS[:2]})
    seconds = kill_stubs_and_wait(
        server, model, lambda: infer(server, "grpc", deployment, {"TEXT": TEXTS[:2]})
    )
    after = infer(server, "grpc", deployment, {"TEXT": TEXTS[:2]})
    np.testing.assert_allclose(after["EMBEDDING"], before["EMBEDDING"], atol=1e-5)
    assert seconds < 30
    assert [r["model"] for r in server.supervisor.recoveries if r["ok"]][-1] == model


def test_a_server_that_exits_on_its_own_is_started_again_on_its_ports(identity_repo, tmp_path):
    """tritonserver itself gone (Triton 2.51's python backend once aborted on a lock that a
    killed stub held in shared memory): the supervisor starts it again, on the same ports."""
    from tasks.server import EmbeddedTritonServer, http_ready

    log = tmp_path / "tritonserver.log"
    with EmbeddedTritonServer(identity_repo, log_file=log, quiet=True) as server:
        url, pid = server.http_url, server.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (server.restarts and http_ready(server.http_url, "identity")):
            assert time.monotonic() < deadline, "the server did not come back"
            time.sleep(0.1)
        assert server.http_url == url and server.pid != pid
        assert [r["reason"] for r in server.restarts] == ["the server exited on its own"]
        assert [r["cause"] for r in server.supervisor.recoveries] == []  # a new supervisor
