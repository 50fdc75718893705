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


@pytest.fixture(scope="module")
def slots(tmp_path_factory):
    """A tiny random Llama with heads of 16 values (GroupQueryAttention's least), its graph."""
    from tasks import slot_decoder
    from tests.helpers.models import save_llama16

    model_dir = save_llama16(tmp_path_factory.mktemp("llama16"), max_positions=256)
    target = tmp_path_factory.mktemp("slots") / "decoder_slots.onnx"
    mixed = target.with_name("decoder_slots_mixed.onnx")
    slot_decoder.build(model_dir, target, mixed=mixed)
    return model_dir, target, mixed


def counting(step) -> list[int]:
    """The prompts of each call that stepped and prefilled at once (the mixed graph)."""
    joined: list[int] = []
    call = step.joined
    step.joined = lambda *args: joined.append(len(args[2])) or call(*args)
    return joined


class Loop:
    """The in-flight loop on the slot graphs (`mixed`: with the twin), as the server runs it,
    with `max_rows` slots: its modules, tokenizer, batch, scheduler and, with the twin, the
    prompts of each call that stepped and prefilled at once."""

    def __init__(self, slots, max_rows: int, mixed: bool = True) -> None:
        from transformers import AutoTokenizer

        model_dir, graph, twin = slots
        self.modules = modules = load_inflight()
        step = modules["decoding"].OnnxRuntimeSlotStep(
            graph, max_rows=max_rows, buffer=128, mixed=twin if mixed else None
        )
        self.joined = counting(step) if mixed else []
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.running = modules["batch"].RunningBatch(
            "slots", {"decoder_slots": step}, tokenizer.pad_token_id
        )
        self.scheduler = modules["scheduler"].Scheduler(
            self.running, [tokenizer.eos_token_id], max_rows=max_rows
        )

    def job(self, prompt: str, new: int) -> LocalJob:
        """A one-row request of `prompt` asking `new` tokens, greedy."""
        ids = np.array(self.tokenizer(prompt)["input_ids"], dtype=np.int64)
        text = self.modules["detokenizer"].TextStream(self.tokenizer.decode)
        row = self.modules["scheduler"].Row(ids, self.modules["decoding"].RowParams(new), text)
        return LocalJob([row])


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
    from tests.test_generation import hf_generate

    model_dir = slots[0]
    run = Loop(slots, max_rows=3, mixed=in_step)
    loop, running, joined = run.scheduler, run.running, run.joined
    jobs = [run.job(p, n) for p, n in zip(PROMPTS, NEW)]
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
    from tests.test_generation import hf_generate

    model_dir = slots[0]
    run = Loop(slots, max_rows=4)
    loop, joined = run.scheduler, run.joined
    jobs = [run.job(p, n) for p, n in zip(PROMPTS, NEW)]
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


class CancelledJob(LocalJob):
    """A request its client gave up on before it ran a step."""

    def cancelled(self) -> bool:
        return True


def test_a_joining_call_drops_the_cancelled_keeps_a_two_row_request_and_ends_one_token_rows(
    slots,
):
    """In one call that steps a running row and prefills the joiners: a request found
    cancelled leaves with its slot, unanswered; a request of two rows keeps both (each as
    generate()); a request asking one token ends at its first; the others go on exact."""
    from tests.test_generation import hf_generate

    model_dir = slots[0]
    run = Loop(slots, max_rows=5)
    loop, running, joined = run.scheduler, run.running, run.joined
    first = run.job(PROMPTS[0], 20)
    loop.submit(first)
    loop.iterate()
    pair = LocalJob([run.job(p, n).rows[0] for p, n in ((PROMPTS[1], 9), (PROMPTS[3], 14))])
    one = run.job(PROMPTS[2], 1)
    gone = CancelledJob(run.job(PROMPTS[3], 30).rows)
    for job in (pair, one, gone):
        loop.submit(job)
    loop.iterate()  # the joining call: 4 prompts with the running row
    assert joined == [4]
    assert gone.outcome == "cancelled" and gone.steps == 0
    assert one.outcome == "finished" and len(one.rows[0].tokens) == 1
    assert len(running) == 3  # the running row and the pair; the others' slots freed
    while loop.waiting or loop.running:
        loop.iterate()
    assert first.outcome == pair.outcome == "finished"
    expected = [(first.rows[0], PROMPTS[0], 20), (pair.rows[0], PROMPTS[1], 9)]
    expected += [(pair.rows[1], PROMPTS[3], 14), (one.rows[0], PROMPTS[2], 1)]
    for row, prompt, new in expected:
        assert row.tokens == hf_generate(model_dir, "causallm", prompt, new), prompt


def test_the_runtime_names_the_prompts_cache_as_the_build_does():
    """decoding.py (in the server, without tasks/) and the builder agree on the prefix of the
    mixed graph's prompt cache."""
    from tasks import slot_decoder

    assert load_inflight()["decoding"].PROMPT == slot_decoder.PROMPT
