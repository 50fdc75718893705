"""The running batch of the in-flight loop: its rows and their KV cache, joined and left
between decoding steps.

Each row's tokens must equal what it gets alone, whatever its batch-mates (exactness), so
the cache of rows that started at different times is laid out as a row alone would see it:

- causal LMs: one group for all rows. A row's cache is right-aligned: its real positions
  are the last ones, the columns before them are padding its attention mask hides, and its
  `position_ids` count its own tokens only. A joining row is prefilled (decoder_model, the
  joiners left-padded together, as Hugging Face pads), then its cache is stacked under the
  group's, left-padded to the wider (one copy at the next step, however many prefills joined
  since the last); a leaving row's cache row is written over by
  one from the tail, in place (the rows' order changes, each row's cache, mask and position
  going with it), or, when the columns every remaining row hides can be cut, the cache is
  cut and taken (one copy). So a step's cache is never longer than its longest
  row's own cache: a row that fits the TensorRT profile alone fits with any batch-mates.
- decoder=slots (a causal LM's one graph on GroupQueryAttention, tasks/slot_decoder.py): row
  i's cache is slot i of buffers the step writes in place, as long as the row's own tokens;
  a joining row is prefilled straight into the next free slots (while rows run, in their
  step's call: the mixed graph, `joins_in_step`), a leaving one's slot is written over by
  the tail's (SlotGroup): nothing is padded, nothing copied at a step.
- seq2seq (T5): the decoder's self-attention has no mask (relative positions count from
  the cache's start), so only rows at the same decoding step can share a call. Rows that
  join together are a group (a cohort) of their own; each group decodes one step per loop
  step, and the encoder's cache is padded within a group under `encoder_attention_mask`.

Arrays are numpy, or cupy when a BLS step returns GPU arrays: the operations here use the
array's own module. Imports numpy and the decoding module (loaded before this file).
"""

from __future__ import annotations

import importlib

import numpy as np
from llm_in_triton_decoding import run_step


def filled_order(indices: list[int]) -> list[int]:
    """The rows that stay (`indices`, distinct), permuted: each one already among the first
    len(indices) keeps its place and the others fill the places of the rows that leave, so
    the cache needs only those rows written (`kept_in_place`). Everything indexed by row
    (rows, mask, positions, caches) is taken in this order."""
    count, staying = len(indices), set(indices)
    movers = iter(i for i in indices if i >= count)
    return [i if i in staying else next(movers) for i in range(count)]


def kept_in_place(value, order: list[int]):
    """`value`'s rows in `order` (from `filled_order`): the few that move are copied into the
    places of those that leave, and the first len(order) rows are a view, still contiguous."""
    for place, row in enumerate(order):
        if place != row:
            value[place] = value[row]
    return value[: len(order)]


CACHE_AXIS = 2  # [batch, heads, positions, head size], as the exports name `past_sequence_length`


def array_module(value):
    """numpy for numpy arrays, cupy for cupy arrays (a GPU cache that never left the GPU)."""
    if isinstance(value, np.ndarray):
        return np
    return importlib.import_module(type(value).__module__.split(".")[0])


def stacked_right(values: list, width: int, axis: int = CACHE_AXIS):
    """`values` one after another along the rows, each right-aligned to `width` along `axis`
    (zeros before it)."""
    xp = array_module(values[0])
    shape = list(values[0].shape)
    shape[0], shape[axis] = sum(len(value) for value in values), width
    out = xp.zeros(shape, dtype=values[0].dtype)
    start = 0
    for value in values:
        index = [slice(start, start + len(value))] + [slice(None)] * (len(shape) - 1)
        index[axis] = slice(width - value.shape[axis], width)
        out[tuple(index)] = value
        start += len(value)
    return out


def padded(rows: list, pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The rows' prompts as one [rows, longest] array padded with `pad_id` on the right (or
    the left, as Hugging Face pads a causal LM's batch), and its attention mask."""
    width = max(len(row.prompt) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        place = slice(width - len(row.prompt), width) if left else slice(0, len(row.prompt))
        ids[index, place] = row.prompt
        mask[index, place] = 1
    return ids, mask


def take_rows(value, rows: list[int]):
    xp = array_module(value)
    return value[xp.asarray(rows, dtype=xp.int64)]


class CausalGroup:
    """All rows of a causal LM and their right-aligned cache (see module doc)."""

    def __init__(self, rows: list, cache: dict, mask: np.ndarray, positions: np.ndarray):
        self.rows, self.cache, self.mask, self.positions = rows, cache, mask, positions

    @classmethod
    def prefill(cls, steps: dict, rows: list, pad_id: int) -> tuple[CausalGroup, np.ndarray]:
        """Joining rows' prompts through decoder_model, left-padded together."""
        ids, mask = padded(rows, pad_id, left=True)
        positions = np.where(mask == 1, mask.cumsum(axis=1) - 1, 1)
        cache: dict = {}
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        logits = run_step(steps["decoder_model"], feed, cache)
        return cls(list(rows), cache, mask, mask.sum(axis=1)), logits

    @property
    def width(self) -> int:
        """The cache's length: what the next step reads."""
        return self.mask.shape[1]

    def step(self, steps: dict) -> np.ndarray:
        """Each row's last token in, the next token's logits out."""
        tokens = np.array([[row.tokens[-1]] for row in self.rows], dtype=np.int64)
        mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], axis=1)
        feed = {
            "input_ids": tokens,
            "attention_mask": mask,
            "position_ids": self.positions[:, None].copy(),
        }
        logits = run_step(steps["decoder_with_past_model"], feed, self.cache)
        self.mask, self.positions = mask, self.positions + 1
        return logits

    def absorb(self, others: list[CausalGroup]) -> None:
        """`others`' rows after this group's, every cache left-padded to the longest (one copy
        of each: the step reads the cache as it is)."""
        groups = [self, *others]
        width = max(group.width for group in groups)
        for name in self.cache:
            self.cache[name] = stacked_right([group.cache[name] for group in groups], width)
        self.mask = stacked_right([group.mask for group in groups], width, axis=1)
        self.positions = np.concatenate([group.positions for group in groups])
        self.rows += [row for group in others for row in group.rows]

    def keep(self, indices: list[int]) -> None:
        """Only these rows stay; the columns all of them hide are cut."""
        order = filled_order(indices)
        self.rows = [self.rows[i] for i in order]
        if not order:
            return
        mask = self.mask[order]
        hidden = int((mask.cumsum(axis=1) == 0).sum(axis=1).min())
        self.mask, self.positions = mask[:, hidden:], self.positions[order]
        for name, value in self.cache.items():
            if hidden:  # cut, then taken: one copy, contiguous as the next step reads it
                self.cache[name] = take_rows(value[:, :, hidden:], order)
            else:  # no column to cut: the rows that leave are written over, in place
                self.cache[name] = kept_in_place(value, order)


class SlotGroup:
    """All rows of a causal LM on a slot decoder (steps["decoder_slots"], a
    decoding.OnnxRuntimeSlotStep): row i's cache is slot i, as long as the row's own tokens;
    nothing is padded or copied at a step."""

    def __init__(self, rows: list, lengths: np.ndarray, slots) -> None:
        self.rows, self.lengths, self.slots = rows, lengths, slots

    @classmethod
    def prefill(
        cls, steps: dict, rows: list, pad_id: int, start: int
    ) -> tuple[SlotGroup, np.ndarray]:
        """Joining rows' prompts, right-padded together, into slots start.. on."""
        ids, mask = padded(rows, pad_id)
        slots = steps["decoder_slots"]
        logits = slots(ids, mask, start)
        return cls(list(rows), mask.sum(axis=1), slots), logits

    @property
    def width(self) -> int:
        """The longest row's cache: what the next step reads (its own token written after)."""
        return int(self.lengths.max())

    def step(self, steps: dict, joining: list = (), pad_id: int = 0) -> np.ndarray:
        """Each row's next token's logits; with `joining`, in the same call (the mixed graph)
        those rows' prompts prefilled into the slots after them, their logits after."""
        tokens = np.array([row.tokens[-1] for row in self.rows], dtype=np.int64)
        mask = (np.arange(self.width + 1)[None, :] <= self.lengths[:, None]).astype(np.int64)
        if joining:
            ids, prompt_mask = padded(joining, pad_id)
            logits = self.slots.joined(tokens, mask, ids, prompt_mask)
            self.rows += list(joining)
            self.lengths = np.concatenate([self.lengths + 1, prompt_mask.sum(axis=1)])
            return logits
        logits = self.slots(tokens[:, None], mask, 0)
        self.lengths = self.lengths + 1
        return logits

    def absorb(self, others: list[SlotGroup]) -> None:
        """`others`' rows, already prefilled into the slots after this group's."""
        self.rows += [row for group in others for row in group.rows]
        self.lengths = np.concatenate([self.lengths, *(group.lengths for group in others)])

    def keep(self, indices: list[int]) -> None:
        order = filled_order(indices)
        for place, row in enumerate(order):
            if place != row:
                self.slots.move(place, row)
        self.rows, self.lengths = [self.rows[i] for i in order], self.lengths[order]


class Seq2SeqGroup:
    """Rows of a seq2seq model that joined together: one cohort (see module doc)."""

    def __init__(self, rows: list, cache: dict, encoder_mask: np.ndarray) -> None:
        self.rows, self.cache, self.encoder_mask = rows, cache, encoder_mask
        self.steps_done = 1

    @classmethod
    def prefill(
        cls, steps: dict, rows: list, pad_id: int, start_id: int
    ) -> tuple[Seq2SeqGroup, np.ndarray]:
        """The encoder over the joining rows' prompts (right-padded), then the first step."""
        ids, mask = padded(rows, pad_id)
        hidden = steps["encoder_model"]({"input_ids": ids, "attention_mask": mask})
        cache: dict = {}
        feed = {
            "encoder_attention_mask": mask,
            "encoder_hidden_states": hidden["last_hidden_state"],
            "input_ids": np.full((len(rows), 1), start_id, np.int64),
        }
        logits = run_step(steps["decoder_model"], feed, cache)
        return cls(list(rows), cache, mask), logits

    @property
    def width(self) -> int:
        """The decoder cache's length: what the next step reads."""
        return self.steps_done

    def step(self, steps: dict) -> np.ndarray:
        tokens = np.array([[row.tokens[-1]] for row in self.rows], dtype=np.int64)
        feed = {"encoder_attention_mask": self.encoder_mask, "input_ids": tokens}
        logits = run_step(steps["decoder_with_past_model"], feed, self.cache)
        self.steps_done += 1
        return logits

    def keep(self, indices: list[int]) -> None:
        order = filled_order(indices)
        self.rows = [self.rows[i] for i in order]
        self.encoder_mask = self.encoder_mask[order]
        self.cache = {name: kept_in_place(value, order) for name, value in self.cache.items()}


class RunningBatch:
    """The rows decoding now, in groups (one for a causal LM, a cohort each for seq2seq)."""

    def __init__(
        self,
        kind: str,
        steps: dict,
        pad_id: int,
        start_id: int | None = None,
        cache_limit: int = 0,
    ) -> None:
        self.kind, self.steps, self.pad_id, self.start_id = kind, steps, pad_id, start_id
        self.cache_limit = cache_limit  # the profile's longest cache (0: none): a guard
        self.groups: list = []

    @property
    def rows(self) -> list:
        return [row for group in self.groups for row in group.rows]

    def __len__(self) -> int:
        return sum(len(group.rows) for group in self.groups)

    def join(self, joining: list) -> list[tuple[object, np.ndarray]]:
        """Prefill the joining rows (their first token's logits) and add them to the batch;
        (row, logits) for each. A causal LM's prefills stay groups of their own until the
        next step stacks them under the running rows, in one copy however many joined; a slot
        group joins at once (its slots follow the rows', nothing to copy)."""
        if self.kind == "slots":  # into the slots after the rows' (compacted at each leave)
            group, logits = SlotGroup.prefill(self.steps, joining, self.pad_id, len(self))
        elif self.kind == "causal":
            group, logits = CausalGroup.prefill(self.steps, joining, self.pad_id)
        else:
            group, logits = Seq2SeqGroup.prefill(self.steps, joining, self.pad_id, self.start_id)
        if self.kind == "slots" and self.groups:  # one group of every row
            self.groups[0].absorb([group])
        else:
            self.groups.append(group)
        return list(zip(joining, logits))

    def joins_in_step(self) -> bool:
        """Whether joining rows can be prefilled in the running rows' step (one call): on the
        slot decoder's mixed graph, while some row runs."""
        slots = self.steps.get("decoder_slots")
        return bool(len(self) and getattr(slots, "mixed", None))

    def step(self, joining: list = ()) -> list[tuple[object, np.ndarray]]:
        """One decoding step of every row: (row, its next token's logits); with `joining`
        (when `joins_in_step`), their prefill too, their first token's logits after."""
        if self.kind == "causal" and len(self.groups) > 1:  # one group of every row
            self.groups[0].absorb(self.groups[1:])
            self.groups = self.groups[:1]
        for group in self.groups:
            if self.cache_limit and group.width > self.cache_limit:
                raise RuntimeError(  # cannot happen when the door checks each row alone
                    f"a step would read a cache of {group.width} > the profile's {self.cache_limit}"
                )
        if joining:  # the slot group's rows, the joining ones now last
            logits = self.groups[0].step(self.steps, joining, self.pad_id)
            return list(zip(self.groups[0].rows, logits))
        return [pair for group in self.groups for pair in zip(group.rows, group.step(self.steps))]

    def remove(self, leaving: set) -> None:
        """Drop these rows (finished or cancelled) and their cache."""
        for group in self.groups:
            if any(row in leaving for row in group.rows):
                group.keep([i for i, row in enumerate(group.rows) if row not in leaving])
        self.groups = [group for group in self.groups if group.rows]

    def clear(self) -> None:
        self.groups = []

    def widths(self) -> list[int]:
        """Each group's cache length (what its next step reads): the profile arithmetic."""
        return [group.width for group in self.groups]
