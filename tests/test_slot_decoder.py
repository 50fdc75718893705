"""The slot decoder (tasks/slot_decoder.py, batch.SlotGroup): a tiny random Llama's graph on
GroupQueryAttention, its cache written in place, decodes each row as generate() does, whatever
its batch-mates and whenever it joins."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.generation_parity import load_inflight
from tests.helpers.inflight import LocalJob

PROMPTS = ["The quick brown fox", "A short one.", "東京は日本の首都です。", "Emoji 🙂 and café"]
NEW = [30, 5, 22, 12]


def _job(modules: dict, tokenizer, prompt: str, new: int) -> LocalJob:
    ids = np.array(tokenizer(prompt)["input_ids"], dtype=np.int64)
    text = modules["detokenizer"].TextStream(lambda tokens: tokenizer.decode(tokens))
    row = modules["scheduler"].Row(ids, modules["decoding"].RowParams(new), text)
    return LocalJob([row])


@pytest.fixture(scope="module")
def slots(tmp_path_factory):
    """A tiny random Llama with heads of 16 values (GroupQueryAttention's least), its graph."""
    from tasks import slot_decoder
    from tests.helpers.models import save_llama16

    model_dir = save_llama16(tmp_path_factory.mktemp("llama16"), max_positions=256)
    target = tmp_path_factory.mktemp("slots") / "decoder_slots.onnx"
    slot_decoder.build(model_dir, target)
    mixed = target.with_name("decoder_slots_mixed.onnx")
    slot_decoder.build(model_dir, mixed, mixed=True)
    return model_dir, target, mixed


def test_what_the_graph_does_not_take_is_refused_in_words():
    from transformers import GPT2Config, LlamaConfig, MistralConfig

    from tasks import slot_decoder

    for config, reason in [
        (GPT2Config(), "model type 'gpt2' has no slot decoder"),
        (LlamaConfig(hidden_size=32, num_attention_heads=4), "a head of 8 values"),
        (LlamaConfig(hidden_act="gelu"), "SwiGLU without bias"),
        (LlamaConfig(attention_bias=True), "attention projections with biases"),
        (MistralConfig(sliding_window=64), "a sliding window of 64 positions"),
        (MistralConfig(), r"a sliding window of 4096 positions is not built \(rows here reach"),
    ]:
        with pytest.raises(slot_decoder.SlotDecoderError, match=reason):
            slot_decoder.check(config)
    slot_decoder.check(MistralConfig(), longest=4000)  # rows within the window: taken


@pytest.mark.parametrize("in_step", [False, True], ids=["prefilled-alone", "in-the-step"])
def test_rows_joining_at_different_times_decode_as_generate_does(slots, in_step):
    """Rows join a running batch in a prefill of their own, or (the mixed graph) in the
    running rows' step: each row's tokens are generate()'s either way."""
    from transformers import AutoTokenizer

    from tests.test_generation import hf_generate

    model_dir, graph, mixed = slots
    modules = load_inflight()
    step = modules["decoding"].OnnxRuntimeSlotStep(
        graph, max_rows=3, buffer=128, mixed=mixed if in_step else None
    )
    joined = []
    if in_step:  # count the calls that stepped and prefilled at once
        step.joined = lambda *args, call=step.joined: joined.append(len(args[2])) or call(*args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    running = modules["batch"].RunningBatch(
        "slots", {"decoder_slots": step}, tokenizer.pad_token_id
    )
    loop = modules["scheduler"].Scheduler(running, [tokenizer.eos_token_id], max_rows=3)

    jobs = [_job(modules, tokenizer, p, n) for p, n in zip(PROMPTS, NEW)]
    loop.submit(jobs[0])
    loop.submit(jobs[1])
    for index in range(200):  # the others arrive while those decode; the 4th waits for room
        if index == 3:
            loop.submit(jobs[2])
        if index == 7:
            loop.submit(jobs[3])
        if all(j.outcome for j in jobs):
            break
        if loop.waiting or loop.running:
            loop.iterate()
    assert [j.outcome for j in jobs] == ["finished"] * 4
    for prompt, new, done in zip(PROMPTS, NEW, jobs):
        assert done.rows[0].tokens == hf_generate(model_dir, "causallm", prompt, new), prompt
    assert [len(j.rows[0].tokens) for j in jobs] == NEW  # no EOS: every row its full length
    assert not running.groups  # every slot freed
    assert joined == ([1, 1] if in_step else [])  # jobs 2 and 3 joined running rows


def test_prompts_of_different_lengths_join_a_running_row_in_one_call(slots):
    """Three prompts (3 to 14 tokens, right-padded in the mixed graph's prompt grid) join a
    running row in its step: one call, and every row's tokens are generate()'s."""
    from transformers import AutoTokenizer

    from tests.test_generation import hf_generate

    model_dir, graph, mixed = slots
    modules = load_inflight()
    step = modules["decoding"].OnnxRuntimeSlotStep(graph, max_rows=4, buffer=128, mixed=mixed)
    joined = []
    step.joined = lambda *args, call=step.joined: joined.append(len(args[2])) or call(*args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    running = modules["batch"].RunningBatch(
        "slots", {"decoder_slots": step}, tokenizer.pad_token_id
    )
    loop = modules["scheduler"].Scheduler(running, [tokenizer.eos_token_id], max_rows=4)
    jobs = [_job(modules, tokenizer, p, n) for p, n in zip(PROMPTS, NEW)]
    loop.submit(jobs[0])
    loop.iterate()
    loop.iterate()
    for job in jobs[1:]:
        loop.submit(job)
    while loop.waiting or loop.running:
        loop.iterate()
    assert joined == [3]
    lengths = {len(j.rows[0].prompt) for j in jobs[1:]}
    assert len(lengths) == 3, lengths  # the grid pads two of them
    for prompt, new, done in zip(PROMPTS, NEW, jobs):
        assert done.rows[0].tokens == hf_generate(model_dir, "causallm", prompt, new), prompt
