"""llm-in-triton: a Hugging Face transformer to a parity-checked Triton model repository.

    doit task=encode                     build models/encode (the default task)
    doit task=seqcls model=DIR name=sst2 build another deployment beside it
    doit serve                           build what is stale, then serve models/
    doit publish repo=s3://BUCKET/PREFIX upload models/: changed files only, each model
                                         atomically; prune=1 removes what it no longer has
    doit serve repo=s3://BUCKET/PREFIX poll=5   serve the bucket, loading what publish changes
    doit serve replicas=2                two servers behind nginx on the same ports; one
                                         that exits is restarted while the other answers
    doit bench                           measure the served deployment against in-process
    doit bench_model                     the generation benchmark's random Llama, offline
    doit soak                            minutes of mixed traffic, a stub killed midway
    doit test                            run the test suite (suite=all: the slow tests too)
    doit k8s repo=s3://BUCKET/PREFIX     Kubernetes manifests in k8s/ (kubectl apply -k k8s/)
    doit graph task=X precision=int8     the build's DAG for these variables, drawn to
                                         model_zoo/<name>/graph.svg
    doit list                            the stages; `doit info TASK` explains one
    doit clean                           remove what the build made

Variables (NAME=VALUE): task, model, name, revision, batch=MIN,OPT,MAX, seq=MIN,OPT,MAX,
precision, recipe, block_size, backend, decoder, exporter, host, http_port, grpc_port,
metrics_port, openai_port, server, replicas, max_body_mb, repo, prune, poll, namespace,
cpu=REQUEST,LIMIT, memory=REQUEST,LIMIT, gpus, trt_compat, max_queue, queue_timeout_ms,
queue_delay_us, instances, ort_threads, ort_spin, stream_interval, batch_waste, pad_multiple,
one_hop, against, soak_minutes, concurrency, seconds, loadgen, suite. See docs/variables.md.
"""

import sys

from doit.exceptions import InvalidCommand

from tasks import artifacts, paths
from tasks.bench import task_bench  # noqa: F401
from tasks.bench_model import task_bench_model  # noqa: F401
from tasks.download import task_download  # noqa: F401
from tasks.errors import BuildError
from tasks.export import task_onnx  # noqa: F401
from tasks.graph import task_graph  # noqa: F401
from tasks.k8s import task_k8s  # noqa: F401
from tasks.parity import task_parity  # noqa: F401
from tasks.pbtxt import task_pbtxt  # noqa: F401
from tasks.plan import task_plan  # noqa: F401
from tasks.publish import task_publish  # noqa: F401
from tasks.quantize import task_quantize  # noqa: F401
from tasks.repo import task_repo  # noqa: F401
from tasks.serve import task_serve  # noqa: F401
from tasks.settings import current
from tasks.slot_decoder import task_slots  # noqa: F401
from tasks.soak import task_soak  # noqa: F401
from tasks.test import task_test  # noqa: F401

# doit's commands that only read the tasks and their records: they never wait on a build
READING = {"list", "info", "help", "dumpdb", "tabcompletion"}

try:
    current()  # validate the command line before any task is even generated
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "run")
    if command not in READING:  # a second build here is refused, the first intact
        artifacts.hold_lock(paths.TREE_LOCK)  # (serve lets go once its server is up)
except BuildError as err:
    raise InvalidCommand(str(err)) from None

paths.DEP_FILE.parent.mkdir(parents=True, exist_ok=True)  # doit's state, even after rm -rf
DOIT_CONFIG = {
    "default_tasks": ["repo"],
    "verbosity": 2,
    "dep_file": str(paths.DEP_FILE),
    # one file any Python reads (dbm's format differs between the host's and an image's)
    "backend": "sqlite3",
    "cleanforget": True,  # `doit clean` also forgets, so the next build starts afresh
    "cleanall": True,  # and cleans every task, not only the default one: k8s/, bench, graph
}
