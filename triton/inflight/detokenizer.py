"""Incremental detokenizing of one generated row: text pieces that never end inside a
character, and stop strings.

A byte-level BPE splits a character over tokens; decoding a prefix of them gives U+FFFD for
the bytes of a character not yet complete. Each step sends only what can no longer change:
the trailing U+FFFD are held back until the bytes after them arrive (they become the
character) or the row ends (then they are what the whole text has too).
Decoding the whole row at every step made a token's cost grow with the row (a 2000-token
answer decoded 2000 tokens for its last one), so each step decodes a window only, as
incremental detokenizers do: the tokens since the last point the text was whole, after the
tokens that made the text before it (context: a SentencePiece decoder drops the leading space
of the first token it decodes, so the context's text is decoded and subtracted), the text
before the window kept. A window whose text does not extend its context's falls back to
decoding the whole row. A byte-fallback decoder (<0xE3>...) that turns a whole run of bytes
to U+FFFD when its last byte is invalid changes text already sent, windowed or not: the
pieces then hold what was decoded as it came.
A text that could still be the start of a stop string is held back as well, so a stop
string is never half sent. `finish()` flushes what is held. The pieces of a row
concatenate to its `text`, which is what `<name>` answers as OUTPUT_TEXT: the same class
makes both.

Imports nothing: it takes a `decode(ids) -> str` (a `tokenizers.Tokenizer`'s, in Triton).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


def held_for_stops(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may begin a stop string (held back)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def first_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Where the first stop string in `text` begins (searching from `start`), or -1."""
    found = [at for at in (text.find(stop, start) for stop in stops) if at >= 0]
    return min(found, default=-1)


class TextStream:
    """One row's text, token by token (see module doc)."""

    def __init__(self, decode, stops=()) -> None:
        self.decode = decode
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""  # the whole text so far (cut before a stop string once one is found)
        self.whole = ""  # the text of ids[: self.settled]: whole characters, never decoded again
        self.settled = 0
        self.context = 0  # where the next window starts: the tokens that last made text
        self.sent = 0  # characters of `text` given out as pieces
        self.stopped = False  # a stop string was found: the row is done

    def add(self, token: int) -> str:
        """The piece this token makes sendable (maybe empty)."""
        self.ids.append(int(token))
        text = self._decoded()
        if self.stops:
            # a stop string may end in the new text: look back as far as the longest one
            start = max(0, min(self.sent, len(self.text)) - max(map(len, self.stops)))
            at = first_stop(text, self.stops, start)
            if at >= 0:
                self.text, self.stopped = text[:at], True
                return self._take(len(self.text))
        self.text = text
        ready = len(text) - (len(text) - len(text.rstrip(REPLACEMENT)))
        ready -= held_for_stops(text[:ready], self.stops)
        return self._take(ready)

    def _decoded(self) -> str:
        """The text of all the tokens so far, decoding the window only (see module doc)."""
        context = self.decode(self.ids[self.context : self.settled])
        window = self.decode(self.ids[self.context :])
        if window.startswith(context):
            text = self.whole + window[len(context) :]
        else:  # this tokenizer's text is not local here: the whole row, once
            text = self.decode(self.ids)
        if not text.endswith(REPLACEMENT):  # whole characters: settled
            if len(text) > len(self.whole):  # tokens that made text: the next window's context
                self.context = self.settled  # (skipped special tokens make none: not alone)
            self.whole, self.settled = text, len(self.ids)
        return text

    def finish(self) -> str:
        """What is still held back: the row is done."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : upto], upto
        return piece
