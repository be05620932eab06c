"""Data problems refused (or made cheap) before any model is loaded: huge lines are cut by
characters before tokenizing without changing the tokens kept, lines are read one at a
time, and files that are not UTF-8 JSONL text are named for what they are."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import pytest

from kbitprep.app.data import jsonl as data_module
from kbitprep.app.data.rows import DataError, Row
from kbitprep.app.data.jsonl import read_jsonl
from kbitprep.app.data.tokenize import tokenize_rows


class Recording:
    """A real tokenizer that records the longest text it was given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, text: str, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)


def tokenizers(tmp_path: Path) -> dict:
    """The demo's character-level tokenizer and a real WordPiece one (MiniLM's)."""
    from conftest import minilm_path

    from kbitprep.app.demo import build_tiny_model
    from kbitprep.app.model.loading import load_tokenizer

    return {"char-level": load_tokenizer(build_tiny_model(tmp_path / "tiny")),
            "wordpiece": load_tokenizer(minilm_path())}


def test_a_huge_line_is_cut_by_characters_and_keeps_the_same_tokens(tmp_path: Path) -> None:
    words = "the quick brown fox jumps over the lazy dog, then naps: zzz 12345 "
    huge = words * (50_000_000 // len(words))  # a 50 MB single row
    for name, tokenizer in tokenizers(tmp_path).items():
        recording = Recording(tokenizer)
        data = tokenize_rows([Row(1, "", huge)], recording, seq_len=64)
        assert recording.longest < 100_000, name  # cut by characters, never tokenized whole
        whole = tokenizer(huge[:20_000], add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        assert data.examples[0]["input_ids"] == (bos + whole)[:64], name
        assert data.truncated == 1


def test_lines_are_read_one_at_a_time_and_an_absurd_line_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x" * 5000}) + "\n")
    monkeypatch.setattr(data_module, "MAX_LINE_BYTES", 1000)
    with pytest.raises(DataError, match=r"rows\.jsonl:2: longer than 0 MiB; one line is one training row"):
        read_jsonl(path)


@pytest.mark.parametrize(("content", "says"), [
    (gzip.compress(b'{"text": "a"}\n', mtime=0), "is a gzip-compressed file; decompress it first"),
    (lzma.compress(b'{"text": "a"}\n'), "is an xz-compressed file"),
    (b"PK\x03\x04rest of a zip", "is a zip archive"),
    ('{"text": "a"}\n'.encode("utf-16"), "is UTF-16 text; save the file as UTF-8"),
])
def test_files_that_are_not_jsonl_text_are_named(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=says):
        read_jsonl(path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert read_jsonl(path) == [Row(1, "", "a"), Row(2, "", "b")]


def test_mostly_unknown_text_is_refused_before_a_model_loads(tmp_path: Path) -> None:
    tokenizer = tokenizers(tmp_path)["char-level"]
    with pytest.raises(DataError, match=r"d\.jsonl: 9 of the text's 10 tokens are the tokenizer's unknown token"):
        tokenize_rows([Row(1, "", "привет мир")], tokenizer, seq_len=64, source="d.jsonl")
    assert len(tokenize_rows([Row(1, "", "hello, мир")], tokenizer, seq_len=64)) == 1  # a few are fine


def test_model_fingerprint_notices_other_weights(tmp_path: Path) -> None:
    from kbitprep.app.demo import build_tiny_model
    from kbitprep.app.model.loading import model_fingerprint

    model = build_tiny_model(tmp_path / "tiny")
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert model_fingerprint(model) != before
