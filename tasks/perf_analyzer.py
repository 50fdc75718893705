"""NVIDIA's perf_analyzer as `doit bench`'s load generator (`loadgen=perf_analyzer`).

A C++ closed loop takes next to no CPU from the server it measures, which the Python threads
of our own load generator do on a small machine. There is no usable PyPI package of it: the
manylinux wheel of tritonclient at the bundled server's release carries the binary, so it is
fetched once (pip download, no install) into the user's cache, outside the project, and run
with the two libraries it wants linked from nvidia-pytriton's bundle under their plain names.
It checks each response's status, not its content (our load generator checks both).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tasks import artifacts, catalog, paths
from tasks.errors import BuildError
from tasks.settings import Settings

# The libraries perf_analyzer links, as nvidia-pytriton bundles them: (glob, plain name).
LIBRARIES = (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12"))
LOAD_GENERATOR = (
    f"NVIDIA perf_analyzer {catalog.PERF_ANALYZER_RELEASE} (C++, closed loop, one text per "
    "request; response status checked, not content)"
)


def bundled_libraries() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("nvidia-pytriton is not installed: perf_analyzer needs its libraries")
    return Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"


def fetch() -> Path:
    """The perf_analyzer binary, downloaded once; its library folder is next to it.

    Under a lock: two benchmarks fetching at once wait for each other instead of removing
    each other's files."""
    import fcntl
    import platform

    if platform.machine() != "x86_64":
        raise BuildError(
            f"perf_analyzer comes as an x86_64 binary; this is {platform.machine()}: "
            "bench with loadgen=python"
        )
    folder = paths.perf_analyzer_dir(catalog.PERF_ANALYZER_RELEASE)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        binary = folder / "perf_analyzer"
        if not binary.is_file():
            download(binary)
        link_libraries(folder / "lib")
    return binary


def download(binary: Path) -> None:
    wheel = f"tritonclient=={catalog.PERF_ANALYZER_RELEASE}"
    print(f"bench: fetching perf_analyzer from the {wheel} wheel into {binary.parent}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "-q", "--no-deps"),
                *("--only-binary=:all:", "--platform", "manylinux1_x86_64", wheel, "-d", tmp),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        wheels = list(Path(tmp).glob("tritonclient-*.whl"))
        if run.returncode != 0 or not wheels:
            last = (run.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise BuildError(
                f"could not download {wheel}, which carries perf_analyzer ({last}); "
                "bench with loadgen=python, or retry with network access"
            )
        member = f"tritonclient-{catalog.PERF_ANALYZER_RELEASE}.data/data/bin/perf_analyzer"
        with zipfile.ZipFile(wheels[0]) as archive:
            data = archive.read(member)
    with artifacts.atomic_target(binary) as tmp_binary:
        tmp_binary.write_bytes(data)
        tmp_binary.chmod(0o755)


def link_libraries(lib: Path) -> None:
    """The bundled libraries under the plain names perf_analyzer asks for."""
    lib.mkdir(exist_ok=True)
    bundle = bundled_libraries()
    for pattern, plain in LIBRARIES:
        found = sorted(bundle.glob(pattern))
        if not found:
            raise BuildError(f"{bundle} has no {pattern}, which perf_analyzer links")
        link = lib / plain
        if link.exists() and link.resolve() == found[0].resolve():
            continue
        staged = lib / f".{plain}.new"
        staged.unlink(missing_ok=True)
        staged.symlink_to(found[0])
        os.replace(staged, link)  # also replaces a dangling link from an earlier install


def input_data(
    settings: Settings, texts: list[tuple[str, ...]], new_tokens: int, target: Path
) -> None:
    """perf_analyzer's --input-data: one entry per text, as the ensemble takes it (with
    `new_tokens` per request on a generation task)."""
    entries = []
    for text in texts:
        entry = {
            name: {"content": [value], "shape": [1]}
            for name, value in zip(settings.task.text_inputs, text)
        }
        if settings.task.generation:
            entry["MAX_NEW_TOKENS"] = {"content": [new_tokens], "shape": [1]}
        entries.append(entry)
    target.write_text(json.dumps({"data": entries}))


def parse(csv_file: Path, concurrency: int, protocol: str) -> dict:
    """A point of our report from perf_analyzer's CSV (latencies there are in microseconds)."""
    with open(csv_file, newline="") as handle:
        row = next(csv.DictReader(handle))
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "throughput": round(float(row["Inferences/Second"]), 2),
        "p50_ms": round(int(row["p50 latency"]) / 1000, 2),
        "p95_ms": round(int(row["p95 latency"]) / 1000, 2),
        "p99_ms": round(int(row["p99 latency"]) / 1000, 2),
        "errors": 0,  # perf_analyzer fails the run on a failed request
    }


def failed_point(concurrency: int, protocol: str, message: str) -> dict:
    """perf_analyzer stops at a failed request and says no more: one error, its reason."""
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "throughput": 0.0,
        **dict.fromkeys(("p50_ms", "p95_ms", "p99_ms")),
        "errors": 1,
        "first_errors": [message[:200]],
    }


def sweep(settings: Settings, protocol: str, url: str, texts: list, new_tokens: int) -> list[dict]:
    """perf_analyzer at each concurrency of the settings, on the served ensemble (`new_tokens`
    per request on a generation task, as bench's other systems generate).

    Each point is three windows of a third of `seconds`; the stability check is off (a busy
    machine would fail it), so a point takes about `seconds`, as our load generator's do."""
    from tasks.server import access

    if access().api_key_from_environment():
        raise BuildError(
            "loadgen=perf_analyzer would carry the API key on its command line, where `ps` "
            "shows it to every user; use loadgen=triton (the default), which sends it as a header"
        )
    binary = fetch()
    environment = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent / "lib")}
    window_ms = max(int(settings.bench.seconds * 1000 / 3), 100)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "input.json", Path(tmp) / "point.csv"
        input_data(settings, texts, new_tokens, data)
        for concurrency in settings.bench.concurrency:
            command = [
                str(binary),
                *("-m", settings.name, "-u", url, "-i", protocol, "--input-data", str(data)),
                *("--concurrency-range", f"{concurrency}:{concurrency}"),
                *("--measurement-interval", str(window_ms)),
                *("--stability-percentage", "1000", "--max-trials", "3", "-f", str(out)),
            ]
            try:
                run = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    env=environment,
                    timeout=10 * settings.bench.seconds + 120,
                    check=False,
                )
                failure = None
                if run.returncode != 0 or not out.is_file():
                    tail = " ".join((run.stdout + run.stderr).strip().splitlines()[-3:])
                    failure = f"perf_analyzer exited with {run.returncode}: {tail}"
            except subprocess.TimeoutExpired:
                failure = "perf_analyzer did not finish: the server stopped answering"
            if failure is None:
                point = parse(out, concurrency, protocol)
                out.unlink()
            else:
                point = failed_point(concurrency, protocol, failure)
            points.append(point)
            print(
                f"bench: triton {protocol} (perf_analyzer) concurrency {concurrency}: "
                + (
                    failure
                    or f"{point['throughput']:.1f} req/s, p50 {point['p50_ms']} ms, "
                    f"p95 {point['p95_ms']} ms"
                ),
                flush=True,
            )
    return points
