"""Facts of a downloaded checkpoint that several stages need: token ids and limits.

A leaf module (it imports only `paths` and `artifacts`): plan, pbtxt, parity and bench call
it and pass the values down, so no stage imports another for them. Each of those stages lists
this module in its `file_dep`.
"""

from __future__ import annotations

from tasks import artifacts, paths


def _read(name: str, filename: str) -> dict:
    path = paths.source_file(name, filename)
    return artifacts.read_json(path) if path.is_file() else {}


def max_positions(name: str) -> int:
    """The positions the checkpoint's model takes (0: it does not say), from config.json only."""
    config = _read(name, "config.json")
    return config.get("n_positions") or config.get("max_position_embeddings") or 0


def checkpoint_facts(name: str) -> dict:
    """Token ids and limits from the checkpoint's config files (no transformers import)."""
    from tokenizers import Tokenizer

    config, generation = _read(name, "config.json"), _read(name, "generation_config.json")
    token = _read(name, "tokenizer_config.json").get("pad_token")
    if isinstance(token, dict):
        token = token.get("content")
    tokenizer = Tokenizer.from_file(str(paths.source_tokenizer(name)))
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    pad = tokenizer.token_to_id(token) if token else None
    for fallback in (config.get("pad_token_id"), generation.get("pad_token_id"), *eos_ids, 0):
        if pad is None:
            pad = fallback
    start = generation.get("decoder_start_token_id", config.get("decoder_start_token_id"))
    return {
        "pad_id": pad,
        "eos_ids": eos_ids,
        # HF's default for encoder-decoders without one is the pad token (T5 does this)
        "decoder_start_id": pad if start is None else start,
        "max_positions": max_positions(name),
        "vocab_size": config.get("vocab_size") or 0,  # 0: unknown, ids go unchecked
    }
