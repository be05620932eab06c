"""Rows turned into token ids and labels for causal-LM training, and batches of them.

`text` and `prompt`/`completion` rows become `bos + prompt + completion + eos` with the
prompt's labels -100; `messages` rows go through the chat template (`chat`). The checks
here need the tokenizer or the model: token ids past the vocabulary, text the tokenizer
does not know.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from .chat import check_chat_template, tokenize_conversation
from .rows import IGNORE_INDEX, DataError, Row

__all__ = ["REJECTED", "CausalLMCollator", "PreferenceCollator", "TokenizedData", "character_limit",
           "check_token_ids", "row_tokens", "tokenize_rows"]

REJECTED = "rejected_"  # a preference example's keys for its rejected side: rejected_input_ids, rejected_labels


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """Rows turned into token ids and labels.

    Args:
        examples (list[dict]): `input_ids` and `labels` lists, one dict per kept row.
        truncated (int): rows longer than the sequence length, cut at its end.
        dropped (tuple[int, ...]): line numbers of rows with no trained token left after
            truncation (a prompt that fills the whole sequence).
        lengths (tuple[int, ...]): each row's token count before the cut, in row order (dropped
            rows included); a text longer than the character limit (see `character_limit`)
            counts its first characters only. Default: ()
    """

    examples: list[dict[str, list[int]]]
    truncated: int
    dropped: tuple[int, ...]
    lengths: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def _special_id(tokenizer: Any, name: str) -> list[int]:
    value = getattr(tokenizer, f"{name}_token_id", None)
    return [] if value is None else [int(value)]


def _plain_tokens(row: Row, tokenizer: Any, bos: list[int], eos: list[int],
                  limit: int | None = None) -> tuple[list[int], list[int]]:
    """`bos + prompt + completion + eos`, the prompt's labels -100; texts cut at `limit` characters first."""
    prompt = bos + (_token_ids(tokenizer, row.prompt, limit) if row.prompt else [])
    completion = _token_ids(tokenizer, row.completion, limit) + eos
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def tokenize_rows(rows: Sequence[Row], tokenizer: Any, seq_len: int, *, source: str = "data") -> TokenizedData:
    """Token ids and labels for each row, cut at `seq_len`.

    `text` and `prompt`/`completion` rows become `bos + prompt + completion + eos`: the
    tokenizer's beginning- and end-of-sequence tokens are added here (where it has them),
    the same way for every tokenizer, instead of relying on each tokenizer's own
    `add_special_tokens` habits; prompt positions get label -100. `messages` rows are
    rendered with the tokenizer's chat template and trained on the assistant turns only
    (`kbitprep.app.data.chat`).

    Raises:
        DataError: no row has a trained token left, or a chat row cannot be rendered.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, not {seq_len}")
    if any(row.kind == "messages" for row in rows):
        check_chat_template(tokenizer, str(getattr(tokenizer, "name_or_path", "") or "the model"))
    limit = character_limit(tokenizer, seq_len)
    examples, truncated, dropped, lengths = [], 0, [], []
    for row in rows:
        sides = [row] if row.rejected is None else [row, row.rejected]
        tokens = [row_tokens(side, tokenizer, f"{source}:{row.line}", limit) for side in sides]
        lengths.append(max(len(ids) for ids, _ in tokens))  # a pair: its longer side
        truncated += any(len(ids) > seq_len for ids, _ in tokens)
        tokens = [(ids[:seq_len], labels[:seq_len]) for ids, labels in tokens]
        # The first position is never a target (nothing comes before it), so it does not count.
        if any(all(label == IGNORE_INDEX for label in labels[1:]) for _, labels in tokens):
            dropped.append(row.line)
            continue
        example = {"input_ids": tokens[0][0], "labels": tokens[0][1]}
        if row.rejected is not None:  # a preference pair: the rejected side beside the chosen one
            example |= {REJECTED + "input_ids": tokens[1][0], REJECTED + "labels": tokens[1][1]}
        examples.append(example)
    if not examples:
        what = "an assistant token" if rows and rows[0].kind == "messages" else "a completion token"
        raise DataError(f"{source}: no row has {what} within --seq-len {seq_len}; "
                        "raise --seq-len or shorten the prompts")
    _check_not_all_unknown(examples, tokenizer, source)
    return TokenizedData(examples, truncated, tuple(dropped), tuple(lengths))


def row_tokens(row: Row, tokenizer: Any, where: str, limit: int | None = None) -> tuple[list[int], list[int]]:
    """One row's token ids and labels, not yet cut at a sequence length (see `tokenize_rows`).

    Args:
        row (Row): the row.
        tokenizer (Any): the model's tokenizer (its chat template renders a `messages` row).
        where (str): the row's file and line, for messages.
        limit (int | None): cut a `text`/`prompt` row's texts at this many characters first; None: whole.
            Default: None
    """
    if row.kind == "messages":
        return tokenize_conversation(row.messages, tokenizer, where, row.context_turns)
    return _plain_tokens(row, tokenizer, _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos"), limit)


def character_limit(tokenizer: Any, seq_len: int) -> int | None:
    """How many characters of a text can matter for its first `seq_len` tokens.

    No token spans more characters than the longest entry of the vocabulary, so a text
    cut at twice (seq_len + 1) times that length still yields its first seq_len tokens
    (the cut only changes the last few). A 50 MB line is then tokenized in milliseconds,
    not minutes. None when the tokenizer does not list its vocabulary.
    """
    vocab = getattr(tokenizer, "get_vocab", None)
    lengths = [len(token) for token in vocab()] if callable(vocab) else []
    return 2 * (seq_len + 1) * max(max(lengths, default=0), 16) if lengths else None


def _token_ids(tokenizer: Any, text: str, limit: int | None) -> list[int]:
    return tokenizer(text[:limit] if limit is not None else text, add_special_tokens=False)["input_ids"]


# Data whose trained tokens are mostly the unknown token teaches the model to emit it.
UNKNOWN_SHARE_LIMIT = 0.5


def _check_not_all_unknown(examples: Sequence[dict[str, list[int]]], tokenizer: Any, source: str) -> None:
    """Refuse data whose trained tokens are mostly the tokenizer's unknown token: nothing could be learned."""
    unk = getattr(tokenizer, "unk_token_id", None)
    special = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")} - {unk}
    trained = [label for example in examples for label in example["labels"][1:]
               if label != IGNORE_INDEX and label not in special]
    unknown = sum(label == unk for label in trained) if unk is not None else 0
    if trained and unknown >= UNKNOWN_SHARE_LIMIT * len(trained):
        token = getattr(tokenizer, "unk_token", None) or unk
        raise DataError(f"{source}: {unknown} of the text's {len(trained)} tokens are the tokenizer's unknown token "
                        f"{token!r}: the model's tokenizer does not know these characters (another script or "
                        "language?), so nothing can be learned. Use a model whose tokenizer covers the text, or "
                        "check the file's text")


def check_token_ids(data: TokenizedData, vocab_size: int, *, tokenizer_source: str, pad_token_id: int) -> None:
    """Raise `DataError` if a token id (or the padding id) lies outside the model's embedding table.

    Args:
        data (TokenizedData): the tokenized rows.
        vocab_size (int): the model's vocabulary size (rows of its input embedding).
        tokenizer_source (str): where the tokenizer comes from, for the message.
        pad_token_id (int): the id batches are padded with.

    Raises:
        DataError: names the largest id and the vocabulary size.
    """
    largest = max([pad_token_id, *(max(example[key]) for example in data.examples
                                   for key in ("input_ids", REJECTED + "input_ids") if key in example)])
    if largest >= vocab_size:
        raise DataError(f"{tokenizer_source}: the tokenizer gives token id {largest}, but the model's vocabulary "
                        f"has {vocab_size} entries (config.json vocab_size): the tokenizer belongs to another model. "
                        "Save the model's own tokenizer beside its weights (tokenizer.save_pretrained)")


class CausalLMCollator:
    """Pads a list of examples on the right into `input_ids`, `attention_mask` and `labels` tensors.

    Packed examples (with `position_ids`, from `kbitprep.app.data.packing`) get `position_ids`
    instead of an `attention_mask`, and `use_cache=False`: that is how transformers is told
    to keep the packed rows apart (see `kbitprep.app.data.packing`). Their padding continues as
    one more short row of its own.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Iterable[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        examples = list(examples)
        width = max(len(example["input_ids"]) for example in examples)
        padded = [(e, width - len(e["input_ids"])) for e in examples]
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([e["input_ids"] + [self.pad_token_id] * n for e, n in padded]),
            "labels": torch.tensor([e["labels"] + [IGNORE_INDEX] * n for e, n in padded]),
        }
        if "position_ids" in examples[0]:
            batch["position_ids"] = torch.tensor([e["position_ids"] + list(range(n)) for e, n in padded])
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = torch.tensor([[1] * len(e["input_ids"]) + [0] * n for e, n in padded])
        return batch


def longest_row(data: TokenizedData) -> int:
    """The most tokens any one batch row of `data` holds (a pair's longer side): what batches pad up to at worst.

    0 for no examples.
    """
    return max((max(len(e["input_ids"]), len(e.get(REJECTED + "input_ids", ()))) for e in data.examples), default=0)


class PreferenceCollator:
    """Pads preference pairs into one batch: the chosen sequences in the first half of the rows, the rejected
    ones in the second, in the same order (what `kbitprep.loss.preference_loss` reads).

    One forward pass then scores both sides, as TRL's trainers concatenate them.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad = CausalLMCollator(pad_token_id)

    def __call__(self, examples: Iterable[dict[str, list[int]]]) -> dict[str, Any]:
        examples = list(examples)
        rejected = [{"input_ids": e[REJECTED + "input_ids"], "labels": e[REJECTED + "labels"]} for e in examples]
        chosen = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        return self.pad(chosen + rejected)
