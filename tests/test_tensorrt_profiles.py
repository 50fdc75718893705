"""The TensorRT profiles of the generation parts hold every shape decoding feeds them.

TensorRT refuses an input outside its engine's profile, so each profile must cover what the
decoding loop sends at the extremes the deployment allows (a MAX-token prompt, MAX new
tokens) and at the smallest. This runs the real loop on ONNX Runtime over the real exported
files, records every feed, and checks it against `profiles.profile_shapes`: no TensorRT needed.
The worst mix of rows (a long prompt asking few tokens with a short one asking many) needs a
longer shared cache than any row alone: the loop must split it so that the profile holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks import artifacts, catalog, paths, profiles
from tasks.generation_parity import load_inflight
from tests.helpers.inflight import LocalJob
from tests.helpers.project import copy_project
from tests.helpers.stages import settings_from

SEQ = "4,6,12"  # MIN 4: prompts may still be shorter; MAX prompt = MAX new tokens = 12
CASES = {"causallm": "gpt2", "t5": "t5"}
WIDEST = {  # batch, width, prompt lengths, new tokens: the longest prompt, the most tokens
    "causallm": (4, 12, [12, 3, 1, 7], [12, 2, 12, 1]),
    "t5": (4, 12, [12, 3, 1, 7], [12, 2, 12, 1]),
    # a model's positions cap the cache: 100 + 28 new tokens fill GPT-2's 128
    "causallm-positions": (4, 100, [100, 3, 1, 7], [28, 2, 28, 1]),
}
WORST = {  # each row fits alone; together their shared cache is the longest a batch can want
    "causallm": (4, 12, [12, 1, 12, 1], [1, 12, 1, 12]),
    "t5": (4, 12, [12, 1, 12, 1], [1, 12, 1, 12]),
    # 100 + 28 and 1 + 100 each fit GPT-2's 128 positions; together 100 + 100 would not
    "causallm-positions": (4, 100, [100, 1, 100, 1], [28, 100, 28, 100]),
}
SPLITS = {"causallm": 1, "t5": 1, "causallm-positions": 2}  # batches the worst mix decodes in
SMALLEST = (1, 1, [1], [2])  # a one-token prompt (below MIN) that reaches the cached step


class Recorder:
    """A step that runs another and records the shape of everything it is fed."""

    def __init__(self, step, seen: list):
        self.step, self.seen, self.inputs = step, seen, step.inputs

    def __call__(self, feed: dict) -> dict:
        self.seen.append({name: value.shape for name, value in feed.items()})
        return self.step(feed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, generation_models):
    project = copy_project(tmp_path_factory.mktemp("profiles") / "project")
    for task, family in CASES.items():
        project.doit(f"task={task}", f"model={generation_models[family]}", f"seq={SEQ}", "onnx")
    return project


@pytest.mark.parametrize("case", sorted(WIDEST))
def test_profiles_cover_every_shape_decoding_feeds_and_no_more(exported, generation_models, case):
    from tasks.generation_parity import load_decoding

    task = case.split("-")[0]
    positions = 0
    if case.endswith("positions"):
        config = json.loads((generation_models[CASES[task]] / "config.json").read_text())
        positions = config["n_positions"]  # as build_engine reads it from the checkpoint
    seq = "1,50,100" if positions else SEQ
    chosen = settings_from(task=task, seq=seq, batch="1,2,4")
    decoding = load_decoding()
    seen = {part: [] for part in chosen.task.onnx_parts}
    steps = {
        part: Recorder(
            decoding.OnnxRuntimeStep(exported.path(paths.onnx_file(task, part))), seen[part]
        )
        for part in chosen.task.onnx_parts
    }
    limit = profiles.cache_limit(chosen, positions)
    generator = decoding.Generator(
        chosen.task.generation, steps, eos_ids=[], pad_id=0, start_id=0, cache_limit=limit
    )
    rng = np.random.default_rng(0)
    for batch, width, lengths, new in (WIDEST[case], SMALLEST, WORST[case]):
        ids = rng.integers(3, 200, (batch, width)).astype(np.int64)
        mask = (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        params = [decoding.RowParams(n) for n in new]
        produced = generator.generate(ids, mask, params)
        assert [len(p) for p in produced] == new
    # the worst mix: split as needed, and every row's tokens are the tokens it gets alone
    kind = chosen.task.generation
    lengths, new = np.array(WORST[case][2]), WORST[case][3]
    params = [decoding.RowParams(n) for n in new]
    assert decoding.cache_need(kind, max(lengths), max(new)) > limit or SPLITS[case] == 1
    assert len(decoding.cache_batches(kind, lengths, params, limit)) == SPLITS[case]
    for row in range(len(new)):
        alone = generator.generate(
            ids[row : row + 1, : lengths[row]],
            mask[row : row + 1, : lengths[row]],
            params[row : row + 1],
        )
        assert alone[0] == produced[row], (case, row)

    for part in chosen.task.onnx_parts:
        io = artifacts.read_json(exported.path(paths.onnx_io(task, part)))
        profile = profiles.profile_shapes(chosen, part, io, positions)
        assert set(profile) == set(seen[part][0])
        for feed in seen[part]:
            for name, shape in feed.items():
                low, _, high = profile[name]
                assert all(a <= d <= b for a, d, b in zip(low, shape, high)), (part, name, shape)
        # the bounds are tight: the widest case reaches every maximum, the smallest every minimum
        for name, (low, _, high) in profile.items():
            shapes = [feed[name] for feed in seen[part]]
            assert tuple(np.max(shapes, axis=0)) == high, (part, name)
            assert tuple(np.min(shapes, axis=0)) == low, (part, name)


@pytest.mark.parametrize("case", sorted(WIDEST))
def test_in_flight_steps_stay_in_the_profile_and_each_row_decodes_as_alone(
    exported, generation_models, case
):
    """Rows at the profile's edges arrive at different steps, more than the batch MAX holds:
    every step's shapes stay within the profile (the rows that do not fit wait, none is
    refused), and each row's tokens are the tokens it gets alone."""
    modules = load_inflight()
    decoding, batch, scheduler = modules["decoding"], modules["batch"], modules["scheduler"]
    task = case.split("-")[0]
    positions = 0
    if case.endswith("positions"):
        config = json.loads((generation_models[CASES[task]] / "config.json").read_text())
        positions = config["n_positions"]
    chosen = settings_from(task=task, seq="1,50,100" if positions else SEQ, batch="1,2,4")
    seen = {part: [] for part in chosen.task.onnx_parts}
    files = {part: exported.path(paths.onnx_file(task, part)) for part in chosen.task.onnx_parts}
    plain = decoding.onnxruntime_steps(files)
    steps = {part: Recorder(step, seen[part]) for part, step in plain.items()}
    limit = profiles.cache_limit(chosen, positions)
    kind = chosen.task.generation
    running = batch.RunningBatch(kind, steps, pad_id=0, start_id=0, cache_limit=limit)
    loop = scheduler.Scheduler(  # prompts that join at once prefill as the server groups them
        running, eos_ids=[], max_rows=chosen.batch.max, prefill_waste=catalog.PREFILL_WASTE[kind]
    )
    rng = np.random.default_rng(0)
    arrivals = []  # (step it arrives at, prompt, new tokens)
    for at, (_, _, lengths, new) in zip((0, 2, 3), (WIDEST[case], WORST[case], SMALLEST)):
        for offset, (length, n) in enumerate(zip(lengths, new)):
            arrivals.append((at + offset, rng.integers(3, 200, length).astype(np.int64), n))
    jobs, widest = {}, 0
    try:
        for step in range(400):
            for index, (at, prompt, n) in enumerate(arrivals):
                if at == step:
                    text = modules["detokenizer"].TextStream(lambda ids: "")
                    jobs[index] = LocalJob([scheduler.Row(prompt, decoding.RowParams(n), text)])
                    assert loop.submit(jobs[index])
            loop.iterate()
            widest = max(widest, len(running))
            if len(jobs) == len(arrivals) and all(job.outcome for job in jobs.values()):
                break
    finally:
        loop.stop()
    assert [jobs[i].outcome for i in range(len(arrivals))] == ["finished"] * len(arrivals)
    assert widest == chosen.batch.max  # full, so rows had to wait
    generator = decoding.Generator(kind, plain, eos_ids=[], pad_id=0, start_id=0)
    for index, (_, prompt, n) in enumerate(arrivals):
        alone = generator.generate(
            prompt[None], np.ones((1, len(prompt)), np.int64), [decoding.RowParams(n)]
        )
        assert jobs[index].rows[0].tokens == alone[0], (case, len(prompt), n)
    for part in chosen.task.onnx_parts:
        io = artifacts.read_json(exported.path(paths.onnx_io(task, part)))
        profile = profiles.profile_shapes(chosen, part, io, positions)
        for feed in seen[part]:
            for name, shape in feed.items():
                low, _, high = profile[name]
                assert all(a <= d <= b for a, d, b in zip(low, shape, high)), (part, name, shape)


def test_decoders_return_the_last_positions_logits_only(exported):
    """Decoding reads one position; the first step's every position would be batch x prompt x
    vocab floats (3.3 GB for OPT-125M at the defaults)."""
    for task in CASES:
        for part in ("decoder_model", "decoder_with_past_model"):
            io = artifacts.read_json(exported.path(paths.onnx_io(task, part)))
            logits = next(o for o in io["outputs"] if o["name"] == "logits")
            assert logits["shape"][:2] == ["batch_size", 1], (task, part, logits)


@pytest.mark.slow  # 11 s; the pruning of parts a switch leaves: test_parity_models' switch
def test_switching_decoder_leaves_no_step_models_behind_and_clean_removes_all(
    exported, generation_models
):
    """The step models of decoder=models would still be loaded by Triton after a switch."""
    common = ("task=t5", f"model={generation_models['t5']}", f"seq={SEQ}")
    exported.doit(*common, "decoder=models")
    models = exported.root / "models"
    assert (models / "t5_decoder_past" / "1" / "model.onnx").is_file()
    exported.doit(*common)  # back to inline
    assert sorted(p.name for p in models.iterdir() if p.name.startswith("t5")) == [
        "t5",
        "t5_generate",
        "t5_stream",
        "t5_tokenizer",
    ]
    assert not (exported.root / "model_zoo/t5/pbtxt/decoder_model.pbtxt").exists()
    exported.doit(*common, "decoder=models")
    exported.doit("clean", *common)  # with the other decoder's variables: still everything
    exported.doit("clean", "task=causallm", f"model={generation_models['gpt2']}", f"seq={SEQ}")
    left = exported.git("status", "--ignored", "--short").split("\n")
    assert [line for line in left if line and ".doit.db" not in line] == []
