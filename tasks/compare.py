"""Runtimes against the PyTorch reference: Polygraphy runners and its comparator.

A leaf module (it imports only `catalog` and `errors`): the parity stage, generation parity
and the gates pass the files, feeds and tolerances down, so none of them imports another for
these helpers.
"""

from __future__ import annotations

import math
from pathlib import Path

from tasks import catalog
from tasks.errors import ParityError

REFERENCE = "pytorch"


def mean_pooled(hidden, mask):
    """sentence-transformers' mean pooling and L2 normalisation, as the graph computes it."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * weights).sum(1) / torch.clamp(weights.sum(1), min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


def engine_runners(onnx_file: Path, plan_file: Path | None = None) -> list:
    """Polygraphy runners of one exported part: ONNX Runtime always; TensorRT when the build
    made a plan."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    runners = [OnnxrtRunner(SessionFromOnnx(str(onnx_file)), name="onnxruntime")]
    if plan_file is not None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        engine = EngineFromBytes(BytesFromPath(str(plan_file)))
        runners.append(TrtRunner(engine, name="tensorrt"))
    return runners


class TensorRTStep:
    """One engine of the build as a callable step (Polygraphy's TrtRunner, outputs on host)."""

    def __init__(self, plan: Path) -> None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(plan))))
        self.runner.activate()
        self.inputs = list(self.runner.get_input_metadata().keys())

    def __call__(self, feed: dict) -> dict:
        # copies: the runner reuses its output buffers on the next call
        return {name: array.copy() for name, array in self.runner.infer(feed).items()}

    def close(self) -> None:
        self.runner.deactivate()


def compare(
    tol: catalog.Tolerance,
    runners: list,
    feeds: list[dict],
    reference: list[dict],
    labels: list[dict],
    expected: set[str],
) -> dict:
    """Run the engines on the feeds and compare each output to the reference.

    `labels` name each feed in the report (e.g. its batch and seq). Returns
    {runner: {output: [entry per feed]}}; raises ParityError naming every failing output."""
    from polygraphy.comparator import Comparator, CompareFunc, IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    engines = Comparator.run(runners, data_loader=feeds)
    ref_iterations = [IterationResult(outputs=out, runner_name=REFERENCE) for out in reference]
    results = RunResults([(REFERENCE, ref_iterations), *engines.items()])
    accuracy = Comparator.compare_accuracy(  # one AccuracyResult per compare function
        results,
        comparisons=[(0, i) for i in range(1, len(results))],
        compare_func=CompareFunc.simple(atol=tol.atol, rtol=tol.rtol),
    )[0]
    report = {}
    for (_, runner), iterations in accuracy.items():
        for label, per_output in zip(labels, iterations):
            for output, result in per_output.items():
                report.setdefault(runner, {}).setdefault(output, []).append(
                    {
                        **label,
                        # polygraphy gives a bare False when the shapes differ
                        "max_abs_diff": float(getattr(result, "max_absdiff", math.inf)),
                        "max_rel_diff": float(getattr(result, "max_reldiff", math.inf)),
                        "pass": bool(result),
                    }
                )
    failures = describe_failures(report, tol, labels[0].keys())
    for runner, outputs in report.items():
        if set(outputs) != expected:
            failures.append(f"{runner} compared {sorted(outputs)}, expected {sorted(expected)}")
    if failures:
        raise ParityError("outputs differ from the PyTorch reference: " + "; ".join(failures))
    return report


def describe_failures(report: dict, tol: catalog.Tolerance, keys) -> list[str]:
    """One line per failing output and runner: where it fails worst, and how often."""
    lines = []
    for runner, outputs in report.items():
        for output, entries in outputs.items():
            failed = [e for e in entries if not e["pass"]]
            if failed:
                worst = max(failed, key=lambda e: e["max_abs_diff"])
                where = " x ".join(f"{key} {worst[key]}" for key in keys)
                lines.append(
                    f"{output} ({runner}): max abs diff {worst['max_abs_diff']:.3g}, rel "
                    f"{worst['max_rel_diff']:.3g} at {where} (atol {tol.atol}, rtol {tol.rtol}; "
                    f"fails at {len(failed)} of {len(entries)} shapes)"
                )
    return lines


def print_passes(report: dict, prefix: str = "") -> None:
    for runner, outputs in report.items():
        for output, entries in outputs.items():
            worst = max(e["max_abs_diff"] for e in entries)
            print(f"parity: {prefix}{runner} {output}: max abs diff {worst:.3g} (pass)", flush=True)
