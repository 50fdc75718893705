"""Generation (t5, causallm): built, proven equal to generate(), served by a real tritonserver."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tasks import catalog, paths
from tests.helpers.client import Client, infer
from tests.helpers.project import copy_project
from tests.helpers.serving import counted, kill_stubs_and_wait

pytestmark = pytest.mark.server

SHAPES = ("batch=1,4,8", "seq=1,32,64")
PROMPTS = [
    "The quick brown fox",
    "A short one.",
    "Numbers like 3.14159 and dates are",
    "Ce modèle génère du texte",
]
DEPLOYMENTS = {  # name: (task, family, more variables)
    "gpt": ("causallm", "gpt2", ()),
    "t5": ("t5", "t5", ()),
    # each exported file a Triton model of its own, called through BLS (as on TensorRT); OPT
    # only here: its inline loop is gpt's, its graph the same
    "optbls": ("causallm", "opt", ("decoder=models",)),
    "t5bls": ("t5", "t5", ("decoder=models",)),
    # a family optimum does not list: the generic torch.onnx path (exporter=auto)
    "sc2": ("causallm", "starcoder2", ()),
}
PARTS = {  # the unmerged decoders TensorRT takes, exported for every backend
    "causallm": ["decoder_model", "decoder_with_past_model"],
    "t5": ["encoder_model", "decoder_model", "decoder_with_past_model"],
}
OPTION_TYPES = {
    "MAX_NEW_TOKENS": ("INT32", np.int32),
    "TEMPERATURE": ("FP32", np.float32),
    "TOP_K": ("INT32", np.int32),
    "TOP_P": ("FP32", np.float32),
    "SEED": ("INT64", np.int64),
}


@pytest.fixture(scope="module")
def generating(tmp_path_factory, generation_models, decoder_models):
    from tasks.server import EmbeddedTritonServer

    project = copy_project(tmp_path_factory.mktemp("generation") / "project")
    models = dict(generation_models)
    for name, (task, family, more) in DEPLOYMENTS.items():
        if family not in models:  # a family of no generation_models fixture
            models[family] = decoder_models(family)
        model = f"model={models[family]}"
        project.doit(f"task={task}", model, f"name={name}", *SHAPES, *more)
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        yield project, server, models


def generate(server, model: str, prompts: list[str], **options):
    """OUTPUT_TEXT and OUTPUT_IDS (without the -1 padding) per prompt, or the error text."""
    inputs = {"TEXT": prompts}
    for name, value in options.items():
        inputs[name] = np.full((len(prompts), 1), value, dtype=OPTION_TYPES[name][1])
    from tritonclient.utils import InferenceServerException

    try:
        result = infer(server, "http", model, inputs)
    except InferenceServerException as err:
        return str(err)
    ids = [[int(t) for t in row if t != -1] for row in result["OUTPUT_IDS"]]
    return [t[0].decode() for t in result["OUTPUT_TEXT"]], ids


def hf_generate(model_dir, task: str, prompt: str, new_tokens: int) -> list[int]:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    auto = "AutoModelForCausalLM" if task == "causallm" else "AutoModelForSeq2SeqLM"
    model = getattr(transformers, auto).from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist() if task == "causallm" else out[0, 1:].tolist()


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_served_greedy_output_equals_generate_token_for_token(generating, name):
    project, server, models = generating
    task, family, _ = DEPLOYMENTS[name]
    texts, ids = generate(server, name, PROMPTS, MAX_NEW_TOKENS=10)  # lengths differ: batched
    for prompt, served in zip(PROMPTS, ids):
        assert served == hf_generate(models[family], task, prompt, 10), prompt
    assert all(isinstance(t, str) for t in texts)
    report = json.loads(project.path(paths.parity_report(name)).read_text())
    assert report["generation"]["equal"] is True
    assert set(report["files"]) == set(PARTS[task])


def test_the_generic_exporter_writes_the_files_optimum_writes(generating):
    """starcoder2 (torch.onnx) and gpt2 (optimum): the same inputs, outputs and axis names,
    up to the layer sizes, so every later stage reads either."""
    project = generating[0]

    def axes(name: str, part: str) -> tuple[dict, str]:
        io = json.loads(project.path(paths.onnx_io(name, part)).read_text())
        shapes = {
            t["name"]: [d if isinstance(d, str) else "n" for d in t["shape"]]
            for t in io["inputs"] + io["outputs"]
        }
        return shapes, io["exporter"]

    for part in PARTS["causallm"]:
        torch_axes, torch_path = axes("sc2", part)
        optimum_axes, optimum_path = axes("gpt", part)
        assert torch_path == "torch" and optimum_path.startswith("optimum (text-generation")
        assert torch_axes == optimum_axes


def expands_reading_the_cache(onnx_file) -> list[str]:
    """The Expand nodes that take data from a past_key_values input (not only its shape)."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    todo = [t.name for t in graph.input if t.name.startswith("past_key_values.")]
    seen, found = set(todo), []
    while todo:
        for node in readers.get(todo.pop(), []):
            if node.op_type == "Shape":
                continue
            if node.op_type == "Expand":
                found.append(node.name)
            todo += [name for name in node.output if name not in seen]
            seen.update(node.output)
    return found


def test_the_generic_exporter_does_not_repeat_key_value_heads(generating):
    """starcoder2 here has 4 query heads on 2 key/value heads: its decoding step reads the
    cache as it is (no repeat_kv Expand), and still equals generate() (the test above)."""
    onnx_file = generating[0].path(paths.onnx_file("sc2", "decoder_with_past_model"))
    assert expands_reading_the_cache(onnx_file) == []


def test_max_new_tokens_is_respected(generating):
    _, server, _ = generating
    _, ids = generate(server, "gpt", PROMPTS[:2], MAX_NEW_TOKENS=3)
    assert [len(i) for i in ids] == [3, 3]
    _, ids = generate(server, "t5", PROMPTS[:1])  # the default
    assert 1 <= len(ids[0]) <= 32


def test_the_models_eos_is_what_the_served_loop_stops_at(generating):
    """generation_config.json's EOS reaches both served models' loop (test_inflight proves the
    loop stops a row at it, its batch-mates going on)."""
    project = generating[0]
    generation_config = project.path(paths.source_dir("gpt")) / "generation_config.json"
    source = json.loads(generation_config.read_text())
    for model in ("gpt_generate", "gpt_stream"):
        config = (project.root / "models" / model / "config.pbtxt").read_text()
        found = re.search(r'key: "eos_token_ids"\s*value \{\s*string_value: "([^"]*)"', config)
        assert found and json.loads(found.group(1)) == [source["eos_token_id"]], model


def test_a_prompt_longer_than_the_max_seq_is_refused_not_cut(generating):
    _, server, _ = generating
    error = generate(server, "gpt", ["many words " * 100, PROMPTS[0]])
    assert isinstance(error, str) and "[400]" in error
    assert "this deployment takes at most 64 (seq=MIN,OPT,MAX)" in error


def test_a_finished_row_never_runs_past_the_model_positions(generating):
    """A long prompt done early beside a short one going far: positions stay in range."""
    from tasks.generation_parity import load_decoding

    project, _, _ = generating
    decoding = load_decoding()
    files = {part: project.path(paths.onnx_file("gpt", part)) for part in PARTS["causallm"]}
    generator = decoding.Generator(
        "causal", decoding.onnxruntime_steps(files), eos_ids=[], pad_id=0, start_id=0
    )
    long_ids, short_ids = list(range(3, 103)), [5, 6]  # 100 + 5 and 2 + 100 tokens fit 128
    ids = np.zeros((2, 100), np.int64)
    mask = np.zeros((2, 100), np.int64)
    ids[0], mask[0] = long_ids, 1
    ids[1, :2], mask[1, :2] = short_ids, 1
    both = generator.generate(ids, mask, [decoding.RowParams(5), decoding.RowParams(100)])
    alone = generator.generate(ids[:1], mask[:1], [decoding.RowParams(5)])
    assert [len(t) for t in both] == [5, 100] and both[0] == alone[0]


def test_requests_with_different_parameters_decode_together(generating):
    from concurrent.futures import ThreadPoolExecutor

    _, server, models = generating
    jobs = [
        {"MAX_NEW_TOKENS": 6},
        {"MAX_NEW_TOKENS": 9, "TEMPERATURE": 0.7, "SEED": 1},
        {"MAX_NEW_TOKENS": 4},
        {},
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: generate(server, "gpt", PROMPTS[:2], **job), jobs))
    assert all(isinstance(r, tuple) for r in results)
    for job, (_, ids) in zip(jobs, results):
        if "TEMPERATURE" not in job:
            new = job.get("MAX_NEW_TOKENS", 32)
            assert ids == [hf_generate(models["gpt2"], "causallm", p, new) for p in PROMPTS[:2]]


def test_the_same_seed_gives_the_same_sample(generating):
    _, server, _ = generating
    options = {"MAX_NEW_TOKENS": 12, "TEMPERATURE": 1.5, "TOP_K": 50, "TOP_P": 0.95}
    first = generate(server, "gpt", PROMPTS[:2], SEED=11, **options)
    assert first == generate(server, "gpt", PROMPTS[:2], SEED=11, **options)
    others = [generate(server, "gpt", PROMPTS[:2], SEED=seed, **options)[1] for seed in (12, 13)]
    assert any(o != first[1] for o in others)  # sampling, not greedy in disguise


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"MAX_NEW_TOKENS": -1}, "MAX_NEW_TOKENS=-1: must be from 1 to 64"),
        ({"MAX_NEW_TOKENS": 100000}, "MAX_NEW_TOKENS=100000: must be from 1 to 64"),
        ({"TOP_P": 0.0}, "TOP_P=0.0: must be in (0, 1]"),
        ({"TOP_P": 1.5}, "TOP_P=1.5: must be in (0, 1]"),
        ({"TEMPERATURE": 0.0}, "TEMPERATURE=0.0: must be > 0 when sampling"),
        ({"TEMPERATURE": -1.0, "TOP_K": 5}, "TEMPERATURE=-1.0: must be > 0 when sampling"),
        ({"SEED": -5, "TEMPERATURE": 1.0}, "SEED=-5: must be >= 0"),
    ],
)
def test_bad_parameters_get_a_clear_error_and_the_server_keeps_serving(
    generating, options, message
):
    _, server, _ = generating
    error = generate(server, "gpt", PROMPTS[:1], **options)
    assert isinstance(error, str) and message in error and "[400]" in error
    assert isinstance(generate(server, "gpt", PROMPTS[:1], MAX_NEW_TOKENS=2), tuple)


def client(*args: str) -> str:
    return subprocess.run(
        [sys.executable, str(paths.CLIENT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def test_the_client_prints_the_generated_text(generating):
    _, server, _ = generating
    out = client("-u", server.http_url, "-m", "gpt", "-t", PROMPTS[0], "--max_new_tokens", "4")
    assert "OUTPUT_TEXT: object [1, 1]" in out
    assert "OUTPUT_IDS: int64 [1, 4]" in out  # the option reached the server


@pytest.mark.parametrize("name", ["optbls", "t5bls"])
def test_with_decoder_models_every_step_is_a_model_the_loop_calls(generating, name):
    import tritonclient.http as httpclient

    project, server, _ = generating
    task = DEPLOYMENTS[name][0]
    step_models = [f"{name}{catalog.PART_SUFFIXES[p]}" for p in catalog.TASKS[task].onnx_parts]
    client = httpclient.InferenceServerClient(server.http_url)

    def calls() -> dict[str, int]:
        stats = client.get_inference_statistics()["model_stats"]
        return {s["name"]: s["inference_count"] for s in stats if s["name"] in step_models}

    before = calls()
    _, ids = generate(server, name, PROMPTS[:2], MAX_NEW_TOKENS=5)
    # the first step (and the encoder) once per row, the cached step once per row per token
    wanted = {step_models[-1]: 2 * 4, step_models[-2]: 2}

    def made_now() -> dict[str, int]:
        after = calls()
        return {model: after[model] - before[model] for model in wanted}

    made = counted(made_now, lambda counts: counts == wanted)
    client.close()
    assert [len(i) for i in ids] == [5, 5]
    assert made == wanted
    generate_dir = project.path(paths.repo_version_dir(f"{name}_generate"))
    assert not list(generate_dir.glob("*.onnx"))  # the files live in the step models


@pytest.mark.parametrize("name", ["gpt", "t5", "t5bls"])
def test_streaming_sends_each_token_as_it_comes_and_adds_up(generating, name):
    _, server, _ = generating
    _, whole = generate(server, name, PROMPTS[:1], MAX_NEW_TOKENS=6)
    out = client(
        "--protocol",
        "grpc",
        "-u",
        server.grpc_url,
        "-m",
        name,
        "--stream",
        "-t",
        PROMPTS[0],
        "--max_new_tokens",
        "6",
    )
    assert out.splitlines()[-1].endswith(f" {whole[0]}")  # the same tokens, one at a time


def test_streaming_responses_arrive_one_per_token(generating):
    import queue

    _, server, _ = generating
    arrived: queue.Queue = queue.Queue()
    grpc = Client(server, "grpc")
    stream_client = grpc.client
    inputs = {"TEXT": PROMPTS[:2], "MAX_NEW_TOKENS": np.array([[3], [5]], dtype=np.int32)}
    stream_client.start_stream(callback=lambda result, error: arrived.put((result, error)))
    try:
        stream_client.async_stream_infer(
            "gpt_stream", grpc.tensors(inputs), enable_empty_final_response=True
        )
        steps = []
        while True:
            result, error = arrived.get(timeout=60)
            assert error is None, error
            if result.get_response().outputs:
                steps.append(result.as_numpy("OUTPUT_IDS")[:, 0].tolist())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        stream_client.stop_stream()
        stream_client.close()
    assert len(steps) == 5  # the longer row decides; the shorter one is -1 after 3 tokens
    assert all(t != -1 for t in (s[0] for s in steps[:3])) and [s[0] for s in steps[3:]] == [-1, -1]
    _, whole = generate(server, "gpt", PROMPTS[:2], MAX_NEW_TOKENS=5)
    assert [s[1] for s in steps] == whole[1]


# A generation model's stub killed restarts the whole server (test_inflight_serving.py kills
# one mid-decode): the two cases repeat that path with more models, so they run in suite=slow.
@pytest.mark.parametrize(
    "model",
    [
        "gpt_tokenizer",
        *(pytest.param(m, marks=pytest.mark.slow) for m in ("gpt_generate", "gpt_stream")),
    ],
)
def test_a_killed_generation_stub_is_replaced_and_generates_again(generating, model):
    """SIGKILL of a generation deployment's python process: not-ready, then reloaded (the
    tokenizer) or the server restarted (the decoding loop's models), and the same tokens
    again, whole and streamed."""
    _, server, _ = generating
    before = generate(server, "gpt", PROMPTS[:1], MAX_NEW_TOKENS=4)

    def answers_as_before() -> None:
        assert generate(server, "gpt", PROMPTS[:1], MAX_NEW_TOKENS=4) == before
        streamed = client(
            "--protocol", "grpc", "-u", server.grpc_url, "-m", "gpt", "--stream",
            "-t", PROMPTS[0], "--max_new_tokens", "4",
        )  # fmt: skip
        assert streamed.splitlines()[-1].endswith(f" {before[1][0]}")

    answers_as_before()
    kill_stubs_and_wait(server, model, answers_as_before)


BAD_PROMPTS = {  # a prompt the tokenizer step (and the stream model) must refuse, in words
    b"": "is empty",
    b" \t ": "is empty (or only whitespace)",
    b"caf\xe9 \xff": "is not UTF-8 text",
    b"a\x00b": "NUL character",
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_prompts_and_parameters_are_refused_over_both_protocols(generating, protocol):
    """The ensemble over HTTP and gRPC: bad texts and out-of-range parameters each get a client
    error naming the problem; the server serves on."""
    wanted = "StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400"
    requests = [({"TEXT": [value]}, words) for value, words in BAD_PROMPTS.items()]
    requests += [
        ({"TEXT": PROMPTS[:1], "MAX_NEW_TOKENS": np.array([[0]], np.int32)}, "MAX_NEW"),
        ({"TEXT": PROMPTS[:1], "TOP_P": np.array([[1.5]], np.float32)}, "TOP_P=1.5"),
    ]
    problems = []
    with Client(generating[1], protocol) as client:
        for inputs, words in requests:
            status, message = client.refusal("gpt", inputs)
            if status is None:
                problems.append(f"{inputs}: answered")
            elif status != wanted or words not in message:
                problems.append(f"{inputs}: {status} {message[:200]}")
    assert problems == []
    assert isinstance(generate(generating[1], "gpt", PROMPTS[:1], MAX_NEW_TOKENS=2), tuple)


def test_the_stream_model_refuses_bad_prompts_in_words(generating):
    """<name>_stream tokenizes TEXT itself: it holds texts to the same rules."""
    import queue

    _, server, _ = generating
    for value, words in BAD_PROMPTS.items():
        arrived: queue.Queue = queue.Queue()
        grpc = Client(server, "grpc")
        stream = grpc.client
        stream.start_stream(callback=lambda result, error, box=arrived: box.put((result, error)))
        try:
            stream.async_stream_infer("gpt_stream", grpc.tensors({"TEXT": [value]}))
            _, error = arrived.get(timeout=30)
        finally:
            stream.stop_stream()
            stream.close()
        assert error is not None and words in str(error), (value, error)


@pytest.mark.slow  # publishes and serves from a moto bucket: 40 s; test_s3 keeps the encoder's
def test_generation_deployments_serve_from_a_bucket_whole_and_streamed(generating, tmp_path):
    """Published to a real S3 server (moto) and served from it: Triton fetches each model of a
    bucket alone, so the stream model has its own files, copied inside the bucket."""
    from tasks.server import EmbeddedTritonServer, free_port
    from tasks.storage import S3Location
    from tests.helpers.s3 import start_s3_server

    project, local, models = generating
    s3 = start_s3_server(free_port(), tmp_path / "moto.log")
    try:
        s3.client().create_bucket(Bucket="generation")
        run = project.doit(
            *("publish", "task=causallm", f"model={models['gpt2']}", "name=gpt", *SHAPES),
            "repo=s3://generation/prod",
            environment=s3.environment(),
        )
        for part in PARTS["causallm"]:
            assert (
                f"prod/gpt_stream/1/{part}.onnx: unchanged, copied from "
                f"prod/gpt_generate/1/{part}.onnx"
            ) in run.output
        generate_dir = project.path(paths.repo_version_dir("gpt_generate"))
        stream_dir = project.path(paths.repo_version_dir("gpt_stream"))
        for part in PARTS["causallm"]:  # one file on disk for both models
            assert (stream_dir / f"{part}.onnx").samefile(generate_dir / f"{part}.onnx")
        repository = S3Location("generation", "prod").triton_path(s3.url)
        with EmbeddedTritonServer(repository, environment=s3.environment(), quiet=True) as server:
            for name in ("gpt", "t5", "t5bls"):
                whole = generate(local, name, PROMPTS[:1], MAX_NEW_TOKENS=6)
                assert generate(server, name, PROMPTS[:1], MAX_NEW_TOKENS=6) == whole
                streamed = client(
                    "--protocol", "grpc", "-u", server.grpc_url, "-m", name, "--stream",
                    "-t", PROMPTS[0], "--max_new_tokens", "6",
                )  # fmt: skip
                assert streamed.splitlines()[-1].endswith(f" {whole[1][0]}")
    finally:
        s3.stop()
