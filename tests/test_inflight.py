"""The in-flight loop's parts that need no server: the incremental detokenizer (UTF-8 safe,
stop strings) on a byte-level BPE trained here, the cache's widths as rows join and leave
(in place when nothing is cut), and when cancelled requests are asked about and leave."""

from __future__ import annotations

import pytest

from tasks.generation_parity import load_inflight
from tests.helpers.inflight import LocalJob

# Text a byte-level BPE trained on English splits inside characters.
HARD_TEXT = "café naïve Ünïcödé — 東京は日本の首都です 🙂👍🏽 and ﬁn. 𝔘𝔫𝔦"


@pytest.fixture(scope="module")
def tokenizer():
    from tests.helpers.models import generation_tokenizer

    return generation_tokenizer("causal")._tokenizer


def pieces_of(tokenizer, ids, stops=()):
    modules = load_inflight()
    stream = modules["detokenizer"].TextStream(
        lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True), stops
    )
    pieces = []
    for token in ids:
        pieces.append(stream.add(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


def test_pieces_never_end_inside_a_character_and_add_up_to_the_whole(tokenizer):
    ids = tokenizer.encode(HARD_TEXT).ids
    whole = tokenizer.decode(ids)
    assert whole == HARD_TEXT
    # the naive way, a token at a time, breaks characters (what the stream used to send)
    assert "\ufffd" in "".join(tokenizer.decode([t]) for t in ids)
    pieces, _ = pieces_of(tokenizer, ids)
    assert "".join(pieces) == whole
    assert not any("\ufffd" in piece for piece in pieces)


def test_bytes_that_never_complete_a_character_are_flushed_as_the_whole_text_has_them(tokenizer):
    ids = tokenizer.encode("ok 🙂").ids[:-1]  # the emoji cut: its last byte never comes
    whole = tokenizer.decode(ids)
    assert whole.endswith("\ufffd")
    pieces, _ = pieces_of(tokenizer, ids)
    assert "".join(pieces) == whole and not any("\ufffd" in p for p in pieces[:-1])


def byte_fallback_tokenizer():
    """A SentencePiece-like tokenizer as Llama 2's: metaspace, bytes for what the vocabulary
    lacks (<0xE3>...), the first token's leading space stripped."""
    from tokenizers import Tokenizer, decoders, models

    words = ["▁", "▁the", "▁a", "é", "東", "ab", "▁ab", "s", "'"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({word: len(vocab) + i for i, word in enumerate(words)})
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tokenizer.add_special_tokens(["<s>", "</s>"])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
    return tokenizer


@pytest.mark.parametrize("kind", ["causal", "seq2seq", "byte_fallback"])
def test_tokens_stream_as_the_whole_rows_text_decoding_a_window_a_step(kind):
    """Text with skipped special tokens strewn in, and (but for byte fallback, whose decoder
    rewrites a run of bytes its last byte makes invalid) any ids at all: the pieces add up
    to the row's decoded text, though each step decodes a few tokens only."""
    import numpy as np

    from tests.helpers.models import generation_tokenizer

    if kind == "byte_fallback":
        tokenizer = byte_fallback_tokenizer()
    else:
        tokenizer = generation_tokenizer(kind)._tokenizer
    rng = np.random.default_rng(0)
    specials = [tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<|endoftext|>", "<pad>")]
    specials = [i for i in specials if i is not None]
    text = tokenizer.encode(HARD_TEXT, add_special_tokens=False).ids
    decoded = []  # the lengths each step decoded
    for trial in range(30):
        ids = list(text)
        for at in sorted(rng.integers(0, len(ids), size=5), reverse=True):
            ids.insert(int(at), int(rng.choice(specials)))
        if trial % 2 and kind != "byte_fallback":
            ids = rng.integers(0, tokenizer.get_vocab_size(), size=80).tolist()

        def decode(tokens):
            decoded.append(len(tokens))
            return tokenizer.decode(tokens, skip_special_tokens=True)

        stream = load_inflight()["detokenizer"].TextStream(decode)
        pieces = [stream.add(token) for token in ids] + [stream.finish()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == stream.text
    assert np.median(decoded) <= 4  # a window, not the row (80 tokens)


@pytest.mark.parametrize(
    ("stops", "expected"),
    [
        (("首都",), "café naïve Ünïcödé — 東京は日本の"),
        (("Ün", "naïve"), "café "),
        (("absent",), HARD_TEXT),
        (("🙂",), "café naïve Ünïcödé — 東京は日本の首都です "),
    ],
)
def test_a_stop_string_ends_the_text_before_it_and_is_never_half_sent(tokenizer, stops, expected):
    ids = tokenizer.encode(HARD_TEXT).ids
    pieces, stream = pieces_of(tokenizer, ids, stops)
    assert "".join(pieces) == expected == stream.text
    assert stream.stopped == (expected != HARD_TEXT)
    sent = ""
    for piece in pieces:
        sent += piece
        assert not any(stop in sent for stop in stops)


def test_held_back_is_the_longest_end_that_may_begin_a_stop():
    detokenizer = load_inflight()["detokenizer"]
    assert detokenizer.held_for_stops("the end is ne", ("near", "never")) == 2
    assert detokenizer.held_for_stops("the end", ("near",)) == 0
    assert detokenizer.held_for_stops("abcab", ("abcabd",)) == 5


def test_a_joined_and_left_cache_is_as_long_as_its_longest_row():
    """The profile arithmetic of the causal batch: rows join with caches of other lengths
    (left-padded under the mask) and leave (the columns nobody reads are cut), and the cache a
    step reads is always the longest remaining row's own, never the sum of their histories."""
    import numpy as np

    batch = load_inflight()["batch"]

    def group(lengths: list[int]):
        width = max(lengths)
        mask = np.array([[0] * (width - n) + [1] * n for n in lengths], dtype=np.int64)
        cache = {"0.key": np.arange(len(lengths) * width, dtype=np.float32).reshape(
            len(lengths), 1, width, 1
        )}  # fmt: skip
        return batch.CausalGroup(list(range(len(lengths))), cache, mask, mask.sum(axis=1))

    running = group([5, 3])
    running.absorb([group([9]), group([2])])  # a long prompt and a short one join
    assert running.width == 9 and running.cache["0.key"].shape == (4, 1, 9, 1)
    assert running.mask.sum(axis=1).tolist() == [5, 3, 9, 2] == running.positions.tolist()
    assert (running.cache["0.key"][:2, :, :4] == 0).all()  # the padding the mask hides
    running.keep([0, 1, 3])
    assert running.width == 5 and running.mask.sum(axis=1).tolist() == [5, 3, 2]
    running.keep([0, 1])  # back to the longest remaining row
    assert running.width == 5 and running.mask.sum(axis=1).tolist() == [5, 3]
    running.keep([1])
    assert running.width == 3 and running.mask.tolist() == [[1, 1, 1]]
    running.keep([])
    assert running.rows == []


class CountingStep:
    """A causal LM's step in numpy, as an exported part is called (named arrays in and out):
    each row's next token is its last one + 1; the cache holds the tokens it has read."""

    VOCAB = 50

    def __init__(self, with_past: bool) -> None:
        self.inputs = ["input_ids", "attention_mask", "position_ids"]
        self.inputs += ["past_key_values.0.key"] if with_past else []

    def __call__(self, feed: dict) -> dict:
        import numpy as np

        ids = feed["input_ids"]
        past = feed.get("past_key_values.0.key", np.zeros((len(ids), 1, 0, 1), np.float32))
        present = np.concatenate([past, ids[:, None, :, None].astype(np.float32)], axis=2)
        logits = np.eye(self.VOCAB, dtype=np.float32)[(ids[:, -1:] + 1) % self.VOCAB]
        return {"logits": logits, "present.0.key": present}


class ShapedStep(CountingStep):
    """A prefill CountingStep that keeps the shape of each call's prompts."""

    def __init__(self) -> None:
        super().__init__(with_past=False)
        self.shapes = []

    def __call__(self, feed: dict) -> dict:
        self.shapes.append(feed["input_ids"].shape)
        return super().__call__(feed)


def counting_batch(modules):
    """A causal running batch whose parts are CountingSteps."""
    steps = {"decoder_model": CountingStep(False), "decoder_with_past_model": CountingStep(True)}
    return modules["batch"].RunningBatch("causal", steps, pad_id=0)


class WatchedJob(LocalJob):
    """A request as the loop sees one, that fails the test if it is asked whether it was
    cancelled after its final answer (Triton has freed a request by then)."""

    def __init__(self, modules, prompt: list[int], new: int) -> None:
        import numpy as np

        text = modules["detokenizer"].TextStream(lambda ids: "")
        params = modules["decoding"].RowParams(new)
        super().__init__([modules["scheduler"].Row(np.array(prompt, np.int64), params, text)])
        self.gave_up, self.asked = False, 0

    def cancelled(self) -> bool:
        assert self.outcome is None, f"asked after its final answer ({self.outcome})"
        self.asked += 1
        return self.gave_up


def test_a_cancelled_request_leaves_after_the_step_it_is_found_in_and_none_is_asked_when_done():
    """The loop asks who gave up while a step computes: a request cancelled before a step
    leaves after it, unanswered by it; the others go on; and a request that finished (or was
    cancelled) is never asked again."""
    modules = load_inflight()
    running = counting_batch(modules)
    loop = modules["scheduler"].Scheduler(running, eos_ids=[], max_rows=4)
    try:
        short, leaving, long = (WatchedJob(modules, [1, 2], n) for n in (3, 40, 40))
        for job in (short, leaving, long):
            assert loop.submit(job)
        loop.iterate()  # all join (their first token) and take one step
        assert [job.steps for job in (short, leaving, long)] == [2, 2, 2]
        leaving.gave_up = True
        loop.iterate()  # found during this step: it leaves, not answered by it
        assert leaving.outcome == "cancelled" and leaving.steps == 2
        assert short.outcome == "finished" and short.rows[0].tokens == [3, 4, 5]
        assert len(running) == 1
        while long.outcome is None:
            loop.iterate()
        assert long.rows[0].tokens == [(3 + i) % CountingStep.VOCAB for i in range(40)]
        loop.submit(WatchedJob(modules, [7], 2))
        loop.iterate()  # the finished ones are not asked about with the newcomer
    finally:
        loop.stop()


@pytest.mark.parametrize("waste, calls", [(0, [(5, 31)]), (1.3, [(3, 3), (2, 31)])])
def test_prompts_joining_at_once_prefill_in_groups_of_like_lengths(waste, calls):
    """Short and long prompts arriving together: with `prefill_waste` the short ones share a
    call padded to 3 tokens and the long ones one of 31, not all five one of 31; each row's
    first token goes out at its group's prefill, and every row decodes as alone."""
    modules = load_inflight()
    running = counting_batch(modules)
    running.steps["decoder_model"] = prefill = ShapedStep()
    loop = modules["scheduler"].Scheduler(running, eos_ids=[], max_rows=8, prefill_waste=waste)
    try:
        prompts = [[1, 2], [4] * 30, [7, 8, 9], [10] * 31, [20, 21]]
        jobs = [WatchedJob(modules, prompt, 4) for prompt in prompts]
        for job in jobs:
            assert loop.submit(job)
        loop.iterate()
        assert prefill.shapes == calls
        assert all(job.steps == 2 for job in jobs)  # the first token, then one step
        [group] = running.groups  # the groups stacked into one cache at the step
        for place, row in enumerate(group.rows):  # each row's cache: its prompt, its token
            read = group.cache["0.key"][place, 0, group.mask[place] == 1, 0]
            assert read.tolist() == [*row.prompt.tolist(), *row.tokens[:-1]]
        while any(job.outcome is None for job in jobs):
            loop.iterate()
        for job, prompt in zip(jobs, prompts):
            assert job.rows[0].tokens == [
                (prompt[-1] + k) % CountingStep.VOCAB for k in (1, 2, 3, 4)
            ]
    finally:
        loop.stop()


def test_a_row_that_reaches_an_eos_leaves_with_it_and_its_batch_mate_goes_on():
    """EOS ends a row (the EOS token is its last), its request is answered at that step, and
    the row beside it decodes on as alone (the served chain, generation_config's EOS into the
    pbtxt, is test_generation's)."""
    modules = load_inflight()
    running = counting_batch(modules)
    loop = modules["scheduler"].Scheduler(running, eos_ids=[5, 30], max_rows=4)
    try:
        ending, going = WatchedJob(modules, [1, 2], 10), WatchedJob(modules, [10, 11], 10)
        for job in (ending, going):
            assert loop.submit(job)
        while going.outcome is None:
            loop.iterate()
            if ending.outcome is None:
                assert len(running) == 2
            elif going.outcome is None:
                assert len(running) == 1  # it left the batch at its EOS
        assert ending.outcome == going.outcome == "finished"
        assert ending.rows[0].tokens == [3, 4, 5]  # stopped at the EOS, 7 steps before its max
        assert going.rows[0].tokens == list(range(12, 22))  # 30 is beyond its 10 tokens
    finally:
        loop.stop()


def test_a_long_queue_is_asked_in_turns_and_a_cancelled_waiting_request_is_answered():
    """Each step asks every running request but only `max_rows` waiting ones, in turn: all are
    asked within a few steps, and one cancelled deep in the queue is answered there."""
    modules = load_inflight()
    running = counting_batch(modules)
    loop = modules["scheduler"].Scheduler(running, eos_ids=[], max_rows=2)
    try:
        jobs = [WatchedJob(modules, [1], 40) for _ in range(8)]
        for job in jobs:
            assert loop.submit(job)
        loop.iterate()  # two join; six wait
        assert [job.asked for job in jobs] == [1, 1, 1, 1, 0, 0, 0, 0]
        jobs[7].gave_up = True
        for _ in range(3):
            loop.iterate()
        assert [job.asked for job in jobs[:2]] == [4, 4]  # the running ones, every step
        assert [job.asked for job in jobs[2:8]] == [1, 2, 2, 1, 1, 1]  # 2 a step, in turn
        assert jobs[7].outcome == "cancelled" and all(j.outcome is None for j in jobs[:7])
    finally:
        loop.stop()


def test_rows_that_stay_keep_their_own_cache_mask_and_position_whichever_way_they_move():
    """A row leaving without a column to cut is written over in place by one from the tail
    (no copy of the whole cache), the seq2seq cohort's the same way: every row that stays
    keeps its own cache, mask and position, and the cache stays contiguous for the step."""
    import numpy as np

    batch = load_inflight()["batch"]
    lengths = [4, 6, 2, 6, 3]
    width = max(lengths)
    mask = np.array([[0] * (width - n) + [1] * n for n in lengths], dtype=np.int64)
    cache = np.arange(len(lengths) * width, dtype=np.float32).reshape(len(lengths), 1, width, 1)
    rows = ["a", "b", "c", "d", "e"]
    group = batch.CausalGroup(list(rows), {"0.key": cache.copy()}, mask, mask.sum(axis=1))
    group.keep([1, 3, 4])  # the longest rows stay: nothing to cut
    assert group.width == width and sorted(group.rows) == ["b", "d", "e"]
    assert group.cache["0.key"].flags.c_contiguous
    for place, row in enumerate(group.rows):
        was = rows.index(row)
        assert (group.cache["0.key"][place] == cache[was]).all()
        assert (group.mask[place] == mask[was]).all() and group.positions[place] == lengths[was]
    cohort = batch.Seq2SeqGroup(list(rows), {"0.key": cache.copy()}, mask)
    cohort.keep([0, 4])
    for place, row in enumerate(cohort.rows):
        assert (cohort.cache["0.key"][place] == cache[rows.index(row)]).all()
        assert (cohort.encoder_mask[place] == mask[rows.index(row)]).all()


@pytest.mark.parametrize(
    ("interval", "rows", "steps"),
    [(0, 1, 1), (0, 4, 1), (0, 5, 2), (0, 8, 2), (0, 16, 4), (0, 13, 4), (3, 1, 3), (3, 16, 3)],
)
def test_a_stream_answers_every_step_while_few_rows_decode_and_every_few_when_many(
    interval, rows, steps
):
    """stream_interval=auto (0): each token while the batch has at most 4 rows, then about 4
    responses a step; a number is that many steps whatever the rows."""
    import numpy as np

    modules = load_inflight()
    running = counting_batch(modules)
    text = modules["detokenizer"].TextStream(lambda ids: "")
    params = modules["decoding"].RowParams(8)
    running.join(
        [modules["scheduler"].Row(np.array([1], np.int64), params, text) for _ in range(rows)]
    )
    assert len(running) == rows
    assert modules["scheduler"].Pace(running, interval, 4).steps() == steps


def test_the_loops_own_queue_refuses_past_its_bound_and_rejects_a_request_that_waited_too_long():
    """`max_waiting` (the `max_queue` variable): `submit` refuses at once when that many wait,
    as a full Triton queue does. `queue_timeout_s` (`queue_timeout_ms`): a request still
    waiting for room after it is answered with Triton's words for a timeout at the next step
    boundary, and the one decoding goes on."""
    modules = load_inflight()
    scheduler = modules["scheduler"]
    running = counting_batch(modules)
    loop = scheduler.Scheduler(running, [], max_rows=1, max_waiting=2, queue_timeout_s=30.0)
    try:
        decoding, late, recent = (WatchedJob(modules, [1], 40) for _ in range(3))
        assert loop.submit(decoding)
        loop.iterate()  # it joins: the batch is full
        assert loop.submit(late) and loop.submit(recent)
        assert not loop.submit(WatchedJob(modules, [1], 4))  # two wait already
        late.queued_at -= 31.0  # as if it had waited 31 s
        loop.iterate()
        assert late.outcome == scheduler.TIMED_OUT and recent.outcome is None
        assert decoding.outcome is None and len(running) == 1 and decoding.steps == 3
        assert loop.submit(WatchedJob(modules, [1], 4))  # room in the queue again
    finally:
        loop.stop()


def test_at_the_default_profile_no_step_leaves_it_and_every_accepted_request_is_answered():
    """The defaults (batch=1,8,32, seq=1,128,512, up to 512 new tokens) and OPT-125M's 2048
    positions: 40 requests at the profile's edges (512-token prompts asking 512 tokens or one,
    one-token prompts asking 512), 34 at once and then one a step, more than the batch MAX
    holds. No step is fed more than 32 rows or a longer cache than the profile's
    (`cache_limit`, which the engines are built for), the rows that do not fit wait, none is
    refused, and each gets every token it asked for."""
    from tasks import profiles
    from tests.helpers.stages import settings_from

    modules = load_inflight()
    chosen = settings_from(task="causallm")
    assert (chosen.batch.max, chosen.seq.max, chosen.max_new_tokens) == (32, 512, 512)
    limit = profiles.cache_limit(chosen, 2048)
    fed = []  # (rows, cache length) of every step's feed

    class Recording(CountingStep):
        def __call__(self, feed: dict) -> dict:
            past = feed.get("past_key_values.0.key")
            fed.append((len(feed["input_ids"]), 0 if past is None else past.shape[2]))
            return super().__call__(feed)

    steps = {"decoder_model": Recording(False), "decoder_with_past_model": Recording(True)}
    running = modules["batch"].RunningBatch("causal", steps, pad_id=0, cache_limit=limit)
    loop = modules["scheduler"].Scheduler(running, [], max_rows=32)
    edges = [(512, 512), (1, 512), (512, 1), (128, 64), (2, 1)]
    asked = [edges[i % len(edges)] for i in range(40)]
    jobs = [WatchedJob(modules, [7] * length, new) for length, new in asked]
    waited = False
    try:
        for job in jobs[:34]:
            assert loop.submit(job)
        for step in range(5000):
            if 34 + step < len(jobs):
                assert loop.submit(jobs[34 + step])
            loop.iterate()
            waited |= bool(loop.waiting)
            if all(job.outcome for job in jobs):
                break
    finally:
        loop.stop()
    assert [job.outcome for job in jobs] == ["finished"] * len(jobs)
    assert [len(job.rows[0].tokens) for job in jobs] == [new for _, new in asked]
    assert waited and max(rows for rows, _ in fed) == 32
    longest = max(cache for _, cache in fed)
    assert longest == limit, (longest, limit)  # at the edge, not past it
