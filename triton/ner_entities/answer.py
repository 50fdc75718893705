"""Token-classification logits to entities, as Hugging Face's token-classification pipeline
gives them with aggregation_strategy="simple" (a post-processing `answer.py`).

In (one row per window of a text, see triton/tokenizer/encoding.py): `window_logits`
[windows, seq, labels], `input_ids` [windows, seq], `offsets` [windows, seq, 2] (character
span in the text of each of its tokens, -1 elsewhere), `window_item` [windows, 1], the texts
`TEXT` [batch, 1] and `seq_length` [windows, 1] (the request's own padded length).
Out per text: `ENTITIES`, a JSON array of {entity_group, score, word, start, end}, and
`LOGITS` [seq, labels] of its first window (all of the text when it fits in one).

Each window's tokens (those the tokenizer added, and padding, left out) take their most
probable label; adjacent tokens of one tag group unless a token says B-, the group's score
is the mean of its tokens', and "O" groups are dropped. A text read in several windows has
its entities merged where they overlap: the longer one wins, then the higher score. `word` joins the
tokens with the tokenizer's own decoder (what transformers' convert_tokens_to_string does
for a fast tokenizer); an unknown token stands for its text. Files next to this file:
config.json (id2label) and tokenizer.json. Imports only numpy, `tokenizers` and runtime.py.
"""

import json
from pathlib import Path

import numpy as np
from llm_in_triton_runtime import softmax
from tokenizers import Tokenizer


def _tag(label: str) -> tuple[str, str]:
    """(B or I, tag): a label without a B-/I- prefix continues as I."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


class Entities:
    def __init__(self, version_dir: Path) -> None:
        config = json.loads((version_dir / "config.json").read_text())
        labels = config.get("id2label") or {}
        self.labels = {int(i): str(label) for i, label in labels.items()}
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        unk = getattr(self.tokenizer.model, "unk_token", None)
        self.unk_id = self.tokenizer.token_to_id(unk) if unk else None

    def label(self, index: int) -> str:
        return self.labels.get(index, f"LABEL_{index}")

    def window(self, text: str, logits, ids, offsets) -> list[dict]:
        """The grouped entities of one window, "O" left out."""
        scores = softmax(logits)  # runtime.py's, as the label and QA steps use
        tokens = []
        for position in np.flatnonzero(offsets[:, 0] >= 0):
            # the tokens of the text itself (a typed "[SEP]" too, as the pipeline keeps it):
            # the tokenizer step gives the ones it added and the padding no offsets
            token_id = int(ids[position])
            start, end = (int(v) for v in offsets[position])
            best = int(scores[position].argmax())
            word = (
                text[start:end] if token_id == self.unk_id else self.tokenizer.id_to_token(token_id)
            )
            tokens.append((self.label(best), scores[position, best], word, start, end))
        groups, current = [], []
        for token in tokens:
            bi, tag = _tag(token[0])
            if current and not (tag == _tag(current[-1][0])[1] and bi != "B"):
                groups.append(self.group(current))
                current = []
            current.append(token)
        if current:
            groups.append(self.group(current))
        return [g for g in groups if g["entity_group"] != "O"]

    def group(self, tokens: list) -> dict:
        decoder = self.tokenizer.decoder
        words = [t[2] for t in tokens]
        return {
            "entity_group": tokens[0][0].split("-", 1)[-1],
            "score": float(np.mean(np.nanmean([t[1] for t in tokens]))),
            "word": decoder.decode(words) if decoder is not None else " ".join(words),
            "start": tokens[0][3],
            "end": tokens[-1][4],
        }


def merge_overlapping(entities: list[dict]) -> list[dict]:
    """Entities of overlapping windows: of two that overlap, the longer (then the more
    probable) stays."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    merged, previous = [], entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length, previous_length = (e["end"] - e["start"] for e in (entity, previous))
            if length > previous_length or (
                length == previous_length and entity["score"] > previous["score"]
            ):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged


def make(version_dir: Path, params: dict):
    entities = Entities(version_dir)

    def answer(tensors: dict) -> dict:
        length = int(tensors["seq_length"].reshape(-1)[0])
        logits = tensors["window_logits"][:, :length]
        ids, offsets = tensors["input_ids"][:, :length], tensors["offsets"][:, :length]
        items = tensors["window_item"].reshape(-1)
        texts = [
            t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
            for t in tensors["TEXT"].reshape(-1)
        ]
        found = [[] for _ in texts]
        windows = [[] for _ in texts]
        for row, item in enumerate(int(i) for i in items):
            windows[item].append(row)
            found[item] += entities.window(texts[item], logits[row], ids[row], offsets[row])
        first = [rows[0] for rows in windows]
        answers = [
            json.dumps(merge_overlapping(e) if len(w) > 1 else e, ensure_ascii=False)
            for e, w in zip(found, windows)
        ]
        return {
            "ENTITIES": np.array([[a.encode("utf-8")] for a in answers], dtype=object),
            "LOGITS": np.ascontiguousarray(logits[first], dtype=np.float32),
        }

    return answer
