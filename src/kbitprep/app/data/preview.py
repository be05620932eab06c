"""What a run will train on, row by row and over the whole file: the report behind `kbitprep preview`.

    rows ──tokenize_rows──> TokenizedData ──> PreviewReport
                                               rows shown: each token, trained or masked
                                               summary: rows, tokens, trained tokens, rows cut by
                                                        --seq-len and the tokens they lose, rows with
                                                        nothing trained, packing efficiency
                                               checks: the template checks (`template_checks`)

The report only reads what the run's own tokenization produced (`tokenize_rows`, and
`pack_examples` with --pack); the rows it shows are those examples, so what is shown is
what is trained. A row the run drops (nothing trained within --seq-len) is shown too,
all masked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .packing import PackedData
from .rows import IGNORE_INDEX, Row
from .template_checks import TemplateChecks
from .tokenize import TokenizedData, character_limit, row_tokens

__all__ = ["PreviewReport", "PreviewRow", "PreviewSummary", "PreviewToken", "preview_report"]


@dataclasses.dataclass(frozen=True)
class PreviewToken:
    """One token of a shown row.

    Args:
        id (int): the token id.
        text (str): the token decoded on its own.
        trained (bool): the loss covers it (its label is not -100).
    """

    id: int
    text: str
    trained: bool


@dataclasses.dataclass(frozen=True)
class PreviewRow:
    """One row as the run tokenizes it.

    Args:
        line (int): its line (or row number) in the file.
        kind (str): "text", "prompt" or "messages".
        tokens (tuple[PreviewToken, ...]): its tokens after the cut at --seq-len.
        length (int): its tokens before the cut.
        dropped (bool): nothing is trained within --seq-len, so the run skips it.
    """

    line: int
    kind: str
    tokens: tuple[PreviewToken, ...]
    length: int
    dropped: bool

    @property
    def truncated(self) -> bool:
        return self.length > len(self.tokens)

    @property
    def trained(self) -> int:
        return sum(token.trained for token in self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "kind": self.kind, "length": self.length, "kept": len(self.tokens),
                "trained": self.trained, "truncated": self.truncated, "tokens_lost": self.length - len(self.tokens),
                "dropped": self.dropped,
                "tokens": [{"id": t.id, "text": t.text, "trained": t.trained} for t in self.tokens]}


@dataclasses.dataclass(frozen=True)
class PreviewSummary:
    """The whole file as the run trains it.

    Args:
        rows (int): rows read.
        examples (int): rows kept (with something trained).
        tokens (int): tokens of the kept rows, after the cut.
        trained_tokens (int): of those, the ones the loss covers (each row's first token never is).
        truncated_rows (int): rows longer than --seq-len.
        tokens_lost (int): tokens past --seq-len, cut off those rows.
        untrained_rows (tuple[int, ...]): lines of the rows with nothing trained (dropped).
        packing (dict | None): with --pack: packs, efficiency (tokens / (packs x seq_len)) and
            the padding figures (`PackedData.summary`). Default: None
    """

    rows: int
    examples: int
    tokens: int
    trained_tokens: int
    truncated_rows: int
    tokens_lost: int
    untrained_rows: tuple[int, ...]
    packing: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "examples": self.examples, "tokens": self.tokens,
                "trained_tokens": self.trained_tokens, "truncated_rows": self.truncated_rows,
                "tokens_lost": self.tokens_lost, "untrained_rows": len(self.untrained_rows),
                "untrained_lines": list(self.untrained_rows), "packing": self.packing}


@dataclasses.dataclass(frozen=True)
class PreviewReport:
    """What `kbitprep preview` shows; `to_dict()` is its `--json`.

    Args:
        model (str): the model folder.
        data (str): the data file.
        kind (str): the rows' kind ("text", "prompt" or "messages"; the first row's).
        seq_len (int): the sequence length.
        pack (bool): --pack.
        rows (tuple[PreviewRow, ...]): the rows shown, the file's first.
        summary (PreviewSummary): over the whole file.
        checks (TemplateChecks): the template checks' findings.
    """

    model: str
    data: str
    kind: str
    seq_len: int
    pack: bool
    rows: tuple[PreviewRow, ...]
    summary: PreviewSummary
    checks: TemplateChecks

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "kind": self.kind, "seq_len": self.seq_len,
                "pack": self.pack, "rows": [row.to_dict() for row in self.rows], "summary": self.summary.to_dict(),
                "checks": self.checks.to_dict()}


def _shown_row(row: Row, example: dict[str, list[int]] | None, length: int, tokenizer: Any, seq_len: int,
               source: str) -> PreviewRow:
    if example is None:  # dropped: the run tokenizes it, finds nothing trained, and skips it
        ids, _ = row_tokens(row, tokenizer, f"{source}:{row.line}", character_limit(tokenizer, seq_len))
        ids, labels = ids[:seq_len], [IGNORE_INDEX] * min(len(ids), seq_len)
    else:
        ids, labels = example["input_ids"], example["labels"]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # The first position is never a target (nothing comes before it), whatever its label says.
    tokens = tuple(PreviewToken(int(i), text, position > 0 and label != IGNORE_INDEX)
                   for position, (i, text, label) in enumerate(zip(ids, texts, labels, strict=True)))
    return PreviewRow(row.line, row.kind, tokens, length, example is None)


def _tokens_lost(rows: Sequence[Row], data: TokenizedData, tokenizer: Any, seq_len: int, source: str) -> int:
    """Tokens past --seq-len over all rows; a text cut by characters before tokenizing is counted whole."""
    limit = character_limit(tokenizer, seq_len)
    lost = 0
    for row, length in zip(rows, data.lengths, strict=True):
        if length <= seq_len:
            continue
        if limit is not None and row.kind != "messages" and max(len(row.prompt), len(row.completion)) > limit:
            length = len(row_tokens(row, tokenizer, f"{source}:{row.line}")[0])
        lost += length - seq_len
    return lost


def preview_report(rows: Sequence[Row], data: TokenizedData, tokenizer: Any, *, model: str, source: str,
                   seq_len: int, checks: TemplateChecks, packed: PackedData | None = None,
                   shown: int = 3) -> PreviewReport:
    """The preview of rows the run tokenized.

    Args:
        rows (Sequence[Row]): the rows read, in file order.
        data (TokenizedData): the rows tokenized (`tokenize_rows`), `lengths` included.
        tokenizer (Any): the tokenizer they were tokenized with.
        model (str): the model folder, for the report.
        source (str): the data file.
        seq_len (int): the sequence length they were cut at.
        checks (TemplateChecks): the template checks' findings.
        packed (PackedData | None): the packs, with --pack. Default: None
        shown (int): how many rows to show, the file's first. Default: 3

    Returns:
        PreviewReport: the rows shown and the summary.
    """
    dropped = set(data.dropped)
    examples = iter(data.examples)
    shown_rows = []
    for row, length in zip(rows[:shown], data.lengths, strict=False):
        example = None if row.line in dropped else next(examples)
        shown_rows.append(_shown_row(row, example, length, tokenizer, seq_len, source))
    tokens = sum(len(example["input_ids"]) for example in data.examples)
    trained = sum(label != IGNORE_INDEX for example in data.examples for label in example["labels"][1:])
    packing = None
    if packed is not None:
        packing = {**packed.summary(), "efficiency": round(tokens / max(len(packed) * seq_len, 1), 4)}
    summary = PreviewSummary(len(rows), len(data), tokens, trained, data.truncated,
                             _tokens_lost(rows, data, tokenizer, seq_len, source), data.dropped, packing)
    kind = rows[0].kind if rows else "text"
    return PreviewReport(model, source, kind, seq_len, packed is not None, tuple(shown_rows), summary, checks)
