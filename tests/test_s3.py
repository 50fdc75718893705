"""doit publish and doit serve repo=s3://: a real S3 protocol server (moto, on loopback, IAM
authentication on) and the real tritonserver reading s3://. No cloud is reachable here."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tasks.server import EmbeddedTritonServer, free_port
from tasks.storage import S3Location
from tests.helpers.client import Client
from tests.helpers.project import OFFLINE_ENV, Project, copy_project, free_ports
from tests.helpers.s3 import HoldingProxy, start_s3_server
from tests.helpers.serving import needs_nginx

pytestmark = pytest.mark.server

SHAPES = ("batch=1,4,8", "seq=1,32,64")
TEXTS = ["Triton serves transformers.", "A bucket holds the model repository."]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = start_s3_server(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def other_roberta_dir(tmp_path_factory, tiny_roberta_dir) -> Path:
    """The tiny RoBERTa with other weights (seed 5), the same tokenizer: another build."""
    import torch
    from transformers import RobertaModel

    target = tmp_path_factory.mktemp("other-roberta")
    config = RobertaModel.from_pretrained(tiny_roberta_dir).config
    torch.manual_seed(5)
    RobertaModel(config).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_roberta_dir / name).exists():
            (target / name).write_bytes((tiny_roberta_dir / name).read_bytes())
    for name in ("vocab.json", "merges.txt"):
        if (tiny_roberta_dir / name).exists():
            (target / name).write_bytes((tiny_roberta_dir / name).read_bytes())
    return target


def build(root: Path, model: Path, *shapes: str) -> Project:
    project = copy_project(root)
    project.doit(f"model={model}", *(shapes or SHAPES))
    return project


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_roberta_dir) -> Project:
    """encode of the tiny RoBERTa, built."""
    return build(tmp_path_factory.mktemp("first") / "project", tiny_roberta_dir)


@pytest.fixture(scope="module")
def second(tmp_path_factory, other_roberta_dir) -> Project:
    """The same deployment built from other weights: what a rolling update brings."""
    return build(tmp_path_factory.mktemp("second") / "project", other_roberta_dir)


def embeddings(server) -> np.ndarray:
    with Client(server) as client:
        return client.infer("encode", {"TEXT": TEXTS})["EMBEDDING"]


@pytest.fixture(scope="module")
def local_answers(first, second) -> dict[str, np.ndarray]:
    """What each build answers served from its own models/."""
    found = {}
    for label, project in (("first", first), ("second", second)):
        with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
            found[label] = embeddings(server)
    assert not np.allclose(found["first"], found["second"], atol=1e-3)
    return found


def publish(project: Project, s3, bucket: str, *args: str, check=True, environment=None):
    return project.doit(
        "publish",
        f"model={project_model(project)}",
        *SHAPES,
        f"repo=s3://{bucket}/prod",
        *args,
        check=check,
        environment=environment or s3.environment(),
    )


def project_model(project: Project) -> str:
    """The model= a project was built with (its download manifest)."""
    import json

    manifest = project.root / "model_zoo" / "encode" / "source" / "manifest.json"
    return json.loads(manifest.read_text())["ref"]


def summary(run) -> str:
    return next(
        line for line in run.output.splitlines() if " uploaded (" in line and "s3://" in line
    )


def served_from(s3, bucket: str) -> EmbeddedTritonServer:
    location = S3Location(bucket, "prod")
    return EmbeddedTritonServer(
        location.triton_path(s3.url), environment=s3.environment(), quiet=True
    )


def test_publish_to_an_empty_bucket_serves_the_answers_of_the_local_build(s3, first, local_answers):
    s3.client().create_bucket(Bucket="first")
    run = publish(first, s3, "first")
    assert "0 skipped" in summary(run), run.output
    assert "encode: config.pbtxt uploaded: serving version 1" in run.output
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="first")["Contents"]}
    assert {
        "prod/publish.json",
        "prod/encode/config.pbtxt",
        "prod/encode_model/1/model.onnx",
    } <= keys
    with served_from(s3, "first") as server:
        np.testing.assert_allclose(embeddings(server), local_answers["first"], atol=1e-6)


def test_the_files_the_openai_api_reads_are_copied_from_the_bucket_and_served(s3, first, tmp_path):
    """What `doit k8s`'s pods do before the API starts (triton/openai_api/bucket.py, with the
    credentials as a file, as the pods mount them), then the API on the copy."""
    import urllib.request

    from tasks import paths
    from tasks.server import OpenAIServer

    s3.client().create_bucket(Bucket="api")
    publish(first, s3, "api")
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = {s3.key_id}\naws_secret_access_key = {s3.secret}\n"
    )
    variables = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    environment = {k: v for k, v in os.environ.items() if k not in variables}
    environment.update(
        AWS_SHARED_CREDENTIALS_FILE=str(credentials),
        AWS_ENDPOINT_URL=s3.url,
        AWS_DEFAULT_REGION=s3.environment()["AWS_DEFAULT_REGION"],
    )
    copy = tmp_path / "repository"
    fetch = [sys.executable, str(paths.runtime_file("openai_api", "bucket.py"))]
    done = subprocess.run(
        [*fetch, "s3://api/prod", str(copy)], env=environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    local = first.root / "models"
    copied = sorted(str(f.relative_to(copy)) for f in copy.rglob("*") if f.is_file())
    expected = [
        str(f.relative_to(local))
        for f in local.rglob("*")
        if f.name in ("config.pbtxt", "tokenizer.json", "chat.json")
    ]
    assert copied == sorted(expected) and "encode/config.pbtxt" in copied  # no weights
    log = tmp_path / "api.log"
    with OpenAIServer(f"127.0.0.1:{free_port()}", copy, port=free_port(), log_file=log) as api:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{api.url}/v1/models", timeout=10) as reply:
            assert [m["id"] for m in json.loads(reply.read())["data"]] == ["encode"]
    empty = subprocess.run(
        [*fetch, "s3://api/nothing-here", str(tmp_path / "none")],
        env=environment,
        capture_output=True,
        text=True,
    )
    assert empty.returncode == 1 and "publish there first" in empty.stderr


def test_a_second_publish_with_nothing_changed_uploads_nothing(s3, first):
    s3.client().create_bucket(Bucket="again")
    publish(first, s3, "again")
    run = publish(first, s3, "again")
    assert "0 uploaded (0 B), 0 copied in the bucket" in summary(run), run.output
    assert "uploaded (" not in run.output.replace(summary(run), "")


@pytest.mark.slow  # a build of its own, 16 s; a publish of nothing changed uploads nothing (lean)
def test_a_publish_after_a_shape_change_uploads_only_what_changed(s3, tmp_path, tiny_roberta_dir):
    project = build(tmp_path / "project", tiny_roberta_dir)
    s3.client().create_bucket(Bucket="shapes")
    publish(project, s3, "shapes")
    shapes = (f"model={tiny_roberta_dir}", "batch=1,4,16", "seq=1,32,64")
    project.doit(*shapes)
    run = project.doit("publish", *shapes, "repo=s3://shapes/prod", environment=s3.environment())
    # the version folders' files (model.onnx, tokenizer, code) are the same: only the two
    # configs change, in place, still naming version 1
    uploaded = [line for line in run.output.splitlines() if "uploaded" in line]
    assert uploaded[:-1] == [
        "publish: encode_model: config.pbtxt uploaded: serving version 1",
        "publish: encode: config.pbtxt uploaded: serving version 1",
    ], run.output
    assert "2 uploaded" in uploaded[-1] and "0 copied" in uploaded[-1], run.output
    for model in ("encode", "encode_model"):
        config = s3.client().get_object(Bucket="shapes", Key=f"prod/{model}/config.pbtxt")
        assert "max_batch_size: 16" in config["Body"].read().decode()


def doit_in_background(project: Project, log_path: Path, s3, *args: str) -> subprocess.Popen:
    """`doit ARGS...` in `project` with the bucket's variables, its output to `log_path`."""
    with open(log_path, "w") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "doit", *args],
            cwd=project.root,
            env={**os.environ, **OFFLINE_ENV, **s3.environment()},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def wait_for_log(process, log_path: Path, words: str, deadline: float) -> str:
    """The log once it holds `words`; fails, showing it, if doit ends or the deadline passes."""
    while words not in (output := log_path.read_text()):
        assert process.poll() is None, output
        assert time.monotonic() < deadline, output
        time.sleep(0.1)
    return output


def serve_in_background(tmp_path: Path, s3, bucket: str, poll: str) -> tuple:
    """`doit serve repo=s3://... poll=...` in a project copy that builds nothing."""
    project = copy_project(tmp_path / "serving")
    ports, variables = free_ports()
    log_path = tmp_path / "serve.log"
    process = doit_in_background(
        project, log_path, s3, "serve", f"repo=s3://{bucket}/prod", f"poll={poll}", *variables
    )
    wait_for_log(process, log_path, "Ctrl-C stops the server", time.monotonic() + 180)
    server = SimpleNamespace(http_url=f"127.0.0.1:{ports[0]}", grpc_url=f"127.0.0.1:{ports[1]}")
    return process, server, log_path


def stop_serving(process) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_rolling_update_under_load_fails_no_request(s3, tmp_path, first, second, local_answers):
    s3.client().create_bucket(Bucket="rolling")
    publish(first, s3, "rolling")
    process, server, log_path = serve_in_background(tmp_path, s3, "rolling", "0.5")
    answers, failures, stop = [], [], threading.Event()

    def load() -> None:
        with Client(server) as client:
            while not stop.is_set():
                try:
                    answers.append(client.infer("encode", {"TEXT": TEXTS})["EMBEDDING"])
                except Exception as err:  # every failure is a finding
                    failures.append(repr(err))

    threads = [threading.Thread(target=load) for _ in range(2)]
    try:
        assert "sample request" in log_path.read_text()
        for thread in threads:
            thread.start()
        time.sleep(1)
        run = publish(second, s3, "rolling")
        assert "encode_model: config.pbtxt uploaded: serving version 2" in run.output
        deadline = time.monotonic() + 60
        while not (answers and np.allclose(answers[-1], local_answers["second"], atol=1e-6)):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        time.sleep(1)  # more requests on the new version
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        code = stop_serving(process)
    output = log_path.read_text()
    assert failures == [], output
    assert np.allclose(answers[0], local_answers["first"], atol=1e-6)
    switched = [np.allclose(a, local_answers["second"], atol=1e-6) for a in answers]
    first_new = switched.index(True)
    assert all(switched[first_new:]), "an answer of the old build after the new one"
    assert all(np.allclose(a, local_answers["first"], atol=1e-6) for a in answers[:first_new]), (
        "an answer of neither build"
    )
    assert "watch: 'encode_model' version 2 loaded" in output
    assert code == 0, output


def test_a_publish_killed_part_way_leaves_the_previous_version_served(
    s3, first, second, local_answers
):
    s3.client().create_bucket(Bucket="atomic")
    publish(first, s3, "atomic")
    seen = []

    def hold(method: str, path: str) -> bool:  # the third object of the new version folder
        if method == "PUT" and "/prod/encode_model/2/" in path:
            seen.append(path)
        return len(seen) >= 3

    with HoldingProxy(s3.port, hold) as proxy:
        command = [sys.executable, "-m", "doit", "publish", f"model={project_model(second)}"]
        process = subprocess.Popen(
            [*command, *SHAPES, "repo=s3://atomic/prod"],
            cwd=second.root,
            env={**os.environ, **OFFLINE_ENV, **s3.environment(endpoint=proxy.url)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proxy.holding.wait(120), "the publish never reached the new version's files"
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="atomic")["Contents"]}
    assert any(k.startswith("prod/encode_model/2/") for k in keys)  # stopped part-way
    with served_from(s3, "atomic") as server:
        np.testing.assert_allclose(embeddings(server), local_answers["first"], atol=1e-6)
    # the next publish resumes: what the killed one copied is not sent again
    run = publish(second, s3, "atomic")
    assert "already there (a publish stopped part-way)" in run.output
    with served_from(s3, "atomic") as server:
        np.testing.assert_allclose(embeddings(server), local_answers["second"], atol=1e-6)


@pytest.mark.slow  # a bench run: 40 s
@needs_nginx
def test_bench_through_nginx_keeps_failures_of_a_killed_replica_to_its_requests_in_flight(
    s3, tmp_path, first, local_answers
):
    """Two embedded servers read the bucket behind nginx (doit bench replicas=2); replica 1 is
    SIGKILLed while the gRPC point runs. Only what it had in flight may fail, it is restarted,
    and every answer through the balancer is the local build's."""
    s3.client().create_bucket(Bucket="replicas")
    publish(first, s3, "replicas")
    (http, grpc, _), variables = free_ports()
    balancer = SimpleNamespace(http_url=f"127.0.0.1:{http}", grpc_url=f"127.0.0.1:{grpc}")
    concurrency = 4
    log_path = tmp_path / "bench.log"
    process = doit_in_background(
        first, log_path, s3,
        *("bench", f"model={project_model(first)}", *SHAPES, "repo=s3://replicas/prod"),
        *("replicas=2", "seconds=3", f"concurrency={concurrency}", *variables),
    )  # fmt: skip
    answers, failures, stop = [], [], threading.Event()

    def check_answers() -> None:  # beside the bench: the balancer answers the local build's
        with Client(balancer, "grpc") as client:
            while not stop.is_set():
                try:
                    answers.append(client.infer("encode", {"TEXT": TEXTS})["EMBEDDING"])
                except Exception as err:  # the replica's requests in flight
                    failures.append(f"{type(err).__name__}: {err}")
                time.sleep(0.05)

    checker = threading.Thread(target=check_answers)
    try:
        deadline = time.monotonic() + 240
        output = wait_for_log(process, log_path, "nginx balances 2 replicas", deadline)
        pid = int(re.search(r"replica 1: pid (\d+)", output)[1])
        checker.start()
        time.sleep(2.5)  # the gRPC point: a second of warm-up, then measured
        os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        assert "triton grpc concurrency" not in log_path.read_text(), "killed after the point"
        wait_for_log(process, log_path, "bench: triton http concurrency", deadline)  # served
        stop.set()  # before the bench stops its servers
        checker.join(30)
        process.wait(300)
    finally:
        stop.set()
        if checker.is_alive():
            checker.join(30)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    output = log_path.read_text()
    report = json.loads((first.root / "model_zoo/encode/bench/report.json").read_text())
    assert report["settings"]["replicas"] == 2, output
    assert [r["replica"] for r in report["restarts"]] == [1], output
    assert report["restarts"][0]["pid"] == pid
    assert "replica 1 is back" in output
    grpc_point, http_point = report["systems"]["triton"]
    assert grpc_point["requests"] > 0 and http_point["errors"] == 0, output
    # what the killed replica had in flight, at most one request per client, and no more
    assert report["errors"] == grpc_point["errors"] <= concurrency, output
    assert len(failures) <= 1, (failures, output)
    if report["errors"]:  # none when the replica had nothing in flight (a CI run saw it)
        assert "Received http2 header with status: 502" in grpc_point["first_errors"][0]
        assert process.returncode == 1, output  # the bench says so, and fails
        assert f"{report['errors']} requests failed during the benchmark" in output
    else:
        assert process.returncode == 0, output
    assert len(answers) > 10
    for answer in answers:
        np.testing.assert_allclose(answer, local_answers["first"], atol=1e-6)
    assert subprocess.run(["pgrep", "-f", "llm-in-triton-nginx"]).returncode == 1, "nginx left"


def test_prune_removes_only_what_the_build_no_longer_makes(s3, first, second):
    bucket = s3.client()
    bucket.create_bucket(Bucket="prune")
    publish(first, s3, "prune")
    bucket.put_object(Bucket="prune", Key="prod/gone_model/1/model.py", Body=b"")
    bucket.put_object(Bucket="prune", Key="prod/gone_model/config.pbtxt", Body=b"")
    run = publish(second, s3, "prune")
    assert "object(s) the build no longer makes are kept (prune=1 removes them)" in run.output
    assert "prod/encode_model/1/model.onnx" in keys_of(bucket, "prune")
    run = publish(second, s3, "prune", "prune=1")
    left = keys_of(bucket, "prune")
    assert not any(k.startswith(("prod/gone_model/", "prod/encode_model/1/")) for k in left)
    assert "prod/encode_model/2/model.onnx" in left, run.output


def keys_of(client, bucket: str) -> set[str]:
    return {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no bucket", "bucket 'nosuchbucket' does not exist at AWS_ENDPOINT_URL="),
        ("wrong secret", "access denied to bucket 'first' at AWS_ENDPOINT_URL="),
        ("dead endpoint", "nothing answers at AWS_ENDPOINT_URL=http://127.0.0.1:"),
        ("local repo", "repo=models/: doit publish uploads to object storage; pass repo=s3://"),
    ],
)
def test_bad_input_to_publish_gets_one_line_naming_the_fix(s3, first, case, message):
    bucket, environment = "first", s3.environment()
    if case == "no bucket":
        bucket = "nosuchbucket"
    elif case == "wrong secret":
        environment = s3.environment(AWS_SECRET_ACCESS_KEY="wrong")
    elif case == "dead endpoint":
        environment = s3.environment(endpoint=f"http://127.0.0.1:{free_port()}")
    args = ["repo=models/"] if case == "local repo" else [f"repo=s3://{bucket}/prod"]
    run = first.doit(
        "publish",
        f"model={project_model(first)}",
        *SHAPES,
        *args,
        check=False,
        environment=environment,
    )
    assert run.returncode == 1
    lines = [line for line in run.output.splitlines() if message in line]
    assert len(lines) == 1, run.output
    assert "Traceback" not in run.output


def test_a_repo_that_is_not_s3_is_refused_at_the_door(first):
    run = first.doit("publish", "repo=gs://bucket/prod", check=False)
    assert run.returncode == 3
    assert run.output.strip().splitlines() == [
        "ERROR: repo=gs://bucket/prod: only S3 is supported; pass repo=s3://BUCKET/PREFIX, "
        "or a local folder (default models/)"
    ]
