"""The tokenizer of a GGUF file: the same tokens in llama.cpp as in training.

    tokenizer.json ──> BPE, byte-level (Llama-3, Qwen2, GPT-2) ──> llama.cpp "gpt2" model:
                           tokens, types, merges, and the pre-tokenizer named by its behaviour
                   └─> BPE with byte fallback (sentencepiece: Llama-2, Mistral, Phi-3, TinyLlama)
                           ──> llama.cpp "llama" model: tokens, scores, types (BYTE for <0xNN>)
    then special ids and add_bos/add_eos (gguf's SpecialVocab), the chat template, and the
    template's end-of-turn token as eot_token_id.

The pre-tokenizer: llama.cpp splits text before BPE with one of its own built-in regex sets,
chosen by `tokenizer.ggml.pre`. Its converter (convert_hf_to_gguf.py, `get_vocab_base_pre`, in
llama.cpp's conversion/base.py) names it by behaviour: the sha256 of `str(tokenizer.encode(
CHECK_TEXT))`, looked up in a table of known tokenizers. The same text and hashes are below;
a tokenizer whose hash is not there would be split another way by llama.cpp, so it is refused
unless the caller names the pre-tokenizer (`pre=`, `merge --gguf-pre`) and takes that on.

Scores of a byte-fallback BPE written as llama.cpp's sentencepiece ("llama") model: llama.cpp
merges the adjacent pair whose merged token has the highest score, BPE the pair of lowest
rank, so a token's score is minus the rank of the first merge that makes it. (llama.cpp's
converter, without a tokenizer.model, writes -1000 for every token, which loses the order.)
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .gguf_arch import GgufError
from .stops import end_of_turn_ids

__all__ = ["CHECK_TEXT", "PRE_TOKENIZERS", "GgufError", "check_vocab", "pre_tokenizer_hash", "pre_tokenizer_name",
           "write_vocab"]


# llama.cpp's check text (conversion/base.py, get_vocab_base_pre): whitespace runs, emoji,
# digit runs, Khmer, CJK, Cyrillic, punctuation runs and English contractions.
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
              "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
              "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")

# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp's pre-tokenizer name, as llama.cpp's
# table (llama-cpp-python 0.3.36's vendored llama.cpp) lists them, for the tokenizers of
# decoder models; the reference model of each row is in that table.
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",      # Meta-Llama-3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",      # Smaug-Llama-3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",          # Qwen1.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",          # Qwen3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",          # GPT-2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",          # ruGPT3XL
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",         # falcon-7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",        # Falcon3
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",   # deepseek-llm-7b
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",      # starcoder2
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",            # mpt-7b (also OLMo)
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",         # Mistral-Nemo
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def pre_tokenizer_hash(tokenizer: Any) -> str:
    """The sha256 llama.cpp's converter names a BPE pre-tokenizer by (of `str(tokenizer.encode(CHECK_TEXT))`)."""
    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer_name(tokenizer: Any, pre: str | None = None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, from its behaviour; `pre` when the caller names one.

    Raises:
        GgufError: the hash is in no row of PRE_TOKENIZERS and no `pre` was given; the message names the
            hash and the two ways on.
    """
    if pre:
        return pre
    digest = pre_tokenizer_hash(tokenizer)
    if digest not in PRE_TOKENIZERS:
        raise GgufError(f"--gguf: llama.cpp knows no pre-tokenizer that splits text as this tokenizer does (check "
                        f"hash {digest}), so it would tokenize differently from training; known: "
                        f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}. If you know llama.cpp's name for it, "
                        "pass --gguf-pre NAME (you vouch that it splits the same); else merge without --gguf")
    return PRE_TOKENIZERS[digest]


def check_vocab(tokenizer: Any, *, pre: str | None = None) -> None:
    """Refuse, before anything is loaded, a tokenizer `write_vocab` would refuse.

    Raises:
        GgufError: as `write_vocab`.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"] if tokenizer.is_fast else {}
    _check_model(model, "the run's tokenizer")
    if not model.get("byte_fallback"):
        pre_tokenizer_name(tokenizer, pre)


def _check_model(model: dict[str, Any], where: object) -> None:
    if model.get("type") != "BPE":
        raise GgufError(f"{where}: --gguf writes tokenizers saved as a BPE tokenizer.json (byte-level as Llama-3's "
                        "and Qwen2's, or with byte fallback as Llama-2's and Mistral's); this one is "
                        f"{model.get('type') or 'not a tokenizer.json'}. Merge without --gguf and convert with "
                        "llama.cpp's convert_hf_to_gguf.py")


def write_vocab(writer: Any, tokenizer: Any, folder: Path, vocab_size: int, *, pre: str | None = None) -> None:
    """Tokens, types, merges or scores, special ids, add_bos/add_eos, chat template and eot id into `writer`.

    Args:
        writer (Any): the gguf.GGUFWriter of the file.
        tokenizer (Any): the transformers tokenizer the run trained with (carrying its chat template).
        folder (Path): where that tokenizer is saved (tokenizer.json).
        vocab_size (int): rows of the embedding; rows no token uses are written as UNUSED "[PADn]".
        pre (str | None): llama.cpp's pre-tokenizer name, instead of the one found by behaviour. Default: None

    Raises:
        GgufError: no tokenizer.json, a model type llama.cpp's converters do not take from it, or an
            unknown pre-tokenizer.
    """
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) \
        if (folder / "tokenizer.json").is_file() else {}
    model = data.get("model", {})
    _check_model(model, folder)
    if model.get("byte_fallback"):
        _sentencepiece(writer, tokenizer, model, vocab_size)
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
        special.add_special_token = _adds_specials(tokenizer)
    else:
        _byte_level(writer, tokenizer, vocab_size, pre)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.chat_template = tokenizer.chat_template  # the one the run trained with (merge saved it)
    special.add_to_gguf(writer, quiet=True)
    eot = end_of_turn_ids(tokenizer) if tokenizer.chat_template else []
    if eot:
        writer.add_eot_token_id(eot[0])


def _adds_specials(tokenizer: Any) -> dict[str, bool]:
    """Whether encoding puts BOS first and EOS last, as the tokenizer does it (transformers may not save the flags)."""
    ids = tokenizer("a")["input_ids"]
    return {"bos": tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id}


def _added(tokenizer: Any) -> dict[int, Any]:
    return {int(index): token for index, token in tokenizer.added_tokens_decoder.items()}


def _by_id(tokenizer: Any) -> dict[int, str]:
    return {index: token for token, index in tokenizer.get_vocab().items()}


def _byte_level(writer: Any, tokenizer: Any, vocab_size: int, pre: str | None) -> None:
    """llama.cpp's "gpt2" model: tokens and types (merges come with SpecialVocab)."""
    import gguf

    by_id, added = _by_id(tokenizer), _added(tokenizer)
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # rows of the embedding no token uses (a vocabulary padded to a round size)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if index not in added else
                         gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _merge_ranks(model: dict[str, Any]) -> dict[str, int]:
    """Each token a merge makes -> the rank of the first merge that makes it."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    return ranks


def _sentencepiece(writer: Any, tokenizer: Any, model: dict[str, Any], vocab_size: int) -> None:
    """llama.cpp's "llama" (sentencepiece) model: tokens, scores (minus the merge rank) and types."""
    import gguf

    by_id, added, ranks = _by_id(tokenizer), _added(tokenizer), _merge_ranks(model)
    unk = tokenizer.unk_token_id
    tokens, scores, types = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        score = 0.0
        if token is None:
            token, score, kind = f"[PAD{index}]", -1000.0, gguf.TokenType.UNUSED
        elif index == unk:
            kind = gguf.TokenType.UNKNOWN
        elif index in added:
            kind = gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
            if not added[index].special:  # llama.cpp matches user-defined tokens after its own ▁ -> space
                token = token.replace("\u2581", " ")
        elif _BYTE_TOKEN.fullmatch(token):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
            # a single character no merge makes sorts after every merged token
            score = -float(ranks[token] + 1) if token in ranks else -float(len(ranks) + index)
        tokens.append(token)
        scores.append(score)
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")  # llama.cpp's sentencepiece model has no pre-tokenizer to choose
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
