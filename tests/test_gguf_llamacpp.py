"""kbitprep's GGUF files, loaded in llama.cpp: the same tokens and the same logits as PyTorch.

Slow and optional: marked `llamacpp` (deselected by default; `make gguf-check` installs
llama-cpp-python and runs them). Without llama-cpp-python they fail with the install line.
llama.cpp's own vocab files come from `make install` (.cache/llama-vocab, tests/llama_vocab.py).
- Logits: for each architecture a tiny random model (hidden 64, 2 layers, GPT-2's vocabulary)
  is written to GGUF and run in llama.cpp on the same token ids as in PyTorch; the max |logit
  difference| relative to the largest |logit| is bounded: f32 by 1e-3, quantized types
  (against the f32 model) by merge --verify's tolerance for the type. Llama-3.1's rope scaling
  is shown to matter: the same file without its rope_freqs tensor is far off.
- Tokens: for each real vocabulary kbitprep writes (transformers' rebuild of llama.cpp's file),
  a tiny model of the family that uses it is written through write_gguf; llama.cpp's
  tokenization of llama.cpp's own test strings (.inp) and of a chat-rendered conversation
  (special tokens parsed) equals the training tokenizer's ids, except for the strings
  named in KNOWN_TOKEN_DIFFERENCES. One model per tokenizer family (byte-level BPE, sentencepiece)
  is also run on tokenized text in both.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kbitprep.app.export import gguf as gguf_module
from kbitprep.app.export.gguf import write_gguf
from kbitprep.app.export.gguf_quant import LLAMA_CPP_INSTALL, llama_cpp_installed
from kbitprep.app.export.verify import gguf_tolerance
from llama_vocab import NAMES, MissingVocabError, rebuilt_folder, vocab_file

pytestmark = pytest.mark.llamacpp

IDS = [[1, 5, 9, 17, 33, 2, 60, 61, 7, 8, 900, 30000], [3, 4, 110, 50000, 112, 40, 41]]
# 48 positions: 6 times the llama3 case's original context of 8, where its scaling changes frequencies
LONG_IDS = [[(7 * i * i + 13 * i + 5) % 50257 for i in range(48)]]


def _configs() -> dict[str, object]:
    import transformers as t

    common = dict(vocab_size=50257,  # noqa: C408  (configs' keyword arguments)
                  hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama": t.LlamaConfig(**common),
        "llama-llama3": t.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8}),
        "llama-linear": t.LlamaConfig(**common, rope_scaling={"rope_type": "linear", "factor": 4.0}),
        "llama-yarn": t.LlamaConfig(**common, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 64}),
        "mistral": t.MistralConfig(**common),
        "qwen2": t.Qwen2Config(**common),
        "qwen3": t.Qwen3Config(**common, head_dim=16),
        "gemma": t.GemmaConfig(**common, head_dim=16),
        "gemma2": t.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=128),
        "phi3": t.Phi3Config(**{**common, "num_key_value_heads": 4}, original_max_position_embeddings=256),
    }


def _model(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[name], attn_implementation="eager").eval()
    model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
    with torch.no_grad():  # norms away from their init of 1 (0 for Gemma), so a missed shift shows
        for key, param in model.named_parameters():
            if "norm" in key:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _llama_cpp_logits(path: Path, rows: list[list[int]]) -> list[np.ndarray]:
    if not llama_cpp_installed():
        pytest.fail(f"llama-cpp-python is not installed: {LLAMA_CPP_INSTALL}")
    from llama_cpp import Llama

    llm = Llama(str(path), logits_all=True, n_ctx=64, verbose=False, n_threads=1)
    found = []
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        found.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return found


def _relative(model, path: Path, rows: list[list[int]] = IDS) -> float:
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in rows]
    got = _llama_cpp_logits(path, rows)
    return max(float(np.abs(g - e).max() / np.abs(e).max()) for g, e in zip(got, expected, strict=True))


def _rebuilt(name: str) -> Path:
    """transformers' rebuild of llama.cpp's NAME vocabulary (`make install` builds it)."""
    try:
        return rebuilt_folder(name)
    except MissingVocabError as missing:
        pytest.fail(str(missing))


@pytest.fixture(scope="module")
def tokenizer_folder() -> Path:
    """GPT-2's real vocabulary (llama.cpp's file, rebuilt by transformers), saved as merge saves it."""
    return _rebuilt("gpt-2")


@pytest.mark.parametrize("name", list(_configs()))
def test_llama_cpp_computes_the_models_logits_at_f32(name: str, tokenizer_folder: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = _model(name)
    path = tmp_path / "model.gguf"
    write_gguf(model, AutoTokenizer.from_pretrained(tokenizer_folder), tokenizer_folder, path, dtype="f32")
    relative = _relative(model, path)
    print(f"{name} f32: max relative logit error {relative:.2e}")
    assert relative < 1e-3


def test_llama3_rope_scaling_matters_past_the_original_context(tokenizer_folder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its rope_freqs tensor, the llama3 case's file is far beyond the bound at 48 positions."""
    import gguf
    from transformers import AutoTokenizer

    model = _model("llama-llama3")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    path, stripped = tmp_path / "model.gguf", tmp_path / "no-rope-freqs.gguf"
    write_gguf(model, tokenizer, tokenizer_folder, path, dtype="f32")
    written = gguf_module.extra_tensors
    monkeypatch.setattr(gguf_module, "extra_tensors",
                        lambda config: {k: v for k, v in written(config).items() if not k.startswith("rope_freqs")})
    write_gguf(model, tokenizer, tokenizer_folder, stripped, dtype="f32")
    names = {each: {t.name for t in gguf.GGUFReader(each).tensors} for each in (path, stripped)}
    assert names[path] - names[stripped] == {"rope_freqs.weight"}
    with_freqs, without = _relative(model, path, LONG_IDS), _relative(model, stripped, LONG_IDS)
    print(f"llama3 rope, 48 positions: {with_freqs:.2e} with rope_freqs, {without:.2e} without")
    assert with_freqs < 1e-3 and without > 5 * 1e-3  # measured 2.0e-4 and 1.2e-2


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q4_k_m"])
def test_quantized_files_stay_near_the_model(dtype: str, tokenizer_folder: Path, tmp_path: Path) -> None:
    """Within merge --verify's tolerance for the type (the model computes in float32)."""
    from transformers import AutoTokenizer

    model = _model("llama")
    path = tmp_path / "model.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64-wide rows: the k-quants fall back, as llama.cpp says
        write_gguf(model, AutoTokenizer.from_pretrained(tokenizer_folder), tokenizer_folder, path, dtype=dtype)
    relative = _relative(model, path)
    bound = gguf_tolerance(dtype, "float32")
    print(f"llama {dtype}: max relative logit error {relative:.2e} (tolerance {bound:g})")
    assert bound is not None and relative < bound


# The family of model each vocabulary comes with (its GGUF architecture row).
VOCAB_MODELS = {"qwen2": "Qwen2Config", "gpt-2": "LlamaConfig", "starcoder": "LlamaConfig",
                "llama-spm": "LlamaConfig", "phi-3": "Phi3Config"}
# llama.cpp's test strings that the training tokenizer (transformers' rebuild of llama.cpp's
# file) splits otherwise than llama.cpp's own reference ids (.out, from the original
# tokenizer) — and llama.cpp on kbitprep's GGUF splits as the reference, for every string:
# - llama-spm: the rebuild turns a leading space into the word's own "▁" (" Hello" ->
#   "▁Hello"); sentencepiece adds its "▁" prefix before it ("▁", "▁Hello"). Every string
#   that starts with a space, and only those. The rebuild also prefixes "▁" only at the start
#   of the whole text, llama.cpp (as Llama-2's own tokenizer) at the start of each text
#   between special tokens: the chat's expected ids are its pieces encoded one by one.
# - starcoder: the rebuild's digit split leaves "½" (a Unicode number) to the byte-level
#   merges (" Â" merged); llama.cpp's starcoder pre-tokenizer splits it off as a number.
KNOWN_TOKEN_DIFFERENCES = {"llama-spm": lambda text: text.startswith(" "),
                           "starcoder": lambda text: text == "ied 4 ½ months"}
PREFIX_PER_PIECE = {"llama-spm"}
CONVERSATION = [{"role": "system", "content": "Answer in one line."},
                {"role": "user", "content": "What is 2 + 2?\n\n  Be brief 🦙."},
                {"role": "assistant", "content": "4 — four."},
                {"role": "user", "content": "And in Khmer? ស្វាគមន៍"}]


def _vocab_model(name: str, tokenizer):
    import transformers

    config = getattr(transformers, VOCAB_MODELS[name])(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.config.architectures = [type(model).__name__]
    return model


def _test_strings(name: str) -> dict[str, list[int]]:
    """llama.cpp's test strings for the vocabulary -> llama.cpp's reference ids for each."""
    path = vocab_file(name)
    strings = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    ids = path.with_suffix(".gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(strings) == len(ids) > 30
    return {text: [int(i) for i in each.split()] for text, each in zip(strings, ids, strict=True)}


def _special_ids(tokenizer) -> set[int]:
    return {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}


def _pieces_encoded(tokenizer, text: str) -> list[int]:
    """`text` encoded a piece at a time between its special tokens, each piece as a text of its own."""
    import re

    specials = {tokenizer.convert_ids_to_tokens(i): i for i in _special_ids(tokenizer)}
    found: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text):
        if piece in specials:
            found.append(specials[piece])
        elif piece:
            found += tokenizer.encode(piece, add_special_tokens=False)
    return found


def _chat_text(tokenizer) -> str:
    """The conversation as the tokenizer's template renders it; without a template, turns between
    the vocabulary's own special tokens, so that they are parsed as one token each."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    start, end = tokenizer.bos_token or tokenizer.eos_token, tokenizer.eos_token
    return "".join(f"{start}{turn['role']}\n{turn['content']}{end}\n" for turn in CONVERSATION)


@pytest.fixture(scope="module")
def vocab_gguf(tmp_path_factory: pytest.TempPathFactory):
    """NAME -> (training tokenizer, the GGUF write_gguf wrote for a tiny model saved with it)."""
    from transformers import AutoTokenizer

    built: dict[str, tuple] = {}

    def build(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            tokenizer = AutoTokenizer.from_pretrained(_rebuilt(name))
            model = _vocab_model(name, tokenizer)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            write_gguf(model, tokenizer, folder, folder / "model.gguf", dtype="f32")
            built[name] = (tokenizer, model, folder / "model.gguf")
        return built[name]
    return build


def _llama_cpp(path: Path, **options):
    if not llama_cpp_installed():
        pytest.fail(f"llama-cpp-python is not installed: {LLAMA_CPP_INSTALL}")
    from llama_cpp import Llama

    return Llama(str(path), verbose=False, n_threads=1, **options)


@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_tokenizes_as_the_training_tokenizer(name: str, vocab_gguf) -> None:
    tokenizer, _, path = vocab_gguf(name)
    llm = _llama_cpp(path, vocab_only=True)
    strings = _test_strings(name)
    got = {text: llm.tokenize(text.encode(), add_bos=False, special=False) for text in strings}
    assert got == strings  # llama.cpp's reference ids, for every string
    differ = {text for text in strings if got[text] != tokenizer.encode(text, add_special_tokens=False)}
    known = KNOWN_TOKEN_DIFFERENCES.get(name, lambda text: False)
    print(f"{name}: {len(strings)} test strings, {len(differ)} tokenized otherwise by the training tokenizer")
    assert differ == {text for text in strings if known(text)}
    chat = _chat_text(tokenizer)
    whole = tokenizer.encode(chat, add_special_tokens=False)
    expected = _pieces_encoded(tokenizer, chat) if name in PREFIX_PER_PIECE else whole
    assert (expected != whole) == (name in PREFIX_PER_PIECE)
    assert sum(i in _special_ids(tokenizer) for i in expected) >= 4  # the specials are parsed, in both
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == expected
    # with the vocabulary's own added tokens (a sentencepiece bos)
    question = CONVERSATION[1]["content"]
    assert llm.tokenize(question.encode(), add_bos=True) == tokenizer.encode(question)


@pytest.mark.parametrize("name", ["qwen2", "llama-spm"])  # byte-level BPE, sentencepiece
def test_llama_cpp_computes_the_models_logits_on_tokenized_text(name: str, vocab_gguf) -> None:
    tokenizer, model, path = vocab_gguf(name)
    # sentencepiece: text without special tokens, where the rebuild prefixes "▁" as llama.cpp does
    text = "\n".join(turn["content"] for turn in CONVERSATION) if name in PREFIX_PER_PIECE else _chat_text(tokenizer)
    ids = tokenizer.encode(text)
    llm = _llama_cpp(path, logits_all=True, n_ctx=256)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
    assert len(ids) > 30
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    relative = float(np.abs(got - expected).max() / np.abs(expected).max())
    print(f"{name}: {len(ids)} tokens, max relative logit error {relative:.2e}")
    assert relative < 1e-3
