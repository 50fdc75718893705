"""`doit bench` on a mixture-of-experts deployment: what the exported fixed loop costs against
top-k routing (report.json's `moe_dense_vs_topk`).

The generic exporter (tasks/export_torch.py) runs every expert on every token, weighted by the
routing, because torch.export cannot trace transformers' loop over the experts a batch hit. This
times one MoE block of the deployment's own checkpoint in PyTorch on one thread, at a few token
counts (one decode row, a decode step of 16 rows, a prompt): transformers' sparse top-k forward
against the same block with the fixed loop the export used. Same weights, same inputs; the
ratio is the compute the fixed loop adds to that block (attention is not in it). Each figure is
the CPU time of the one thread that runs it, so that other work on a shared machine, which
stretches wall time, does not count.
"""

from __future__ import annotations

import time
from pathlib import Path

from tasks import artifacts, paths
from tasks.settings import Settings

TOKENS = (1, 16, 256)  # one decode row, a decode step of 16 rows, a prompt
REPEATS, MIN_SECONDS = 5, 0.2  # per figure: the median of at least REPEATS calls, or seconds


def median_ms(call, seconds: float = MIN_SECONDS) -> float:
    """The median CPU time of `call()` on this thread in ms, over at least REPEATS calls and
    `seconds` of wall time."""
    import statistics

    call()  # warm up
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < REPEATS or time.perf_counter() - began < seconds:
        start = time.thread_time()
        call()
        times.append(time.thread_time() - start)
    return round(statistics.median(times) * 1000, 3)


def block_cost(model_dir: Path, tokens: tuple[int, ...] = TOKENS) -> dict | None:
    """Fixed loop against top-k routing for the checkpoint's first MoE block that the export
    replaces (MOE_BLOCKS); None when the model has none."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.export_torch import MOE_BLOCKS, patch_moe_blocks

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    block = next((m for m in model.modules() if type(m).__name__ in MOE_BLOCKS), None)
    if block is None:
        return None
    spec = MOE_BLOCKS[type(block).__name__]
    width = model.config.get_text_config(decoder=True).hidden_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        inputs = {n: torch.randn(1, n, width, generator=generator) for n in tokens}
        with torch.inference_mode():
            topk = {n: median_ms(lambda n=n: block(inputs[n])) for n in tokens}
            patch_moe_blocks(model)  # the block now runs as exported
            fixed = {n: median_ms(lambda n=n: block(inputs[n])) for n in tokens}
    finally:
        torch.set_num_threads(threads)
    experts = len(getattr(block, spec.experts))
    top_k = getattr(block, spec.top_k, None)
    return {
        "block": type(block).__name__,
        "experts": experts,
        "top_k": top_k,
        "expert_flops_ratio": round(experts / top_k, 2) if top_k else None,
        "threads": 1,
        "points": [
            {
                "tokens": n,
                "topk_ms": topk[n],
                "fixed_loop_ms": fixed[n],
                "ratio": round(fixed[n] / topk[n], 2) if topk[n] else None,
            }
            for n in tokens
        ],
    }


def measure(settings: Settings) -> dict | None:
    """The deployment's MoE cost, when the generic path exported it with the fixed loop."""
    record = paths.onnx_io(settings.name, settings.task.onnx_parts[0])
    if not settings.task.generation or artifacts.read_json(record).get("exporter") != "torch":
        return None
    found = block_cost(paths.source_dir(settings.name))
    if found is not None:
        print(f"bench: moe_dense_vs_topk {report_line(found)}", flush=True)
    return found


def report_line(found: dict) -> str:
    """One line of report.md: the ratio at each token count."""
    ratios = ", ".join(f"{p['ratio']}x at {p['tokens']} tokens" for p in found["points"])
    return (
        f"{found['block']} ({found['experts']} experts, top {found['top_k']}), PyTorch on one "
        f"thread: the exported fixed loop takes {ratios} the CPU time of top-k routing"
    )
