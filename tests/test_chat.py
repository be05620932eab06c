"""Chat rows: rendered with the chat template, trained on the assistant turns and their end-of-turn tokens.

Two templates of different shape are checked token by token: ChatML (headers and an
end-of-turn token per message, a generation prompt) and Llama-2 (the system prompt folded
into the first user turn, `</s>` closing each answer, no generation prompt).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from kbitprep.app.data.chat import (
    ChatTemplateError,
    check_chat_template,
    read_chat_template,
    tokenize_conversation,
)
from kbitprep.app.data.rows import IGNORE_INDEX, DataError, Row
from kbitprep.app.data.jsonl import read_jsonl
from kbitprep.app.data.tokenize import tokenize_rows

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-2's published template, shortened only in its error message.
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('roles must alternate') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                {"role": "assistant", "content": "Bye."}]


def char_tokenizer(template: str | None):
    """A fast, one-token-per-character tokenizer with ChatML's and Llama's special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,:;!?'\"-[]/<>|_\n"
    vocab = {token: i for i, token in enumerate(SPECIAL + list(chars))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = template
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive trained positions, as lists of token ids."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


def test_chatml_trains_each_assistant_answer_and_its_end_token_only() -> None:
    tokenizer = char_tokenizer(CHATML)
    input_ids, labels = tokenize_conversation(CONVERSATION, tokenizer, "chat.jsonl:1")
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert input_ids == ids(tokenizer, rendered)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trained(input_ids, labels) == [ids(tokenizer, "Hello.") + [end], ids(tokenizer, "Bye.") + [end]]
    # Everything else is masked: the system and user turns, every header, the newline after <|im_end|>.
    assert sum(label != IGNORE_INDEX for label in labels) == len("Hello.") + len("Bye.") + 2


def test_llama2_trains_each_answer_and_its_closing_eos_not_the_system_prompt_or_inst() -> None:
    tokenizer = char_tokenizer(LLAMA2)
    input_ids, labels = tokenize_conversation(CONVERSATION, tokenizer, "chat.jsonl:1")
    assert input_ids[0] == tokenizer.bos_token_id and input_ids.count(tokenizer.bos_token_id) == 2
    eos = tokenizer.eos_token_id
    assert trained(input_ids, labels) == [ids(tokenizer, " Hello. ") + [eos], ids(tokenizer, " Bye. ") + [eos]]
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert "<<SYS>>\nBe brief." in rendered and input_ids == ids(tokenizer, rendered)  # there, and masked


def test_a_tokenizer_without_offsets_trains_the_same_tokens() -> None:
    class Slow:
        """The fast tokenizer's rendering and tokens, without offsets (as a slow tokenizer has)."""

        is_fast = False

        def __init__(self, inner) -> None:
            self.inner = inner

        def apply_chat_template(self, *args, **kwargs):
            return self.inner.apply_chat_template(*args, **kwargs)

        def __call__(self, text: str, add_special_tokens: bool = False):
            return self.inner(text, add_special_tokens=add_special_tokens)

    for template in (CHATML, LLAMA2):
        fast = char_tokenizer(template)
        assert tokenize_conversation(CONVERSATION, Slow(fast), "x") == tokenize_conversation(CONVERSATION, fast, "x")


def test_chat_rows_go_through_tokenize_rows_and_are_cut_at_seq_len() -> None:
    tokenizer = char_tokenizer(CHATML)
    rows = [Row(1, messages=tuple(CONVERSATION)), Row(2, messages=tuple(CONVERSATION[:3]))]
    whole = tokenize_rows(rows, tokenizer, seq_len=512)
    assert [len(e["input_ids"]) for e in whole.examples] == [
        len(ids(tokenizer, tokenizer.apply_chat_template(list(r.messages), tokenize=False))) for r in rows]
    cut = tokenize_rows(rows, tokenizer, seq_len=45)  # the first answer starts at position 41
    assert cut.truncated == 2 and cut.dropped == ()
    assert [trained(e["input_ids"], e["labels"]) for e in cut.examples] == [[ids(tokenizer, "Hell")]] * 2


def test_no_assistant_token_within_seq_len_is_an_error() -> None:
    tokenizer = char_tokenizer(CHATML)
    with pytest.raises(DataError, match="no row has an assistant token within --seq-len 20"):
        tokenize_rows([Row(7, messages=tuple(CONVERSATION))], tokenizer, seq_len=20, source="chat.jsonl")


def test_missing_template_names_the_chat_template_option(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match=r"no chat template.*--chat-template FILE \(a Jinja template"):
        check_chat_template(char_tokenizer(None), "models/base")
    (tmp_path / "chatml.jinja").write_text(CHATML)
    tokenizer = char_tokenizer(None)
    tokenizer.chat_template = read_chat_template(tmp_path / "chatml.jinja")
    check_chat_template(tokenizer, "models/base")
    with pytest.raises(ChatTemplateError, match="no such --chat-template file"):
        read_chat_template(tmp_path / "absent.jinja")
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ChatTemplateError, match="is empty"):
        read_chat_template(tmp_path / "empty.jinja")


def test_broken_and_non_incremental_templates_are_refused() -> None:
    with pytest.raises(ChatTemplateError, match="fails on a plain conversation"):
        check_chat_template(char_tokenizer("{% for m in messages %}{{ m.nope() }}{% endfor %}"), "models/base")
    counting = "{{ messages|length }}" + CHATML  # the first character depends on the whole conversation
    with pytest.raises(ChatTemplateError, match="chat.jsonl:3: the chat template does not render this conversation "
                                                "incrementally"):
        tokenize_conversation(CONVERSATION, char_tokenizer(counting), "chat.jsonl:3")
    with pytest.raises(DataError, match="chat.jsonl:4: the chat template cannot render this conversation.*alternate"):
        tokenize_conversation([CONVERSATION[1], CONVERSATION[1]], char_tokenizer(LLAMA2), "chat.jsonl:4")


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(("rows", "fragment"), [
    ([{"text": "a"}, {"messages": CONVERSATION}],
     'rows.jsonl:2: a "messages" row, but line 1 is a "text" row; one file holds either'),
    ([{"messages": CONVERSATION}, {"prompt": "p", "completion": "c"}],
     'rows.jsonl:2: a "prompt" row, but line 1 is a "messages" row'),
    ([{"messages": []}], 'rows.jsonl:1: "messages" must be a non-empty list'),
    ([{"messages": "hi"}], 'rows.jsonl:1: "messages" must be a non-empty list'),
    ([{"messages": [{"role": "user"}]}], 'rows.jsonl:1: messages[0] "content" must be a string (missing)'),
    ([{"messages": [{"role": "user", "content": 3}]}], 'messages[0] "content" must be a string (a int)'),
    ([{"messages": ["hi"]}], "rows.jsonl:1: messages[0] must be an object"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], 'rows.jsonl:1: no "assistant" turn with content'),
], ids=["text-then-messages", "messages-then-prompt", "empty-list", "not-a-list", "missing-content",
        "content-not-string", "turn-not-object", "no-assistant-turn"])
def test_bad_chat_rows_name_the_line(tmp_path: Path, rows: list, fragment: str) -> None:
    with pytest.raises(DataError) as caught:
        read_jsonl(write(tmp_path / "rows.jsonl", rows))
    assert fragment in str(caught.value)


def test_shipped_chat_example_trains_every_answer_with_the_end_of_turn_token() -> None:
    from kbitprep.app.demo import DEMO_CHAT_DATA, DEMO_MODEL
    from kbitprep.app.model.loading import load_tokenizer

    tokenizer = load_tokenizer(DEMO_MODEL)
    check_chat_template(tokenizer, str(DEMO_MODEL))
    rows = read_jsonl(DEMO_CHAT_DATA)
    data = tokenize_rows(rows, tokenizer, seq_len=64)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert len(data) == len(rows) >= 40 and data.truncated == 0
    for row, example in zip(rows, data.examples):
        answers = [turn["content"] for turn in row.messages if turn["role"] == "assistant"]
        assert trained(example["input_ids"], example["labels"]) == [ids(tokenizer, a) + [end] for a in answers]
