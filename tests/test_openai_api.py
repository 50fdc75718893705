"""The OpenAI-compatible API (triton/openai_api/) against a real tritonserver, with the official
`openai` client: chat and completions equal transformers' apply_chat_template + generate(),
embeddings equal the model's, errors come with their status, the process is kept alive."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tasks import artifacts
from tests.helpers.models import CHAT_TEMPLATE, save_chat_model, save_generation_model
from tests.helpers.project import OFFLINE_ENV, copy_project
from tests.helpers.serving import generation_outcomes, needs_nginx

pytestmark = pytest.mark.server

SHAPES = ("batch=1,4,8", "seq=1,32,64")
# a chat prompt is long in a 300-token vocabulary; its streams hold two tokens a response
# (stream_interval): the API's pieces must still add up to the whole answer
CHAT_SHAPES = ("batch=1,4,8", "seq=1,64,112", "stream_interval=2")
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The quick brown fox"},
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("chat-gpt2"))


@pytest.fixture(scope="module")
def chatting(tmp_path_factory, chat_dir):
    """A tiny GPT-2 with a chat template, served by Triton, and the API in front of it."""
    from tasks.server import EmbeddedTritonServer, OpenAIServer

    project = copy_project(tmp_path_factory.mktemp("openai") / "project")
    project.doit("task=causallm", f"model={chat_dir}", "name=chat", *CHAT_SHAPES)
    models = project.root / "models"
    with EmbeddedTritonServer(models, quiet=True) as server:
        from tasks.server import free_port

        log = tmp_path_factory.mktemp("api") / "api.log"
        with OpenAIServer(server.grpc_url, models, port=free_port(), log_file=log) as api:
            yield project, server, api


def client(api, key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=f"http://{api.url}/v1", api_key=key, max_retries=0)


def reference(model_dir: Path, messages, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """transformers: the chat template's prompt ids and greedy generate()'s new ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return prompt, out[0, len(prompt) :].tolist()


def decode(model_dir: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode(ids, skip_special_tokens=True)


def post(api, route: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """A raw request (what the openai client never sends: a malformed body)."""
    request = urllib.request.Request(
        f"http://{api.url}{route}",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_chat_whole_and_streamed_equal_the_chat_template_and_generate(chatting, chat_dir):
    _, _, api = chatting
    prompt, new = reference(chat_dir, MESSAGES, 6)
    expected = decode(chat_dir, new)
    answer = client(api).chat.completions.create(model="chat", messages=MESSAGES, max_tokens=6)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == ("stop" if len(new) < 6 else "length")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(new))
    assert answer.usage.total_tokens == len(prompt) + len(new)

    chunks = list(
        client(api).chat.completions.create(
            model="chat",
            messages=MESSAGES,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] is not None
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt)
    assert chunks[-1].usage.completion_tokens == len(new)


def test_a_stop_string_ends_the_answer_before_it(chatting, chat_dir):
    _, _, api = chatting
    _, new = reference(chat_dir, MESSAGES, 12)
    text = decode(chat_dir, new)
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if text[i : i + 2].strip())
    expected = text[: text.index(stop)]
    answer = client(api).chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=12, stop=[stop, "never seen"]
    )
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    streamed = client(api).completions.create(
        model="chat",
        prompt=render(chat_dir),  # the same prompt, as text
        max_tokens=12,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed) == expected


def render(model_dir: Path) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)


def test_a_seed_repeats_a_sample_and_n_gives_each_choice_its_own(chatting):
    _, _, api = chatting
    ask = dict(model="chat", prompt="The quick brown fox", max_tokens=8, temperature=1.0)
    once = client(api).completions.create(**ask, seed=7)
    again = client(api).completions.create(**ask, seed=7)
    assert once.choices[0].text == again.choices[0].text
    both = client(api).completions.create(**ask, seed=7, n=2)
    assert [c.index for c in both.choices] == [0, 1]
    second = client(api).completions.create(**ask, seed=8)
    # choice i samples with seed + i
    assert [c.text for c in both.choices] == [once.choices[0].text, second.choices[0].text]
    assert both.usage.completion_tokens == (
        once.usage.completion_tokens + second.usage.completion_tokens
    )
    assert both.usage.prompt_tokens == once.usage.prompt_tokens  # a prompt counts once


def test_bad_requests_get_their_status_and_the_server_keeps_serving(chatting):
    import openai

    _, _, api = chatting
    good = dict(model="chat", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as err:
        client(api).chat.completions.create(**{**good, "model": "nope"})
    assert err.value.code == "model_not_found"
    assert client(api).models.retrieve("chat").task == "causallm"
    cases = {  # field: the request's change
        "temperature": {"temperature": 5},
        "max_tokens": {"max_tokens": 10_000},
        "logprobs": {"logprobs": True},
        "tools": {"tools": [{"type": "function", "function": {"name": "f"}}]},
        "messages[0].role": {"messages": [{"role": "wizard", "content": "hi"}]},
    }
    for field, change in cases.items():
        with pytest.raises(openai.BadRequestError) as err:
            client(api).chat.completions.create(**{**good, **change})
        assert err.value.status_code == 400 and err.value.param == field, err.value
    with pytest.raises(openai.BadRequestError) as err:  # a causal LM makes no embeddings
        client(api).embeddings.create(model="chat", input="hi")
    assert "/v1/embeddings serves encode" in err.value.message
    status, body = post(api, "/v1/chat/completions", b'{"model": "chat", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    too_large = {"Content-Length": str(5 << 20)}  # over max_body_mb=4: refused unread
    status, body = post(api, "/v1/completions", b"{}", too_large)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = post(api, "/v1/completions", b'{"model": "chat", "prompt": "x", "user": "u"}')
    assert status == 200, body  # `user` is accepted and ignored
    assert client(api).chat.completions.create(**good).choices[0].message.content is not None


def test_an_api_key_is_required_when_one_is_set_and_sent_on_to_triton(
    chatting, tmp_path, monkeypatch
):
    """A Triton that takes inference with the key only, and the API in front of it: clients
    need the key as a Bearer token, and the API sends it on."""
    import openai

    from tasks.server import EmbeddedTritonServer, OpenAIServer, free_port

    models = chatting[0].root / "models"
    monkeypatch.setenv("LLM_IN_TRITON_API_KEY", "sesame")  # what the API process inherits
    log = tmp_path / "api.log"
    with (
        EmbeddedTritonServer(models, quiet=True, api_key="sesame") as server,
        OpenAIServer(server.grpc_url, models, port=free_port(), log_file=log) as api,
    ):
        with pytest.raises(openai.AuthenticationError) as err:
            client(api, "wrong").models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        answer = client(api, "sesame").completions.create(model="chat", prompt="A", max_tokens=2)
        assert answer.usage.completion_tokens >= 1  # Triton took the key the API sent on
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{api.url}/health", timeout=10) as reply:  # open to probes
            assert json.loads(reply.read())["deployments"]["chat"]["ready"] is True


def test_a_published_repository_is_read_at_the_version_its_configs_name(chatting, tmp_path):
    """As `doit publish` leaves a bucket (and k8s's pods copy it): version folders past 1,
    each config naming the one to serve. The API reads the tokenizer and chat template there."""
    import shutil

    from tasks.publish import published_config
    from tasks.server import OpenAIServer, free_port

    project, server, _ = chatting
    copy = tmp_path / "published"
    shutil.copytree(project.root / "models", copy, ignore=shutil.ignore_patterns("__pycache__"))
    for model in ("chat_stream", "chat_tokenizer"):
        (copy / model / "1").rename(copy / model / "3")
        config = copy / model / "config.pbtxt"
        config.write_text(published_config(config.read_text(), 3))
    log = tmp_path / "api.log"
    with OpenAIServer(server.grpc_url, copy, port=free_port(), log_file=log) as api:
        assert [m.id for m in client(api).models.list().data] == ["chat"], log.read_text()
        answer = client(api).chat.completions.create(model="chat", messages=MESSAGES, max_tokens=2)
        assert answer.usage.prompt_tokens > 0  # counted with the tokenizer of version 3
    assert "skipping" not in log.read_text()


LONG = {"model": "chat", "prompt": "The quick brown fox", "max_tokens": 112}  # the limit


def leave_early(api, body: dict, wait: float) -> float:
    """Ask `body` and go: after its first event (streamed), or after `wait` seconds (whole).
    Returns the seconds from the request to the socket's close."""
    began = time.monotonic()
    with raw_request(api.url, "/v1/completions", body) as sock:
        if body.get("stream"):
            received = b""
            while b"data: {" not in received:
                received += sock.recv(1 << 16)
                assert b"[DONE]" not in received
        else:
            time.sleep(wait)
    return time.monotonic() - began


def test_a_client_that_disconnects_stops_its_decoding_streamed_or_not(chatting):
    """Triton's own HTTP frontend cannot pass a disconnect on; the API cancels its call to the
    stream model (streamed), or to the generate model (whole: the ensemble's step), so the rows
    leave the batch: `cancelled` in Triton's metrics at once, and not run to their end."""
    _, server, api = chatting
    # more rows than the deployment's batch (8), so that they decode a batch after another,
    # long enough to leave in the middle on any machine: 16 streams (a request per choice), or
    # a whole answer of 64 rows (8 requests of 8 rows)
    streams = {**LONG, "n": 16, "stream": True}
    whole = {**LONG, "prompt": [LONG["prompt"]] * 4, "n": 16}
    cases = [("chat_stream", streams, 16), ("chat_generate", whole, 8)]
    for model, body, calls in cases:
        began = time.monotonic()  # uncancelled, it runs every step (and warms the path up)
        done = client(api).completions.create(**body)
        reasons = [c.choices[0].finish_reason for c in done] if body.get("stream") else []
        assert (reasons or [c.finish_reason for c in done.choices])[-1] == "length"
        seconds = time.monotonic() - began
        # on a loaded machine a first event can come late, with the generation nearly done:
        # only a client gone in the first half of the uncancelled time tells
        for _ in range(3):
            counts = generation_outcomes(server, model)
            before = {k: counts.get(k, 0) for k in ("cancelled", "finished")}
            logs = (len(server.log_path.read_text()), len(api.log_path.read_text()))
            if leave_early(api, body, seconds / 4) < seconds / 2:
                break
            time.sleep(seconds)  # its end, before the next try
        else:
            raise AssertionError(f"no first event in the first half of {seconds:.2f} s")
        left = time.monotonic()
        while generation_outcomes(server, model).get("cancelled", 0) <= before["cancelled"]:
            assert time.monotonic() - left < 1.0, (model, generation_outcomes(server, model))
            time.sleep(0.01)
        time.sleep(seconds)  # what was left of it, had it not stopped
        finished = generation_outcomes(server, model).get("finished", 0) - before["finished"]
        assert finished < calls, (model, finished)  # not every call ran to its end
        for path, size in zip((server.log_path, api.log_path), logs):  # nothing alarming
            new_lines = path.read_text()[size:]
            for word in ("Traceback", "rror", "xception", "WARN"):
                assert word not in new_lines, new_lines[-2000:]
    again = client(api).completions.create(**{**LONG, "max_tokens": 4})
    assert again.usage.completion_tokens >= 1  # the server keeps serving


# --- slow: more deployments, and `doit serve` ------------------------------------------------


def save_cross_encoder(target: Path, minilm_dir: Path) -> Path:
    """MiniLM with a seeded one-logit head (as tests/test_rerank.py makes it)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(5)
    model = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=1)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.5)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def many(tmp_path_factory, minilm_dir):
    """A causal LM without a template (opt), t5, MiniLM embeddings and a reranker, one server."""
    from tasks.server import EmbeddedTritonServer, OpenAIServer, free_port

    root = tmp_path_factory.mktemp("openai-many")
    opt, t5 = (save_generation_model(root / family, family) for family in ("opt", "t5"))
    cross = save_cross_encoder(root / "cross", minilm_dir)
    project = copy_project(root / "project")
    project.doit("task=causallm", f"model={opt}", "name=plain", *SHAPES)
    project.doit("task=t5", f"model={t5}", "name=t5", *SHAPES)
    project.doit("task=encode", "batch=1,4,8", "seq=1,64,128")
    project.doit("task=rerank", f"model={cross}", "batch=1,4,8", "seq=1,64,128")
    models = project.root / "models"
    with EmbeddedTritonServer(models, quiet=True) as server:
        api = OpenAIServer(server.grpc_url, models, port=free_port(), log_file=root / "a.log")
        with api:
            yield api, {"opt": opt, "t5": t5, "cross": cross}


@pytest.mark.slow
def test_embeddings_and_t5_completions_equal_their_references(many, minilm_dir):
    import torch
    from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

    api, dirs = many
    texts = ["The quick brown fox jumps over the lazy dog.", "東京は日本の首都です。"]
    answer = client(api).embeddings.create(model="encode", input=texts, encoding_format="float")
    packed = client(api).embeddings.create(model="encode", input=texts)  # base64, the default
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(minilm_dir)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    for item, vector in zip(answer.data, expected.numpy()):
        np.testing.assert_allclose(item.embedding, vector, atol=1e-4)
    for item, floats in zip(packed.data, answer.data):  # base64: the same float32 values
        assert item.embedding == floats.embedding
    body = {"model": "encode", "input": texts, "encoding_format": "base64"}  # the same batch
    _, raw = post(api, "/v1/embeddings", json.dumps(body).encode())
    wire = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert wire.tolist() == answer.data[0].embedding  # little-endian float32 bytes
    assert answer.usage.prompt_tokens == int(batch["attention_mask"].sum())

    t5_tokenizer = AutoTokenizer.from_pretrained(dirs["t5"])
    model = AutoModelForSeq2SeqLM.from_pretrained(dirs["t5"]).eval()
    prompt = "The quick brown fox"
    with torch.no_grad():
        out = model.generate(**t5_tokenizer(prompt, return_tensors="pt"), max_new_tokens=5)
    expected_text = t5_tokenizer.decode(out[0], skip_special_tokens=True)
    done = client(api).completions.create(model="t5", prompt=[prompt, prompt], max_tokens=5)
    assert [c.text for c in done.choices] == [expected_text, expected_text]


@pytest.mark.slow
def test_a_model_without_a_chat_template_points_to_completions(many):
    import openai

    api, _ = many
    with pytest.raises(openai.BadRequestError) as err:
        client(api).chat.completions.create(model="plain", messages=MESSAGES, max_tokens=2)
    assert "no chat template" in err.value.message and "/v1/completions" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client(api).chat.completions.create(model="t5", messages=MESSAGES, max_tokens=2)


@pytest.mark.slow
def test_rerank_answers_as_text_embeddings_inference_does(many):
    """TEI's /rerank: scores (CrossEncoder.predict's sigmoid) of each text, best first."""
    from sentence_transformers import CrossEncoder

    api, dirs = many
    query = "What does Triton run?"
    texts = ["Triton runs models on CPUs and GPUs.", "The fox jumps.", "Paris is in France."]
    status, ranked = post(
        api, "/rerank", json.dumps({"query": query, "texts": texts, "return_text": True}).encode()
    )
    assert status == 200, ranked
    expected = CrossEncoder(str(dirs["cross"]), device="cpu").predict([(query, t) for t in texts])
    assert [r["index"] for r in ranked] == list(np.argsort(-expected))
    for answer in ranked:
        assert answer["score"] == pytest.approx(float(expected[answer["index"]]), abs=1e-4)
        assert answer["text"] == texts[answer["index"]]
    status, body = post(api, "/rerank", json.dumps({"query": query, "texts": []}).encode())
    assert status == 400 and body["error"]["param"] == "texts"


def api_pid(port: int) -> int:
    """The API process listening on `port` (its command line names the port)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"openai_api/server.py" in b" ".join(argv) and str(port).encode() in argv:
                return int(entry.name)
    raise AssertionError(f"no API process on port {port}")


@pytest.mark.slow
def test_doit_serve_restarts_the_api_when_it_is_killed(chatting, chat_dir):
    from tasks.server import free_port

    project, _, _ = chatting
    ports = sorted({free_port() for _ in range(8)})[:4]
    names = ("http_port", "grpc_port", "metrics_port", "openai_port")
    variables = [f"{n}={p}" for n, p in zip(names, ports)]
    deployment = ["task=causallm", f"model={chat_dir}", "name=chat", *CHAT_SHAPES]
    process = subprocess.Popen(
        [sys.executable, "-m", "doit", "serve", *deployment, *variables],
        cwd=project.root,
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen = []
        while "Ctrl-C stops the server" not in "".join(seen):
            line = process.stdout.readline()
            assert line, "".join(seen)
            seen.append(line)
        api = type("Api", (), {"url": f"127.0.0.1:{ports[3]}"})
        assert client(api).models.list().data[0].id == "chat"
        os.kill(api_pid(ports[3]), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert client(api).models.list().data[0].id == "chat"
                break
            except Exception:
                assert time.monotonic() < deadline, "the API did not come back"
                time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=90)
    assert process.returncode == 0, rest
    assert "openai api: back" in rest


@contextlib.contextmanager
def raw_request(url: str, route: str, body: dict):
    """A socket that sent one POST of `body` (JSON) over HTTP/1.1: its reader sees the answer
    as it arrives, and closing it is a client gone."""
    host, port = url.rsplit(":", 1)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST {route} HTTP/1.1\r\nHost: {url}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    try:
        sock.sendall(head.encode() + payload)
        yield sock
    finally:
        sock.close()


def deployment_requests(member, name: str) -> float:
    """Requests a replica's Triton counted for the deployment `name`'s models (its metrics)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{member.metrics_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    prefix = f'nv_inference_request_success{{model="{name}'
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


@pytest.mark.slow
@needs_nginx
def test_with_replicas_the_api_is_behind_nginx_spread_and_streamed_unbuffered(chatting, tmp_path):
    """replicas=2 as `doit serve` runs it: nginx on openai_port, the API's process on a
    loopback port behind it, its gRPC through nginx's balanced front to both replicas."""
    from tasks.server import free_port, make_server, openai_api
    from tasks.settings import Endpoints

    models = chatting[0].root / "models"
    ports = sorted({free_port() for _ in range(8)})[:4]
    names = ("http_port", "grpc_port", "metrics_port", "openai_port")
    endpoints = Endpoints(replicas=2, **dict(zip(names, ports)))
    server = make_server(endpoints, log_file=tmp_path / "triton.log", repo=str(models))
    server.start()
    try:
        api = openai_api.for_server(server, models, endpoints, log_file=tmp_path / "api.log")
        with api:
            assert api.host == "127.0.0.1" and api.port not in ports
            assert api.triton_grpc == server.grpc_url  # nginx's gRPC front, not a replica
            front = type("Front", (), {"url": f"127.0.0.1:{endpoints.openai_port}"})
            assert [m.id for m in client(front).models.list().data] == ["chat"]
            for _ in range(4):
                done = client(front).completions.create(model="chat", prompt="A", max_tokens=3)
                assert done.usage.completion_tokens >= 1
            too_large = {"Content-Length": str(5 << 20)}  # over max_body_mb=4, at nginx
            status, refusal = post(front, "/v1/completions", b"{}", too_large)
            assert status == 413 and refusal["error"]["code"] == "request_too_large"
            counts = [deployment_requests(m, "chat") for m in server.members]
            assert all(count > 0 for count in counts), counts  # spread over both replicas
            body = {"model": "chat", "prompt": "The quick brown fox", "max_tokens": 100}
            with raw_request(front.url, "/v1/completions", {**body, "stream": True}) as sock:
                reads = []
                while not reads or b"data: [DONE]" not in reads[-1]:
                    data = sock.recv(1 << 16)
                    assert data, reads
                    reads.append(data)
            # as they come, not buffered into one piece at the end
            assert sum(b"data: {" in read for read in reads) >= 3, reads
    finally:
        server.stop()


def test_the_chat_template_renders_as_transformers_does(chat_dir):
    """Templates with what real ones use, rendered here and by apply_chat_template."""
    from transformers import AutoTokenizer

    chat = artifacts.load_runtime("openai_api", "chat.py")
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    templates = [
        CHAT_TEMPLATE,
        # Llama-2's kind: a system prompt folded into the first turn, alternation enforced
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "{% if loop.index0 == 0 and system %}{% set content = '<<SYS>>\\n' + system + "
        "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
        "{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + "
        "' [/INST]' }}{% else %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}",
        # tojson, loop controls and the generation tag
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}"
        "{% if add_generation_prompt %}>>{% endif %}",
    ]
    messages = [*MESSAGES, {"role": "assistant", "content": "Jumps é 東京"}, MESSAGES[1]]
    for template in templates:
        tokenizer.chat_template = template
        ours = chat.ChatTemplate(template, tokenizer.special_tokens_map).render(messages)
        assert ours == tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    refused = chat.ChatTemplate(templates[1], tokenizer.special_tokens_map)
    with pytest.raises(chat.TemplateError, match="must alternate"):
        refused.render([MESSAGES[1], MESSAGES[1]])
