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
    """The perf_analyzer binary, downloaded once; its library folder is next to it."""
    import platform

    if platform.machine() != "x86_64":
        raise BuildError(
            f"perf_analyzer comes as an x86_64 binary; this is {platform.machine()}: "
            "bench with loadgen=python"
        )
    folder = paths.perf_analyzer_dir(catalog.PERF_ANALYZER_RELEASE)
    binary = folder / "perf_analyzer"
    if not binary.is_file():
        wheel = f"tritonclient=={catalog.PERF_ANALYZER_RELEASE}"
        print(f"bench: fetching perf_analyzer from the {wheel} wheel into {folder}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            download = subprocess.run(
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
            if download.returncode != 0 or not wheels:
                last = (download.stderr.strip().splitlines() or ["no wheel"])[-1]
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
    lib = folder / "lib"
    lib.mkdir(exist_ok=True)
    bundle = bundled_libraries()
    for pattern, plain in LIBRARIES:
        found = sorted(bundle.glob(pattern))
        if not found:
            raise BuildError(f"{bundle} has no {pattern}, which perf_analyzer links")
        link = lib / plain
        if not link.exists():
            link.unlink(missing_ok=True)  # a dangling link from an earlier install
            link.symlink_to(found[0])
    return binary


def input_data(settings: Settings, texts: list[tuple[str, ...]], target: Path) -> None:
    """perf_analyzer's --input-data: one entry per text, as the ensemble takes it."""
    from tasks.bench import new_tokens

    entries = []
    for text in texts:
        entry = {
            name: {"content": [value], "shape": [1]}
            for name, value in zip(settings.task.text_inputs, text)
        }
        if settings.task.generation:
            entry["MAX_NEW_TOKENS"] = {"content": [new_tokens(settings)], "shape": [1]}
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


def sweep(settings: Settings, protocol: str, url: str, texts: list) -> list[dict]:
    """perf_analyzer at each concurrency of the settings, on the served ensemble."""
    binary = fetch()
    environment = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent / "lib")}
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "input.json", Path(tmp) / "point.csv"
        input_data(settings, texts, data)
        for concurrency in settings.bench.concurrency:
            command = [
                str(binary),
                *("-m", settings.name, "-u", url, "-i", protocol, "--input-data", str(data)),
                *("--concurrency-range", f"{concurrency}:{concurrency}"),
                *("--measurement-interval", str(int(settings.bench.seconds * 1000))),
                *("--stability-percentage", "100", "--max-trials", "3", "-f", str(out)),
            ]
            run = subprocess.run(
                command, capture_output=True, text=True, env=environment, check=False
            )
            if run.returncode != 0 or not out.is_file():
                tail = " ".join((run.stdout + run.stderr).strip().splitlines()[-3:])
                raise BuildError(f"perf_analyzer failed at concurrency {concurrency}: {tail}")
            point = parse(out, concurrency, protocol)
            points.append(point)
            print(
                f"bench: triton {protocol} (perf_analyzer) concurrency {concurrency}: "
                f"{point['throughput']:.1f} req/s, p50 {point['p50_ms']} ms, "
                f"p95 {point['p95_ms']} ms",
                flush=True,
            )
            out.unlink()
    return points
