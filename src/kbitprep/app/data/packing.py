"""Packing: short rows concatenated into sequences of up to `--seq-len` tokens, kept apart in attention.

    rows      [a a a] [b b] [c c c c] [d]          (seq_len 6)
    packs     [c c c c d .] [a a a b b .]          first fit, longest rows first
    positions  0 1 2 3 0      0 1 2 0 1            restart at each row
    labels    the row's own, but each row's first token is -100: nothing in the same
              row comes before it, and the previous row must not predict it

Each row still attends only to itself. transformers (5.x) builds that block-diagonal
causal mask itself, for the eager and sdpa attention paths as well as flash-attention,
when a batch carries `position_ids` that restart and no 2-D `attention_mask`, and no KV
cache is in use (`masking_utils.find_packed_sequence_indices`); so the collator sends
`position_ids`, no `attention_mask`, and `use_cache=False`. A model whose attention does
not follow that rule would silently let rows see each other, so `check_packing` runs the
model once on two rows packed and unpacked and refuses packing when the losses differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...errors import InvalidArgumentError, KbitPrepError
from .rows import IGNORE_INDEX

if TYPE_CHECKING:
    from torch import nn

__all__ = ["PackedData", "PackingError", "check_packing", "pack_examples", "padding_tokens"]


class PackingError(KbitPrepError, RuntimeError):
    """Packing cannot be used with this model; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class PackedData:
    """Rows packed into sequences.

    Args:
        examples (list[dict]): `input_ids`, `labels` and `position_ids` lists, one dict per pack.
        rows (int): rows packed.
        padding_unpacked (int): padding tokens the rows would need unpacked, batched in file order.
        padding_packed (int): padding tokens the packs need, batched in file order.
    """

    examples: list[dict[str, list[int]]]
    rows: int
    padding_unpacked: int
    padding_packed: int

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    @property
    def padding_saved(self) -> int:
        return self.padding_unpacked - self.padding_packed

    def summary(self) -> dict[str, int]:
        """What report.json records about packing."""
        return {"rows": self.rows, "packs": len(self.examples), "padding_tokens_unpacked": self.padding_unpacked,
                "padding_tokens_packed": self.padding_packed, "padding_tokens_saved": self.padding_saved}


def padding_tokens(lengths: Sequence[int], batch_size: int) -> int:
    """Padding tokens when sequences of these lengths are batched in order, each batch padded to its longest."""
    total = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start:start + batch_size]
        total += max(batch) * len(batch) - sum(batch)
    return total


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Row indices per pack: longest rows first, each into the first pack with room (first-fit decreasing)."""
    packs: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((p for p, free in enumerate(room) if free >= lengths[index]), None)
        if target is None:
            packs.append([])
            room.append(capacity)
            target = len(packs) - 1
        packs[target].append(index)
        room[target] -= lengths[index]
    return packs


def _concatenate(rows: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    """One pack of `rows` in order: ids and labels joined, positions restarting, each row's first label -100."""
    pack: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        pack["input_ids"] += row["input_ids"]
        pack["labels"] += [IGNORE_INDEX, *row["labels"][1:]]
        pack["position_ids"] += list(range(len(row["input_ids"])))
    return pack


def pack_examples(examples: Sequence[dict[str, list[int]]], seq_len: int, batch_size: int) -> PackedData:
    """Pack tokenized rows (each at most `seq_len` long) into sequences of at most `seq_len` tokens.

    Args:
        examples (Sequence[dict]): `input_ids` and `labels` per row (`TokenizedData.examples`).
        seq_len (int): the longest pack.
        batch_size (int): examples per batch, for the padding figures.

    Returns:
        PackedData: the packs, with `position_ids` restarting at each row.

    Example:
        >>> pack_examples([{"input_ids": [5, 6], "labels": [5, 6]}] * 3, seq_len=4, batch_size=1).examples[0]
        {'input_ids': [5, 6, 5, 6], 'labels': [-100, 6, -100, 6], 'position_ids': [0, 1, 0, 1]}
    """
    lengths = [len(example["input_ids"]) for example in examples]
    if max(lengths, default=0) > seq_len:
        raise InvalidArgumentError(f"a row of {max(lengths)} tokens is longer than seq_len {seq_len}; cut rows first")
    packs = [_concatenate([examples[index] for index in members]) for members in _first_fit(lengths, seq_len)]
    packed_lengths = [len(pack["input_ids"]) for pack in packs]
    return PackedData(packs, len(examples), padding_tokens(lengths, batch_size),
                      padding_tokens(packed_lengths, batch_size))


def check_packing(model: nn.Module, vocab_size: int, *, tolerance: float | None = None) -> None:
    """Refuse packing for a model whose packed rows would see each other or keep counting positions.

    One forward pass over three packs of equal length, [A, C], [B, C] and [C, A]: the
    logits of row C must not depend on the row before it (attention stays within a row)
    nor on where in the pack it sits (positions restart). The three packs share one
    batch, so the same kernels compute them and equal means equal to rounding.

    Rounding depends on the dtype the hidden states travel in: a row at another offset
    goes through attention blocks of another split, and in bfloat16 one flipped last bit
    per layer adds up to about 1% of the largest logit on a tiny model. A row that keeps
    counting positions or sees its neighbour is off by the size of the logits themselves.

    Args:
        model (nn.Module): the prepared model.
        vocab_size (int): token ids are drawn below it.
        tolerance (float | None): the largest change allowed, relative to the largest logit;
            None: 1e-4, or eight of the hidden states' dtype's epsilon where that is more
            (0.031 for bfloat16). Default: None

    Raises:
        PackingError: naming the model type; train without --pack.
    """
    import torch

    if tolerance is None:
        lm: Any = model  # a transformers model (nn.Module's attribute typing hides its methods)
        hidden = lm.get_input_embeddings().weight.dtype
        tolerance = max(1e-4, 8 * torch.finfo(hidden).eps) if hidden.is_floating_point else 1e-4

    from .tokenize import CausalLMCollator

    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(1, vocab_size, (n,), generator=generator).tolist() for n in (7, 7, 5))
    packs = [_concatenate([{"input_ids": r, "labels": r} for r in rows]) for rows in ((a, c), (b, c), (c, a))]
    device = next(p.device for p in model.parameters())
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in CausalLMCollator(0)(packs).items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(**batch).logits.float()
    finally:
        model.train(was_training)
    after_a, after_b, first = logits[0, 7:], logits[1, 7:], logits[2, :5]
    scale = tolerance * max(1.0, float(first.abs().max()))
    leak, shift = float((after_a - after_b).abs().max()), float((after_a - first).abs().max())
    if leak > scale or shift > scale:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        what = "attend to each other" if leak > scale else "keep counting positions across rows"
        raise PackingError(f"--pack: in {kind} packed rows {what} (a row's logits change by {max(leak, shift):.3g} "
                           "with its neighbour; its attention or position code ignores restarting position_ids); "
                           "train without --pack")
