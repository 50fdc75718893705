"""Build tiny random decoders of the given model types through the parity stage and record the
outcome in tasks/data/decoder_parity.json, which docs/decoders.md shows (tasks/decoders.py).

    python -m tests.helpers.decoder_parity starcoder2 glm4 ...      # exporter=auto
    python -m tests.helpers.decoder_parity --exporter torch llama gpt2

Each type: a tiny random model (tests/helpers/models.py), then `doit parity` in a fresh copy
of the project; a failure records the last line of the error. What is recorded was run.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import tempfile
from pathlib import Path

from tasks import artifacts, paths
from tests.helpers.models import save_decoder_model
from tests.helpers.project import copy_project

SHAPES = ("batch=1,4,8", "seq=1,32,64")
ERROR = re.compile(r"^(\w+Error: .*)$", re.M)


def run_one(model_type: str, exporter: str, work: Path) -> dict:
    model = save_decoder_model(work / "models" / model_type, model_type)
    project = copy_project(work / f"project-{model_type}")
    run = project.doit(
        "task=causallm",
        f"model={model}",
        f"name=d{re.sub(r'[^A-Za-z0-9]', '', model_type)}",
        f"exporter={exporter}",
        *SHAPES,
        "parity",
        check=False,
        timeout=1800,
    )
    chosen = re.search(r"onnx: exporter (\w+)", run.output)
    record = {
        "exporter": chosen.group(1) if chosen else None,
        "parity": "passed" if run.returncode == 0 else "failed",
    }
    if run.returncode != 0:
        errors = ERROR.findall(run.output)
        record["error"] = (errors[-1] if errors else run.output.strip().splitlines()[-1])[:300]
    return record


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporter", default="auto")
    parser.add_argument("types", nargs="+")
    args = parser.parse_args(argv)
    for model_type in args.types:
        with tempfile.TemporaryDirectory(prefix=f"decoder-{model_type}-") as work:
            try:
                record = run_one(model_type, args.exporter, Path(work))
            except Exception as err:  # the tiny model itself could not be made
                record = {"parity": "failed", "error": f"{type(err).__name__}: {err}"[:300]}
        record["asked"] = args.exporter
        record["transformers"] = artifacts.versions("transformers")["transformers"]
        record["date"] = datetime.date.today().isoformat()
        results = (
            artifacts.read_json(paths.DECODER_PARITY) if paths.DECODER_PARITY.is_file() else {}
        )
        key = model_type if args.exporter == "auto" else f"{model_type} exporter={args.exporter}"
        results[key] = record
        artifacts.write_json(paths.DECODER_PARITY, dict(sorted(results.items())))
        print(model_type, record, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
