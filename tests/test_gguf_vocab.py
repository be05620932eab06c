"""The GGUF's tokenizer against llama.cpp's own vocab-only files (`make install` fetches them).

For each real vocabulary llama.cpp ships that kbitprep writes (byte-level BPE: llama-bpe, qwen2,
gpt-2, starcoder; sentencepiece: llama-spm, phi-3), the training tokenizer is transformers' rebuild
of llama.cpp's file (Llama-3's is built from the file and its published split: tests/llama_vocab.py);
kbitprep's GGUF of it holds the same model, pre-tokenizer, tokens, types, merges, special ids and
add_bos/add_eos as llama.cpp's file, and that tokenizer encodes llama.cpp's test strings (.inp) to
llama.cpp's ids (.out). Intended differences, by name:
- scores of a byte-fallback tokenizer.json come from its merge ranks (llama.cpp's file has
  sentencepiece's own); the test checks that byte tokens score 0 and merged tokens by rank;
- the unk token is UNKNOWN (Phi-3's file says CONTROL, its tokenizer_config listed it special),
  and Phi-3's file's own "[PADn]" rows (UNKNOWN there) are ordinary tokens of the rebuild;
- eot_token_id: llama.cpp's vocab files carry none; ours is the template's end-of-turn token.
An unknown pre-tokenizer is refused naming its hash, unless named with `pre=`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from kbitprep.app.export.gguf_vocab import GgufError, pre_tokenizer_name, write_vocab
from kbitprep.app.export.stops import end_of_turn_ids
from llama_vocab import MissingVocabError, rebuilt_folder, reference_fields, tokenizer_fields, vocab_file

UNUSED, UNKNOWN = 5, 2
# What llama.cpp assumes for a file without the add_* flags (src/llama-vocab.cpp, load: llama3's pre
# type sets add_bos); every other flag defaults to false.
LLAMA_CPP_FLAG_DEFAULTS = {"llama-bpe": {"tokenizer.ggml.add_bos_token": True}}


def _vocab_file(name: str) -> Path:
    try:
        return vocab_file(name)
    except MissingVocabError as missing:
        pytest.fail(str(missing))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    import gguf
    from transformers import AutoTokenizer

    @functools.cache
    def build(name: str):
        _vocab_file(name)  # fails naming `make install` when the file is missing
        folder = tmp_path_factory.mktemp(name)
        tokenizer = AutoTokenizer.from_pretrained(rebuilt_folder(name))
        tokenizer.save_pretrained(folder)
        reference = reference_fields(name)
        writer = gguf.GGUFWriter(folder / "vocab.gguf", "llama")
        write_vocab(writer, tokenizer, folder, len(reference["tokenizer.ggml.tokens"]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        return tokenizer, reference, tokenizer_fields(folder / "vocab.gguf")
    return build


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "gpt-2", "starcoder", "llama-spm", "phi-3"])
def test_the_tokenizer_fields_are_llama_cpps_own(written, name: str) -> None:
    tokenizer, reference, ours = written(name)
    reference, ours = dict(reference), dict(ours)  # the fixture's are kept for the next test
    eot = ours.pop("tokenizer.ggml.eot_token_id", None)
    assert eot == (end_of_turn_ids(tokenizer) or [None])[0]
    if tokenizer.chat_template and "<|im_end|>" in tokenizer.chat_template:
        assert eot == tokenizer.convert_tokens_to_ids("<|im_end|>")
    scores, reference_scores = ours.pop("tokenizer.ggml.scores", None), reference.pop("tokenizer.ggml.scores", None)
    types, reference_types = ours.pop("tokenizer.ggml.token_type"), reference.pop("tokenizer.ggml.token_type")
    for key in [key for key in ours if key.startswith("tokenizer.ggml.add_") and key not in reference]:
        # an older file without the flag: llama.cpp applies its default for the pre-tokenizer instead
        assert ours.pop(key) == LLAMA_CPP_FLAG_DEFAULTS.get(reference["tokenizer.ggml.pre"], {}).get(key, False), key
    assert ours == reference
    differ = {i for i, (a, b) in enumerate(zip(types, reference_types, strict=True)) if a != b}
    tokens = reference["tokenizer.ggml.tokens"]
    assert differ <= {tokenizer.unk_token_id} | {i for i in differ if reference_types[i] == UNKNOWN
                                                 and tokens[i].startswith("[PAD")}
    if scores is not None:  # sentencepiece: byte tokens 0, merged tokens ordered as the merges
        assert reference_scores is not None
        assert all(scores[i] == 0.0 for i, kind in enumerate(types) if kind == 6)
        assert scores[tokenizer.convert_tokens_to_ids("▁t")] > scores[tokenizer.convert_tokens_to_ids("▁the")]


@pytest.mark.slow
# transformers rebuilds llama-spm with other ids for some strings
@pytest.mark.parametrize("name", ["llama-bpe", "qwen2"])
def test_the_training_tokenizer_gives_llama_cpps_ids_for_its_test_strings(written, name: str) -> None:
    tokenizer, _, _ = written(name)
    path = _vocab_file(name)
    strings = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = path.with_suffix(".gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(strings) == len(expected) > 30
    for text, ids in zip(strings, expected, strict=True):
        assert tokenizer.encode(text, add_special_tokens=False) == [int(i) for i in ids.split()], text


def test_an_unknown_pre_tokenizer_is_refused_naming_its_hash_unless_named() -> None:
    from transformers import AutoTokenizer

    from kbitprep.app.demo import DEMO_MODEL

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    with pytest.raises(GgufError, match=r"check hash [0-9a-f]{64}.*--gguf-pre NAME"):
        pre_tokenizer_name(tokenizer)
    assert pre_tokenizer_name(tokenizer, "default") == "default"
