"""The parity stage for generation tasks (t5, causallm), called by tasks/parity.py.

Two proofs, both against the Hugging Face model in fp32 on CPU:
1. every exported file gives PyTorch's numbers (logits and KV cache) on real tokenized
   prompts, for the first decoding step and for a step that reads the cache;
2. greedy decoding with the serving loop (triton/generate/decoding.py) on ONNX Runtime, and
   on the TensorRT engines when the backend is tensorrt, yields the token ids `generate()`
   yields, the prompts batched together as the server batches them; with decoder=slots, the
   in-flight loop on the slot decoder's graph (tasks/slot_decoder.py) too, the prompts
   joining a running batch at two times.
"""

from __future__ import annotations

import time

from tasks import artifacts, catalog, paths, profiles
from tasks.compare import TensorRTStep, compare, engine_runners, print_passes
from tasks.errors import ParityError
from tasks.facts import checkpoint_facts
from tasks.settings import Settings


def load_decoding():
    """The runtime's decoding loop (triton/generate/decoding.py), the one that serves."""
    return artifacts.load_runtime("generate", "decoding.py")


def load_inflight() -> dict:
    """The in-flight loop's modules that run outside Triton too (triton/inflight/: all but
    jobs.py), after the decoding and encoding modules they import, by name."""
    import sys

    modules = {"decoding": load_decoding()}
    runtime = sys.modules["llm_in_triton_runtime"]  # loaded with decoding, as in Triton
    runtime.load(paths.runtime_file("tokenizer", "encoding.py").parent, "encoding")
    for name in ("batch", "detokenizer", "scheduler"):
        modules[name] = runtime.load(paths.runtime_file("inflight", f"{name}.py").parent, name)
    return modules


def close_steps(steps: dict) -> None:
    """Release the steps that hold resources (TensorRT runners); the others have nothing."""
    for step in steps.values():
        getattr(step, "close", lambda: None)()


class LoopJob:
    """A request as the in-flight loop takes one outside Triton (scheduler.py's job), timed:
    nobody cancels and nothing is refused; a loop that fails raises its own error."""

    def __init__(self, row) -> None:
        self.rows, self.began, self.ended = [row], time.perf_counter(), None

    def cancelled(self) -> bool:
        return False

    def stepped(self) -> None:
        pass

    def finish(self) -> None:
        self.ended = time.perf_counter()

    def cancel(self, message: str = "cancelled") -> None:
        self.ended = self.ended or time.perf_counter()

    reject = fail = cancel


def slot_step(settings: Settings, decoding, rows: int, positions: int, mixed: bool = True):
    """decoder=slots: the built graphs on ONNX Runtime with `rows` slots of `positions`, and
    the deployment's threads, as the generate model makes them (`mixed` False: the step's
    graph alone, without its twin that prefills joining prompts in the step)."""
    serving = settings.serving
    (graph, _), (twin, _) = paths.slot_decoder_files(settings.name)
    return decoding.OnnxRuntimeSlotStep(
        graph, rows, positions, serving.ort_threads, serving.ort_spin, mixed=twin if mixed else None
    )


def running_batch(settings: Settings, facts: dict, modules: dict):
    """The in-flight loop's batch on this build's files, as the generate model makes it: the
    slot decoder's graph (decoder=slots), or the exported parts."""
    if settings.decoder == "slots":
        positions = profiles.slot_positions(settings, facts["max_positions"])  # slot_buffer's
        step = slot_step(settings, modules["decoding"], settings.batch.max, positions)
        return modules["batch"].RunningBatch("slots", {"decoder_slots": step}, facts["pad_id"])
    _, generator = make_generator(settings, facts)  # its steps and cache limit
    return modules["batch"].RunningBatch(
        settings.task.generation, generator.steps, facts["pad_id"],
        int(facts["decoder_start_id"]), generator.cache_limit,
    )  # fmt: skip


def slots_parity(settings: Settings, model, ids, mask, facts: dict) -> dict:
    """decoder=slots: the in-flight loop on the slot graph, greedy, against generate(): half
    the prompts first, the others joining two steps later (into a running batch)."""
    modules = load_inflight()
    new = min(catalog.GENERATION_PARITY_NEW_TOKENS, settings.max_new_tokens)
    loop = modules["scheduler"].Scheduler(
        running_batch(settings, facts, modules),
        facts["eos_ids"],
        max_rows=settings.batch.max,
        prefill_waste=catalog.PREFILL_WASTE[settings.task.generation],  # as the server's
    )
    jobs = [
        LoopJob(
            modules["scheduler"].Row(
                ids[row, : int(mask[row].sum())],
                modules["decoding"].RowParams(new),
                modules["detokenizer"].TextStream(lambda tokens: ""),
            )
        )
        for row in range(len(ids))
    ]
    early = (len(jobs) + 1) // 2
    for job in jobs[:early]:
        loop.submit(job)
    for _ in range(2):
        loop.iterate()
    for job in jobs[early:]:
        loop.submit(job)
    while loop.waiting or loop.running:
        loop.iterate()
    mismatches = []
    for row, (job, prompt) in enumerate(zip(jobs, catalog.GENERATION_PROMPTS)):
        expected = reference_tokens(model, "causal", ids, mask, row, new, facts)
        if job.rows[0].tokens != expected:
            mismatches.append(
                f"prompt {prompt!r}: slots {job.rows[0].tokens}, generate() {expected}"
            )
    if mismatches:
        raise ParityError(
            "greedy decoding on the slot decoder (decoder=slots) differs from Hugging Face "
            "generate(): " + "; ".join(mismatches)
        )
    print(
        f"parity: the slot decoder's in-flight loop, {len(jobs)} prompts joining at two times "
        f"x {new} tokens, equals generate()",
        flush=True,
    )
    return {"prompts": len(jobs), "new_tokens": new, "equal": True}


def make_generator(settings: Settings, facts: dict, engines: bool = False):
    """(the decoding module, its Generator), as the server makes it: on this build's ONNX files,
    or with `engines` on its TensorRT plans."""
    decoding = load_decoding()
    parts = settings.task.onnx_parts
    if engines:
        steps = {}
        try:
            for part in parts:
                steps[part] = TensorRTStep(paths.plan_file(settings.name, part))
        except Exception:
            close_steps(steps)
            raise
    else:
        files = {part: settings.model_file(part) for part in parts}
        serving = settings.serving  # the threads the server gives the steps
        steps = decoding.onnxruntime_steps(files, serving.ort_threads, serving.ort_spin)
    generator = decoding.Generator(
        settings.task.generation,
        steps,
        eos_ids=facts["eos_ids"],
        pad_id=facts["pad_id"],
        start_id=int(facts["decoder_start_id"]),
        cache_limit=profiles.cache_limit(settings, facts["max_positions"]),
    )
    return decoding, generator


def cache_tensors(cache, kind: str) -> dict:
    """A transformers cache as the exported files name it: present.{i}[.decoder|.encoder].key"""
    if kind == "causal":
        layers = {"": cache.layers}
    else:
        layers = {
            ".decoder": cache.self_attention_cache.layers,
            ".encoder": cache.cross_attention_cache.layers,
        }
    found = {}
    for suffix, entries in layers.items():
        for index, layer in enumerate(entries):
            found[f"present.{index}{suffix}.key"] = layer.keys.detach().clone().numpy()
            found[f"present.{index}{suffix}.value"] = layer.values.detach().clone().numpy()
    return found


def as_past(presents: dict) -> dict:
    """Cache outputs of one step as the cache inputs of the next."""
    return {
        "past_key_values." + k[len("present.") :]: v
        for k, v in presents.items()
        if k.startswith("present.")
    }


def last(logits):
    """The last position's logits: all the exported decoders return (see tasks/export.py)."""
    return logits[:, -1:].contiguous().numpy()


def _torch(feed: dict, names: set[str]) -> dict:
    import torch

    return {k: torch.from_numpy(v) for k, v in feed.items() if k in names}


def causal_steps(model, ids, mask, whole_cache: bool = False) -> dict:
    """decoder_model: the prompt without a cache; decoder_with_past_model: a token reading it.

    `whole_cache`: the files keep sliding-window layers' cache whole, as the generic exporter's
    do (their mask, not their cache, limits what those layers see)."""
    import numpy as np
    from transformers import DynamicCache

    width, lengths = ids.shape[1], mask.sum(axis=1)
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for row, length in enumerate(lengths):  # left padding, as generate() and the server do
        left_ids[row, width - length :] = ids[row, :length]
        left_mask[row, width - length :] = 1
    positions = np.where(left_mask == 1, left_mask.cumsum(axis=1) - 1, 1)
    feed = {"input_ids": left_ids, "attention_mask": left_mask, "position_ids": positions}
    cache = {"past_key_values": DynamicCache()} if whole_cache else {}  # no config: whole
    out = model(**_torch(feed, set(feed)), use_cache=True, **cache)
    first = {"logits": last(out.logits), **cache_tensors(out.past_key_values, "causal")}
    feed2 = {
        "input_ids": out.logits[:, -1].argmax(-1, keepdim=True).numpy(),
        "attention_mask": np.concatenate([left_mask, np.ones((len(ids), 1), np.int64)], axis=1),
        "position_ids": positions[:, -1:] + 1,
    }
    past = as_past(first)
    out2 = model(**_torch(feed2, set(feed2)), past_key_values=out.past_key_values, use_cache=True)
    second = {"logits": last(out2.logits), **cache_tensors(out2.past_key_values, "causal")}
    return {
        "decoder_model": [(feed, first)],
        "decoder_with_past_model": [({**feed2, **past}, second)],
    }


def seq2seq_steps(model, ids, mask, start_id: int) -> dict:
    """encoder_model, decoder_model (first step), decoder_with_past_model (a cached step)."""
    import numpy as np
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    encoder_feed = {"input_ids": ids, "attention_mask": mask}
    hidden = model.get_encoder()(**_torch(encoder_feed, set(encoder_feed))).last_hidden_state
    encoded = BaseModelOutput(last_hidden_state=hidden)
    start = np.full((len(ids), 1), start_id, np.int64)
    out = model(
        encoder_outputs=encoded,
        attention_mask=torch.from_numpy(mask),
        decoder_input_ids=torch.from_numpy(start),
        use_cache=True,
    )
    first = {"logits": last(out.logits), **cache_tensors(out.past_key_values, "seq2seq")}
    tokens = out.logits[:, -1].argmax(-1, keepdim=True)
    past = as_past(first)
    out2 = model(
        encoder_outputs=encoded,
        attention_mask=torch.from_numpy(mask),
        decoder_input_ids=tokens,
        past_key_values=out.past_key_values,
        use_cache=True,
    )
    second = {
        "logits": last(out2.logits),
        **{
            k: v
            for k, v in cache_tensors(out2.past_key_values, "seq2seq").items()
            if ".decoder." in k
        },
    }
    hidden = hidden.detach().numpy()
    return {
        "encoder_model": [(encoder_feed, {"last_hidden_state": hidden})],
        "decoder_model": [
            (
                {
                    "encoder_attention_mask": mask,
                    "input_ids": start,
                    "encoder_hidden_states": hidden,
                },
                first,
            )
        ],
        "decoder_with_past_model": [
            ({"encoder_attention_mask": mask, "input_ids": tokens.numpy(), **past}, second)
        ],
    }


def file_parity(settings: Settings, model, ids, mask, facts: dict) -> dict:
    """Each exported file (and its engine, on TensorRT) against PyTorch on the same inputs:
    {part: {runner: {output: ...}}}."""
    name, spec = settings.name, settings.task
    takes = {  # the inputs each file takes, as the export recorded them
        part: {t["name"] for t in artifacts.read_json(paths.onnx_io(name, part))["inputs"]}
        for part in spec.onnx_parts
    }
    if spec.generation == "causal":
        steps = causal_steps(model, ids, mask, whole_cache=exported_by(settings) == "torch")
    else:
        steps = seq2seq_steps(model, ids, mask, int(facts["decoder_start_id"]))
    report = {}
    for part, pairs in steps.items():
        feeds = [{k: v for k, v in feed.items() if k in takes[part]} for feed, _ in pairs]
        reference = [ref for _, ref in pairs]
        labels = [{"step": step, "batch": len(ids)} for step in range(len(pairs))]
        runners = engine_runners(settings.model_file(part), settings.plan_file(part))
        report[part] = compare(
            settings.tolerance, runners, feeds, reference, labels, set(reference[0])
        )
        print_passes(report[part], prefix=f"{part} ")
    return report


def reference_tokens(model, kind: str, ids, mask, row: int, new: int, facts: dict) -> list:
    """generate()'s greedy new token ids for one row of the batch, alone (fp32 PyTorch)."""
    import torch

    length = int(mask[row].sum())
    prompt = torch.from_numpy(ids[row : row + 1, :length])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        do_sample=False,
        num_beams=1,
        pad_token_id=facts["pad_id"],
        eos_token_id=facts["eos_ids"] or None,
    )
    return (out[0, length:] if kind == "causal" else out[0, 1:]).tolist()


def greedy_parity(settings: Settings, model, ids, mask, facts: dict, engines: bool) -> dict:
    """The serving loop, greedy, against generate(): the same new token ids, prompt by prompt
    (on the ONNX files, or with `engines` on the TensorRT plans)."""

    decoding, generator = make_generator(settings, facts, engines)
    new = min(catalog.GENERATION_PARITY_NEW_TOKENS, settings.max_new_tokens)
    try:
        served = generator.generate(ids, mask, [decoding.RowParams(new)] * len(ids))
    finally:
        close_steps(generator.steps)
    runtime = "tensorrt" if engines else "onnxruntime"
    mismatches = []
    for row, prompt in zip(range(len(ids)), catalog.GENERATION_PROMPTS):
        expected = reference_tokens(model, settings.task.generation, ids, mask, row, new, facts)
        if served[row] != expected:
            mismatches.append(f"prompt {prompt!r}: served {served[row]}, generate() {expected}")
    if mismatches:
        hint = (
            " (fp16 can flip near-ties: try precision=fp32)" if settings.precision == "fp16" else ""
        )
        raise ParityError(
            f"greedy decoding on {runtime} differs from Hugging Face generate(){hint}: "
            + "; ".join(mismatches)
        )
    print(
        f"parity: greedy decoding on {runtime} of {len(ids)} prompts x {new} tokens "
        "equals generate()",
        flush=True,
    )
    return {"prompts": len(ids), "new_tokens": new, "equal": True, "tokens": served}


def exported_by(settings: Settings) -> str | None:
    """Which exporter wrote the files (their io.json says): "torch", "optimum (...)"."""
    io = artifacts.read_json(paths.onnx_io(settings.name, settings.task.onnx_parts[0]))
    return io.get("exporter")


def reference_model(settings: Settings):
    """The Hugging Face model in fp32. Files of the generic exporter are judged against eager
    attention, which they compute: transformers' sdpa path lets a left-padded row's padding
    positions attend to everything, so the cache at those positions (which no later query reads)
    differs, while every logit and every cache entry a query reads are the same."""
    import torch
    import transformers

    name, spec = settings.name, settings.task
    attention = {"attn_implementation": "eager"} if exported_by(settings) == "torch" else {}
    model_class = getattr(transformers, spec.auto_class)
    return model_class.from_pretrained(
        paths.source_dir(name), dtype=torch.float32, **attention
    ).eval()


def check(settings: Settings) -> dict:
    import numpy as np
    import torch
    import transformers

    name = settings.name
    source = paths.source_dir(name)
    facts = checkpoint_facts(name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token_id = facts["pad_id"]
    tokenizer.padding_side = "right"  # as the Triton tokenizer pads
    # as many prompts as a batch may hold, no longer than a prompt may be: the engines'
    # profiles take nothing else
    prompts = list(catalog.GENERATION_PROMPTS[: settings.batch.max])
    encoded = tokenizer(
        prompts, padding=True, truncation=True, max_length=settings.seq.max, return_tensors="np"
    )
    ids = encoded["input_ids"].astype(np.int64)
    mask = encoded["attention_mask"].astype(np.int64)
    model = reference_model(settings)
    with torch.inference_mode():
        files = file_parity(settings, model, ids, mask, facts)
        generation = greedy_parity(settings, model, ids, mask, facts, engines=False)
        report = {"files": files, "generation": generation}
        if settings.decoder == "slots":
            report["generation_slots"] = slots_parity(settings, model, ids, mask, facts)
        if settings.backend == "tensorrt":
            report["generation_tensorrt"] = greedy_parity(
                settings, model, ids, mask, facts, engines=True
            )
    return report


def check_gated(settings: Settings) -> dict:
    """A quantized decoder: greedy tokens of the serving loop on the quantized files against
    fp32 generate() over the first GATE_NEW_TOKENS, and (causal LMs) how far the first
    next-token log-probability of generate()'s token moves; judged by the task's gates."""
    import numpy as np
    import torch
    import transformers

    from tasks import gates

    name, spec = settings.name, settings.task
    source, facts = paths.source_dir(name), checkpoint_facts(name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token_id = facts["pad_id"]
    tokenizer.padding_side = "right"  # as the Triton tokenizer pads
    held = [t for t in paths.HELD_TEXTS.read_text().splitlines() if t.strip()]
    prompts = [*catalog.GENERATION_PROMPTS, *held[:8]]
    new = min(catalog.GATE_NEW_TOKENS, settings.max_new_tokens)
    longest = settings.seq.max
    if spec.generation == "causal" and facts["max_positions"]:
        longest = min(longest, facts["max_positions"] - new)
    encoded = tokenizer(
        prompts, padding=True, truncation=True, max_length=longest, return_tensors="np"
    )
    ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
    model = reference_model(settings)
    engines = settings.backend == "tensorrt"  # what is served: the engines, or the files
    decoding, generator = make_generator(settings, facts, engines)
    try:
        served = generator.generate(ids, mask, [decoding.RowParams(new)] * len(ids))
    finally:
        close_steps(generator.steps)
    agreement, changes = [], []
    first = None
    if spec.generation == "causal":
        if engines:
            first = TensorRTStep(paths.plan_file(name, "decoder_model"))
        else:
            first = decoding.OnnxRuntimeStep(settings.model_file("decoder_model"))
        takes = first.inputs
    with torch.inference_mode():
        for row in range(len(ids)):
            expected = reference_tokens(model, spec.generation, ids, mask, row, new, facts)
            equal = sum(a == b for a, b in zip(served[row], expected))
            agreement.append(equal / max(len(expected), 1))
            if first is not None:
                length = int(mask[row].sum())
                prompt = torch.from_numpy(ids[row : row + 1, :length])
                feed = {
                    "input_ids": prompt.numpy(),
                    "attention_mask": np.ones((1, length), np.int64),
                    "position_ids": np.arange(length, dtype=np.int64)[None],
                }
                logits = first({k: feed[k] for k in takes})["logits"][0, -1]
                mine = torch.log_softmax(torch.from_numpy(logits).double(), -1)
                theirs = torch.log_softmax(model(prompt).logits[0, -1].double(), -1)
                token = int(theirs.argmax())
                changes.append(abs(float(mine[token] - theirs[token])))
    if first is not None:
        close_steps({"decoder_model": first})
    metrics = {"token_agreement": float(np.mean(agreement))}
    if changes:
        metrics["logprob_change_mean"] = float(np.mean(changes))
    report = gates.judge(settings, metrics, {}, len(prompts))
    report["new_tokens"] = new
    return {"generation": report}
