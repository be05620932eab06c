"""llama.cpp's vocab-only GGUF files (`make install` fetches them) and transformers' rebuild of each.

Rebuilding a tokenizer from a vocab-only GGUF takes transformers 20-60 s per file, so the
rebuild is saved once, beside the files (`make install` runs this module), with the fields of
llama.cpp's file as JSON (gguf's reader takes seconds for a large vocabulary), and the tests load
them in a second. `python tests/llama_vocab.py` (re)builds them all.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

VOCAB = Path(__file__).resolve().parents[1] / ".cache" / "llama-vocab"
REBUILT = VOCAB / "transformers"
CONTROL = 3  # gguf.TokenType.CONTROL
# The vocabularies kbitprep writes and transformers rebuilds from llama.cpp's files; llama-bpe
# (Llama-3) is built here instead (see `llama3_tokenizer`).
NAMES = ("qwen2", "gpt-2", "starcoder", "llama-spm", "phi-3", "llama-bpe")
# Llama-3's pre-tokenizer split, as published in Meta's tokenizer.json (a fact, not code).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


class MissingVocabError(FileNotFoundError):
    """llama.cpp's vocab file is not in .cache/llama-vocab; `make install` fetches it."""


def vocab_file(name: str) -> Path:
    """llama.cpp's `ggml-vocab-NAME.gguf`.

    Raises:
        MissingVocabError: not fetched; the message says `make install` fetches it.
    """
    path = VOCAB / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        raise MissingVocabError(f"{path} is missing: `make install` fetches llama.cpp's vocab files "
                                "(from the llama-cpp-python sdist)")
    return path


def rebuilt_folder(name: str) -> Path:
    """A folder holding transformers' rebuild of llama.cpp's NAME vocabulary, built on first use."""
    folder = REBUILT / name
    if (folder / "tokenizer_config.json").is_file():
        return folder
    from transformers import AutoTokenizer

    source = vocab_file(name)
    REBUILT.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=REBUILT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "llama-bpe":
            llama3_tokenizer(source).save_pretrained(staging)
        else:
            AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # whole or not at all: a stopped build leaves only its hidden staging folder
    return folder


def llama3_tokenizer(source: Path) -> Any:
    """Llama-3's tokenizer from llama.cpp's `ggml-vocab-llama-bpe.gguf`: its tokens and merges, Llama-3's split.

    transformers' own rebuild from that file splits differently (llama.cpp names it smaug-bpe), so it
    is built with the tokenizers library: byte-level BPE over the file's vocabulary and merges, the
    published split expression, the control tokens as special tokens and bos prepended.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fields = tokenizer_fields(source)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                     ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, types, strict=True) if kind == CONTROL])
    bos, eos = tokens[fields["tokenizer.ggml.bos_token_id"]], tokens[fields["tokenizer.ggml.eos_token_id"]]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, fields["tokenizer.ggml.bos_token_id"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos)


def tokenizer_fields(path: Path) -> dict[str, Any]:
    """The `tokenizer.ggml.*` fields of a GGUF file (gguf's reader: about 7 s for a 150k-token vocabulary)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: reader.fields[key].contents() for key in reader.fields if key.startswith("tokenizer.ggml.")}


def reference_fields(name: str) -> dict[str, Any]:
    """The tokenizer fields of llama.cpp's own NAME file, read once and kept as JSON beside the rebuild."""
    saved = rebuilt_folder(name) / "llama-cpp-fields.json"
    source = vocab_file(name)
    if saved.is_file() and saved.stat().st_mtime >= source.stat().st_mtime:
        fields: dict[str, Any] = json.loads(saved.read_text(encoding="utf-8"))
        return fields
    fields = tokenizer_fields(source)
    staging = saved.with_suffix(".partial")
    staging.write_text(json.dumps(fields), encoding="utf-8")
    staging.replace(saved)
    return fields


def main(names: list[str]) -> int:
    for name in names or NAMES:
        print(f"llama.cpp vocab {name}: transformers' rebuild in {rebuilt_folder(name)}", flush=True)
        reference_fields(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
