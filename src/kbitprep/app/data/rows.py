"""Training rows for `kbitprep finetune`: the `Row` kinds, the JSONL reader, tokenizing for causal-LM training.

Every row becomes one of three kinds:

    text                every token is trained
    prompt/completion   only the completion is trained; the prompt's labels are -100
                        (ignored by the loss)
    messages            rendered with the chat template; only the assistant turns are
                        trained (see `chat`)

Which keys of a record make which kind (text, prompt/completion, messages, Alpaca,
ShareGPT) is the table in `formats`; the files they come in (JSONL, a JSON array,
Parquet, CSV, a `datasets` folder) are read by `files`. JSONL is read here, one line at
a time, so that every problem names its line: blank lines are skipped, and any other
line that is not a row is an error naming the file and the line, raised before
anything is loaded or written.

`text` and `prompt`/`completion` rows may share a file (both become bos + prompt +
completion + eos); `messages` rows may not be mixed with them, since the model would be
taught two formats.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ...errors import KbitPrepError

__all__ = [
    "IGNORE_INDEX",
    "CausalLMCollator",
    "DataError",
    "Row",
    "TokenizedData",
    "check_one_kind",
    "check_token_ids",
    "messages_row",
    "read_jsonl",
    "refuse_non_text",
    "tokenize_rows",
]

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


class DataError(KbitPrepError, ValueError):
    """The training data cannot be used; the message names the file and, where there is one, the line."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One training example.

    Args:
        line (int): its 1-based line number in a JSONL file, or its row number (from 1) in
            another container (a JSON array, Parquet, CSV, a `datasets` folder).
        prompt (str): text that conditions the model but is not trained ("" for a `text` row).
        completion (str): the text that is trained (the whole `text` of a `text` row).
        messages (tuple[dict, ...]): the turns of a `messages` row (each with a "role" and a
            "content" string); empty for the other kinds. Default: ()
    """

    line: int
    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, Any], ...] = ()

    @property
    def kind(self) -> str:
        """"messages", "prompt" (prompt and completion) or "text"."""
        return "messages" if self.messages else "prompt" if self.prompt else "text"


def messages_row(value: Any, line: int, where: str) -> Row:
    """A `messages` row: a list of turns, each a role and a content string, with an assistant turn to train."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                        f"objects, not {type(value).__name__ if value != [] else 'an empty list'}")
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: messages[{index}] must be an object with \"role\" and \"content\", "
                            f"not {type(turn).__name__}")
        for key in ("role", "content"):
            if not isinstance(turn.get(key), str):
                found = "missing" if key not in turn else f"a {type(turn[key]).__name__}"
                raise DataError(f"{where}: messages[{index}] \"{key}\" must be a string ({found})")
    if not any(turn["role"] == "assistant" and turn["content"] for turn in value):
        roles = ", ".join(turn["role"] for turn in value)
        raise DataError(f"{where}: no \"assistant\" turn with content (roles: {roles}), so the row has "
                        "nothing to train")
    return Row(line, messages=tuple(value))


def check_one_kind(rows: Sequence[Row], path: str) -> None:
    """Refuse a file that mixes `messages` rows with `text` or `prompt`/`completion` rows, naming the line.

    Raises:
        DataError: the first row whose kind differs from the first row's.
    """
    chat = rows[0].kind == "messages" if rows else False
    for row in rows:
        if (row.kind == "messages") != chat:
            raise DataError(f"{path}:{row.line}: a \"{row.kind}\" row, but line {rows[0].line} is a "
                            f"\"{rows[0].kind}\" row; one file holds either \"messages\" rows or "
                            "\"text\"/\"prompt\" rows. Split it into two files")


# Magic bytes of files that are not JSONL text, and what to do about each.
_NOT_TEXT = (
    (b"\x1f\x8b", "a gzip-compressed file; decompress it first (gunzip)"),
    (b"BZh", "a bzip2-compressed file; decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file; decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file; decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive; extract the .jsonl file from it"),
    (b"\xff\xfe", "UTF-16 text; save the file as UTF-8"),
    (b"\xfe\xff", "UTF-16 text; save the file as UTF-8"),
)
_UTF8_BOM = b"\xef\xbb\xbf"
# A line longer than this is no training row (a sequence of --seq-len tokens is a few MB of
# text at most); reading stops there instead of holding the whole line in memory.
MAX_LINE_BYTES = 256 * 1024 * 1024


def _open_data(path: str) -> Any:
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder; pass a .jsonl file with one JSON object per line")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - returned open, closed by the caller's `with`
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    head = handle.peek(8)[:8] if hasattr(handle, "peek") else b""
    try:
        refuse_non_text(path, head)
    except DataError:
        handle.close()
        raise
    return handle


def refuse_non_text(path: str | os.PathLike[str], head: bytes) -> None:
    """Refuse a file whose first bytes show a compressed file, an archive or UTF-16 text, naming the fix.

    Raises:
        DataError: "DATA: is a gzip-compressed file; decompress it first (gunzip)", ...
    """
    for magic, what in _NOT_TEXT:
        if head.startswith(magic):
            raise DataError(f"{path}: is {what}")


def _raw_lines(handle: Any, path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) for each line, read one at a time; a line past MAX_LINE_BYTES is an error."""
    for number in itertools.count(1):
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DataError(f"{path}:{number}: longer than {MAX_LINE_BYTES // 2**20} MiB; one line is one "
                            "training row: split the text into rows of at most a few --seq-len each")
        if number == 1 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM):]  # the byte-order mark some editors write: not part of the JSON
        yield number, raw.rstrip(b"\r\n")


def _row_from_line(raw: bytes, number: int, path: str, data_format: str) -> Row | None:
    from .formats import row_from_record

    where = f"{path}:{number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not UTF-8 text (byte {error.start + 1} is {raw[error.start]:#04x}); "
                        "save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON (column {error.colno}: {error.msg})") from None
    return row_from_record(value, number, where, data_format)


def read_jsonl(path: str | os.PathLike[str], data_format: str = "auto") -> list[Row]:
    """Read and check every row of a JSONL file, one line at a time.

    Other containers (a JSON array, Parquet, CSV, a `datasets` folder) are read by
    `kbitprep.app.data.files.read_data`, which comes here for JSONL.

    Args:
        path (str | PathLike): the file.
        data_format (str): the rows' format (`kbitprep.app.data.formats`); "auto" recognises
            each row's. Default: "auto"

    Returns:
        list[Row]: the rows, in file order.

    Raises:
        DataError: the file is missing, unreadable, empty, compressed or not UTF-8 text,
            or a line is not UTF-8, not JSON, absurdly long, or matches no data format; the
            message names the file and line.
    """
    path = os.fspath(path)
    with _open_data(path) as handle:
        try:
            rows = [row for number, raw in _raw_lines(handle, path)
                    if (row := _row_from_line(raw, number, path, data_format)) is not None]
        except OSError as error:
            raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not rows:
        raise DataError(f"{path}: holds no rows; add lines such as {{\"text\": \"...\"}} "
                        "or {\"prompt\": \"...\", \"completion\": \"...\"}")
    check_one_kind(rows, path)
    return rows


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """Rows turned into token ids and labels.

    Args:
        examples (list[dict]): `input_ids` and `labels` lists, one dict per kept row.
        truncated (int): rows longer than the sequence length, cut at its end.
        dropped (tuple[int, ...]): line numbers of rows with no trained token left after
            truncation (a prompt that fills the whole sequence).
    """

    examples: list[dict[str, list[int]]]
    truncated: int
    dropped: tuple[int, ...]

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
    from .chat import check_chat_template, tokenize_conversation

    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, not {seq_len}")
    if any(row.kind == "messages" for row in rows):
        check_chat_template(tokenizer, str(getattr(tokenizer, "name_or_path", "") or "the model"))
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    limit = _character_limit(tokenizer, seq_len)
    examples, truncated, dropped = [], 0, []
    for row in rows:
        if row.kind == "messages":
            ids, labels = tokenize_conversation(row.messages, tokenizer, f"{source}:{row.line}")
        else:
            ids, labels = _plain_tokens(row, tokenizer, bos, eos, limit)
        truncated += len(ids) > seq_len
        ids, labels = ids[:seq_len], labels[:seq_len]
        # The first position is never a target (nothing comes before it), so it does not count.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped.append(row.line)
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        what = "an assistant token" if rows and rows[0].kind == "messages" else "a completion token"
        raise DataError(f"{source}: no row has {what} within --seq-len {seq_len}; "
                        "raise --seq-len or shorten the prompts")
    _check_not_all_unknown(examples, tokenizer, source)
    return TokenizedData(examples, truncated, tuple(dropped))


def _character_limit(tokenizer: Any, seq_len: int) -> int | None:
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
    largest = max([pad_token_id, *(max(example["input_ids"]) for example in data.examples)])
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
