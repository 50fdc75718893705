"""The tokenizing that runs inside Triton (triton/tokenizer/encoding.py), against the
Hugging Face fast tokenizer on the same tokenizer.json."""

from __future__ import annotations

import numpy as np
import pytest

from tasks import catalog
from tests.helpers.stages import text_encoder

MAX_SEQ, STRIDE = 32, 8
LONG = " ".join(catalog.SAMPLE_TEXTS[:3] * 4)


def windows(directory, text_inputs: list[str], items: list) -> dict:
    found = text_encoder(directory / "tokenizer.json", text_inputs, MAX_SEQ, STRIDE)
    (encoded,) = found.encode([items])
    names = [("input_ids", np.int64), ("offsets", np.int64), ("window_item", np.int64)]
    return found.arrays(encoded, names)


@pytest.mark.parametrize("pair", [False, True], ids=["one-text", "pair"])
def test_the_last_text_is_read_in_windows_with_its_offsets(minilm_dir, pair):
    """Windows and offsets are the last text's, one text or a pair: the rows Hugging Face's
    tokenizer gives with the same stride, and spans into that text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    first = ["What is it?"] if pair else [LONG]
    second = [LONG] if pair else None
    expected = tokenizer(
        first,
        second,
        truncation="only_second" if pair else True,
        max_length=MAX_SEQ,
        stride=STRIDE,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    assert len(expected["input_ids"]) > 2  # the text needs several windows
    names = ["QUESTION", "CONTEXT"] if pair else ["TEXT"]
    got = windows(minilm_dir, names, [(first[0], LONG)] if pair else [LONG])
    assert got["window_item"].reshape(-1).tolist() == [0] * len(expected["input_ids"])
    for row, ids in enumerate(expected["input_ids"]):
        assert got["input_ids"][row, : len(ids)].tolist() == ids
        last = 1 if pair else 0
        for position, sequence in enumerate(expected.sequence_ids(row)):
            span = got["offsets"][row, position].tolist()
            if sequence == last:
                assert span == list(expected["offset_mapping"][row][position])
                start, end = span
                assert LONG[start:end].lower() == tokenizer.decode(ids[position]).strip("#")
            else:
                assert span == [-1, -1]
