"""The exported model stops where the chat template ends a turn: generation config and Ollama Modelfile.

- After chat training with the shipped tiny Llama (its template ends a turn with `<|end|>`,
  id 103; its eos is `</s>`, id 2), the merged folder's GenerationConfig lists both eos
  ids, keeps what the base folder's generation_config.json said, and transformers'
  `generate` on the merged model, given nothing else, stops at `<|end|>`; told only the
  old eos, the same model runs past it.
- `merge --gguf` writes an Ollama Modelfile beside model.gguf: FROM, the template in Go's
  syntax for the families known (identified by what the Jinja template renders), the
  end of turn as stop; for any other template, FROM, the stop and a comment that Ollama
  does not run the Jinja template embedded in the GGUF.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from kbitprep.app.export.stops import (
    MODELFILE,
    OLLAMA_FAMILIES,
    default_system,
    end_of_turn_ids,
    end_of_turn_text,
    ollama_family,
    ollama_modelfile,
)

END, EOS = 103, 2  # the shipped tiny Llama's <|end|> and </s>


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo trained on its conversations, long enough to end its turns with <|end|>.

    Its base folder gets a generation_config.json of its own (a sampling default), to be kept.
    """
    from kbitprep.app.data.jsonl import read_jsonl
    from kbitprep.app.demo import DEMO_CHAT_DATA, build_tiny_model, demo_settings
    from kbitprep.app.training.run import run_pipeline

    def base_model(folder: Path) -> None:
        build_tiny_model(folder / "base-model")
        (folder / "base-model" / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": EOS, "pad_token_id": 0, "temperature": 0.7, "do_sample": True}))

    run = tmp_path_factory.mktemp("stops") / "run"
    settings = dataclasses.replace(demo_settings(run, max_steps=60), data=str(DEMO_CHAT_DATA), samples=())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_pipeline(settings, read_jsonl(DEMO_CHAT_DATA), None, setup=base_model, makes=("base-model",))
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.mark.slow
def test_the_merged_folder_stops_at_the_templates_end_of_turn(chat_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from kbitprep.app.export.merge import merge_run

    report = merge_run(chat_run, tmp_path / "merged", dtype="fp32")
    config = GenerationConfig.from_pretrained(tmp_path / "merged")
    assert config.eos_token_id == [EOS, END] and report.eos_token_ids == (EOS, END)
    assert (config.temperature, config.do_sample, config.pad_token_id) == (0.7, True, 0)  # the base's, kept

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.convert_ids_to_tokens(END) == "<|end|>" == end_of_turn_text(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "abc"}], add_generation_prompt=True,
                                         tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        stopped = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                 do_sample=False)[0, ids.shape[1]:].tolist()
        past = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                              do_sample=False, eos_token_id=EOS)[0, ids.shape[1]:].tolist()
    assert stopped[-1] == END and END not in stopped[:-1] and len(stopped) < 40, stopped
    assert len(past) > len(stopped) and past[:len(stopped)] == stopped  # the old eos alone runs past the turn


@pytest.mark.slow
def test_merge_gguf_writes_an_ollama_modelfile_beside_the_gguf(chat_run: Path, tmp_path: Path) -> None:
    from kbitprep.app.export.merge import merge_run

    report = merge_run(chat_run, tmp_path / "merged", gguf=True, gguf_pre="default")  # demo tokenizer: in no table
    modelfile = (tmp_path / "merged" / MODELFILE).read_text()
    assert report.modelfile == str(tmp_path / "merged" / MODELFILE)
    lines = modelfile.splitlines()
    assert "FROM ./model.gguf" in lines and (tmp_path / "merged" / "model.gguf").is_file()
    assert [line for line in lines if line.startswith("PARAMETER stop")] == ['PARAMETER stop "<|end|>"']
    assert 'TEMPLATE """{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n' in modelfile


# --- the families, from the templates their models publish ----------------------------------------

QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
        "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
        "{% endif %}")
SHIPPED = None  # the tiny Llama's own template, as shipped
# Alpaca-like: no family here (and a near-ChatML whose turns end differently is none either).
ALPACA = ("{% for message in messages %}{% if message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}"
          "\n\n{% else %}### Response:\n{{ message['content'] }}\n\n### End{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}### Response:\n{% endif %}")
NEAR_CHATML = QWEN2.replace("'<|im_end|>' + '\\n'", "'<|im_end|>' + '\\n\\n'")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Bye"}]


def _tokenizer(template: str | None):
    from transformers import AutoTokenizer

    from kbitprep.app.demo import DEMO_MODEL

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize(("template", "family", "stop"), [
    (QWEN2, "ChatML", "<|im_end|>"), (LLAMA3, "Llama-3", "<|eot_id|>"), (GEMMA, "Gemma", "<end_of_turn>"),
    (MISTRAL, "Mistral", "</s>"), (PHI3, "Phi-3", "<|end|>"), (SHIPPED, "Phi-3", "<|end|>"),
], ids=["qwen2-chatml", "llama-3", "gemma", "mistral", "phi-3", "shipped-tiny-llama"])
def test_a_known_template_gets_its_go_template_and_its_end_of_turn_as_stop(template, family: str,
                                                                           stop: str) -> None:
    tokenizer = _tokenizer(template)
    found = ollama_family(tokenizer)
    assert found is not None and found.name == family
    modelfile = ollama_modelfile(tokenizer, "model.gguf")
    stops = [line.removeprefix("PARAMETER stop ") for line in modelfile.splitlines()
             if line.startswith("PARAMETER stop")]
    assert stops == [json.dumps(stop)] and end_of_turn_text(tokenizer) == stop
    assert f'TEMPLATE """{found.template}"""' in modelfile and "FROM ./model.gguf" in modelfile

    # What the Go template writes, piece by piece, is what the Jinja template renders: every
    # message's turn in order, then the opened reply (bos aside; llama.cpp adds it).
    messages = CONVERSATION if found.system else CONVERSATION[1:]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rendered = rendered.removeprefix(tokenizer.bos_token)
    pieces = [found.turns.get(m["role"], found.turns.get("*")).format(**m) for m in messages]
    assert rendered == "".join(pieces) + found.generation_prompt
    for role_format in found.turns.values():  # each turn's end, and a turn of any role whole, in the Go template
        assert role_format.partition("{content}")[2] in found.template
        if "{role}" in role_format:
            assert role_format.format(role="{{ .Role }}", content="{{ .Content }}") in found.template
    assert found.template.endswith(found.generation_prompt)
    if template is QWEN2:  # its default system turn becomes the Modelfile's SYSTEM
        assert default_system(tokenizer) == "You are a helpful assistant."
        assert 'SYSTEM """You are a helpful assistant."""' in modelfile.splitlines()
    else:
        assert default_system(tokenizer) is None and "SYSTEM" not in modelfile


def test_chatml_and_llama3_go_templates_write_the_roles_and_the_turn_ends() -> None:
    chatml, llama3 = (next(f for f in OLLAMA_FAMILIES if f.name == name) for name in ("ChatML", "Llama-3"))
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in chatml.template
    assert chatml.template.endswith("{{ end }}<|im_start|>assistant\n")
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>" in llama3.template
    assert llama3.template.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("template", [ALPACA, NEAR_CHATML], ids=["alpaca", "chatml-with-other-spacing"])
def test_another_template_gets_from_and_stop_and_the_note_that_ollama_does_not_run_jinja(template: str) -> None:
    tokenizer = _tokenizer(template)
    assert ollama_family(tokenizer) is None
    modelfile = ollama_modelfile(tokenizer, "model.gguf")
    assert not [line for line in modelfile.splitlines() if line.startswith(("TEMPLATE", "SYSTEM"))]
    assert "FROM ./model.gguf" in modelfile and "tokenizer.chat_template" in modelfile
    assert "does not run Jinja" in modelfile
    stop = end_of_turn_text(tokenizer)
    assert stop and f"PARAMETER stop {json.dumps(stop)}" in modelfile


def test_no_template_is_a_completion_model_without_stops() -> None:
    tokenizer = _tokenizer(None)
    tokenizer.chat_template = None
    modelfile = ollama_modelfile(tokenizer, "model.gguf")
    assert "PARAMETER stop" not in modelfile and "no chat template" in modelfile
    assert end_of_turn_ids(tokenizer) == []


def test_an_end_of_turn_of_several_tokens_is_no_eos_id() -> None:
    tokenizer = _tokenizer(ALPACA)
    assert end_of_turn_text(tokenizer) == "### End"
    assert len(tokenizer("### End", add_special_tokens=False)["input_ids"]) > 1
    assert end_of_turn_ids(tokenizer) == []
    assert end_of_turn_ids(_tokenizer(None)) == [END]


def test_the_end_of_turn_of_a_template_that_takes_one_exchange_only() -> None:
    """Phi-3 adds </s> at the end of a conversation; a template refusing a second user turn keeps it."""
    assert end_of_turn_text(_tokenizer(PHI3)) == "<|end|>"
    one_exchange = "{% if messages|length > 2 %}{{ raise_exception('one exchange only') }}{% endif %}" + PHI3
    assert end_of_turn_text(_tokenizer(one_exchange)) == "<|end|>\n</s>"
