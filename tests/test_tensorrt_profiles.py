"""The TensorRT profiles of the generation parts hold every shape decoding feeds them.

TensorRT refuses an input outside its engine's profile, so each profile must cover what the
decoding loop sends at the extremes the deployment allows (a MAX-token prompt, MAX new
tokens) and at the smallest. This runs the real loop on ONNX Runtime over the real exported
files, records every feed, and checks it against `plan.profile_shapes`: no TensorRT needed.
"""

from __future__ import annotations

import numpy as np
import pytest

from tasks import artifacts, paths, plan
from tests.conftest import copy_project
from tests.test_settings import settings_from

SEQ = "1,6,12"  # MAX prompt tokens = MAX new tokens = 12
CASES = {"causallm": "gpt2", "t5": "t5"}


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


@pytest.mark.parametrize("task", sorted(CASES))
def test_profiles_cover_every_shape_decoding_feeds(exported, task):
    from tasks.generation_parity import load_decoding

    chosen = settings_from(task=task, seq=SEQ, batch="1,2,4")
    decoding = load_decoding()
    seen = {part: [] for part in chosen.task.onnx_parts}
    steps = {
        part: Recorder(
            decoding.OnnxRuntimeStep(exported.path(paths.onnx_file(task, part))), seen[part]
        )
        for part in chosen.task.onnx_parts
    }
    generator = decoding.Generator(chosen.task.generation, steps, eos_ids=[], pad_id=0, start_id=0)
    most = chosen.max_new_tokens
    rng = np.random.default_rng(0)
    for batch, width, lengths, new in [
        (4, 12, [12, 3, 1, 7], [most, 2, most, 1]),  # the longest prompt, the most new tokens
        (1, 1, [1], [2]),  # the smallest that reaches the cached step
    ]:
        ids = rng.integers(3, 200, (batch, width)).astype(np.int64)
        mask = (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        produced = generator.generate(ids, mask, [decoding.RowParams(n) for n in new])
        assert [len(p) for p in produced] == new

    for part in chosen.task.onnx_parts:
        io = artifacts.read_json(exported.path(paths.onnx_io(task, part)))
        profile = plan.profile_shapes(chosen, part, io)
        assert set(profile) == set(seen[part][0])
        for feed in seen[part]:
            for name, shape in feed.items():
                low, _, high = profile[name]
                assert all(a <= d <= b for a, d, b in zip(low, shape, high)), (part, name, shape)
        # the bounds are tight: the longest case reaches every maximum
        for name, (_, _, high) in profile.items():
            reached = np.max([feed[name] for feed in seen[part]], axis=0)
            assert tuple(reached) == high, (part, name)


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
