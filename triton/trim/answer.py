"""Padded sequence outputs cut back to each request's own length (a post-processing
`answer.py`).

The tokenizer pads the requests of one call to a shared length so that a native model runs
them as one batch; `seq_length` [rows, 1] carries each request's own padded length (the one
it gets alone). Parameter `trims`: JSON [[padded tensor, output], ...]; each output is its
padded tensor [rows, seq, ...] cut to [rows, seq_length, ...]. Imports only numpy.
"""

import json
from pathlib import Path

import numpy as np


def make(version_dir: Path, params):
    trims = params.read("trims", json.loads)

    def answer(tensors: dict) -> dict:
        length = int(tensors["seq_length"].reshape(-1)[0])
        return {out: np.ascontiguousarray(tensors[src][:, :length]) for src, out in trims}

    return answer
