"""Where an exported model stops: the chat template's end of turn, for transformers and Ollama.

    chat template ──render a turn──> end-of-turn text (`<|im_end|>`, `<|eot_id|>`, `<|end|>`)
        ──> its token id, when it is one token ──> generation_config.json eos_token_id list
        ──> the template's family, identified by rendering ──> Ollama Modelfile
            (FROM, TEMPLATE in Go's template syntax, PARAMETER stop)

A model trained on chat turns learns to end them with the template's end-of-turn token;
when that token is not the model's eos, generation runs past the turn unless the
generation config lists it as an eos id as well (transformers, vLLM and TGI read that list).

Ollama never runs the Jinja template a GGUF carries in `tokenizer.chat_template`: on
`ollama create` it compares that text with the Go templates it ships and takes the
closest one only if it is fewer than 100 edits away (ollama/ollama, `template.Named` and
`detectChatTemplate` in server/model.go); otherwise the prompt is sent bare
(`{{ .Prompt }}`), roles and turn markers dropped. So a Modelfile with the template
written in Go's syntax is what makes an Ollama model chat as it was trained. The families
here are identified by what their Jinja template renders for a probe conversation, not by
the model's name: a template whose rendering differs in any character from the family's
gets a Modelfile without a TEMPLATE and a comment saying so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MODELFILE", "OLLAMA_FAMILIES", "OllamaFamily", "default_system", "end_of_turn_ids", "end_of_turn_text",
           "generation_eos_ids", "ollama_family", "ollama_modelfile", "stopping_generation_config"]

MODELFILE = "Modelfile"  # Ollama's file name (`ollama create NAME -f Modelfile`)


def end_of_turn_text(tokenizer: Any) -> str | None:
    """The text the chat template writes to end an assistant's turn, stripped; None without a template.

    Found by rendering, so any template works: what follows an assistant's message both when
    the conversation ends there and when another user turn follows, cut to whole tokens
    (Phi-3's `<|end|>`, not the `</s>` it adds at the end of a conversation); "" if the
    template writes nothing there.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00kbitprep\x00"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    last = tokenizer.apply_chat_template(turns, tokenize=False)
    # A template that refuses a user turn after the reply: the ending of the last turn alone.
    followed = _rendering(tokenizer, [*turns, {"role": "user", "content": "more"}], opened=False) or last
    if marker not in last or marker not in followed:
        return ""
    last, followed = last.split(marker, 1)[1], followed.split(marker, 1)[1]
    agreed = next((n for n, (a, b) in enumerate(zip(last, followed, strict=False)) if a != b),
                  min(len(last), len(followed)))
    ids = tokenizer(last, add_special_tokens=False)["input_ids"]
    for count in range(len(ids), 0, -1):  # the most whole tokens of the ending the two renderings share
        text = str(tokenizer.decode(ids[:count]))
        if last[:agreed].startswith(text):
            return text.strip()
    return ""


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The end-of-turn token id, in a list, when the template's end-of-turn text is one token; else [].

    Text of several tokens (a template ending turns with plain words) cannot be an eos id;
    generation stops there only by stop strings.
    """
    text = end_of_turn_text(tokenizer)
    if not text:
        return []
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(ids[0])] if len(ids) == 1 else []


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def generation_eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The eos ids generation stops at: the model's generation config's, then the tokenizer's eos, each once."""
    config = getattr(model, "generation_config", None)
    return _once(*_id_list(getattr(config, "eos_token_id", None)), *_id_list(tokenizer.eos_token_id))


def _once(*tokens: int) -> list[int]:
    return list(dict.fromkeys(tokens))


def stopping_generation_config(model: Any, tokenizer: Any, base: str | Path) -> Any:
    """The generation config a merged folder is saved with: the base's, its eos ids plus the end of turn.

    The base folder's generation_config.json is kept as it is (sampling defaults, bos, ...)
    where it has one; otherwise the model config's. eos_token_id becomes the list of the
    base's eos ids, the tokenizer's eos and the template's end-of-turn id, each once. A pad
    id left unset becomes the tokenizer's pad, else the first eos id (what generate pads with).

    Returns:
        transformers.GenerationConfig: set it as `model.generation_config` before saving.
    """
    from transformers import GenerationConfig

    base = Path(base)
    if (base / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(base, local_files_only=True)
    else:
        config = GenerationConfig.from_model_config(model.config)
    eos = _once(*_id_list(config.eos_token_id), *_id_list(tokenizer.eos_token_id), *end_of_turn_ids(tokenizer))
    if eos:
        config.eos_token_id = eos if len(eos) > 1 else eos[0]
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), None)
    return config


# --- Ollama ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OllamaFamily:
    """A chat template family written as an Ollama TEMPLATE.

    Args:
        name (str): the family, for the Modelfile's comment.
        marker (str): text only this family's rendering holds (checked first, cheaply).
        turns (Mapping[str, str]): role -> how one message renders (`{role}`, `{content}`);
            the key "*" serves every role not listed.
        generation_prompt (str): what opens the assistant's reply.
        template (str): the same, in Go's template syntax as Ollama reads it (`.Messages`,
            `.Role`, `.Content`; a Modelfile SYSTEM comes in as the first message).
        system (bool): the family renders a system message (Gemma and Mistral refuse one).
    """

    name: str
    marker: str
    turns: Mapping[str, str]
    generation_prompt: str
    template: str
    system: bool = True

    def render(self, messages: list[dict[str, str]]) -> str:
        """The text this family's template gives `messages`, with the assistant's reply opened."""
        text = "".join(self.turns.get(m["role"], self.turns.get("*", "")).format(role=m["role"], content=m["content"])
                       for m in messages)
        return text + self.generation_prompt


OLLAMA_FAMILIES = (
    OllamaFamily(
        "ChatML", "<|im_start|>", {"*": "<|im_start|>{role}\n{content}<|im_end|>\n"}, "<|im_start|>assistant\n",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"),
    OllamaFamily(
        "Llama-3", "<|start_header_id|>", {"*": "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"},
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    OllamaFamily(
        "Gemma", "<start_of_turn>", {"assistant": "<start_of_turn>model\n{content}<end_of_turn>\n",
                                      "*": "<start_of_turn>user\n{content}<end_of_turn>\n"},
        "<start_of_turn>model\n",
        '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n", system=False),
    OllamaFamily(
        "Mistral", "[INST]", {"user": "[INST] {content} [/INST]", "assistant": "{content}</s>"}, "",
        '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}', system=False),
    # Phi-3's, and the shipped tiny Llama's own (the same layout).
    OllamaFamily(
        "Phi-3", "<|end|>", {"*": "<|{role}|>\n{content}<|end|>\n"}, "<|assistant|>\n",
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"),
)

_PROBE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
          {"role": "user", "content": "And 3+3?"}]
_SYSTEM = {"role": "system", "content": "Answer briefly."}


def _rendering(tokenizer: Any, messages: list[dict[str, str]], *, opened: bool = True) -> str | None:
    """The Jinja rendering of `messages`, the reply opened (`opened`) and a leading bos removed; None if refused."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=opened, tokenize=False)
    except Exception:  # noqa: BLE001 - a template may raise anything (raise_exception) for a conversation it refuses
        return None
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text


def ollama_family(tokenizer: Any) -> OllamaFamily | None:
    """The family whose Go template renders exactly what the tokenizer's chat template renders; None if none.

    Compared on a probe conversation, with a system message for the families that take one
    (bos aside: llama.cpp adds it from the GGUF's `add_bos_token`). A template that writes a
    system turn of its own when the conversation has none (Qwen2's "You are a helpful
    assistant.") still matches: `default_system` gives that text.
    """
    found = _match(tokenizer)
    return found[0] if found else None


def default_system(tokenizer: Any) -> str | None:
    """The system message the chat template writes when a conversation has none; None if it writes none."""
    found = _match(tokenizer)
    return found[1] if found else None


def _match(tokenizer: Any) -> tuple[OllamaFamily, str | None] | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    plain = _rendering(tokenizer, _PROBE)
    for family in OLLAMA_FAMILIES:
        if plain is None or family.marker not in plain:
            continue
        if family.system and _rendering(tokenizer, [_SYSTEM, *_PROBE]) != family.render([_SYSTEM, *_PROBE]):
            continue
        if plain == family.render(_PROBE):
            return family, None
        system = _system_turn(family, plain[:-len(family.render(_PROBE))]) \
            if family.system and plain.endswith(family.render(_PROBE)) else None
        if system is not None:
            return family, system
    return None


def _system_turn(family: OllamaFamily, text: str) -> str | None:
    """The content of `text` if it is exactly one system turn of `family`, else None."""
    marker = "\x00kbitprep\x00"
    before, _, after = family.render([{"role": "system", "content": marker}]) \
        .removesuffix(family.generation_prompt).partition(marker)
    if len(text) > len(before) + len(after) and text.startswith(before) and text.endswith(after):
        return text[len(before):len(text) - len(after)]
    return None


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ollama_modelfile(tokenizer: Any, gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` beside it: FROM, TEMPLATE where the family is known, stops.

    The stop parameter is the template's end-of-turn text (llama.cpp stops at the GGUF's
    eos/eot ids by itself; a stop string also catches an end of turn of several tokens).
    """
    lines = ["# Written by `kbitprep merge --gguf`: `ollama create NAME -f Modelfile`, then `ollama run NAME`.",
             f"FROM ./{gguf_name}"]
    stop = end_of_turn_text(tokenizer)
    family = ollama_family(tokenizer)
    if stop is None:
        lines.insert(1, "# The tokenizer has no chat template: a completion model, prompted with plain text.")
    elif family is None:
        lines[1:1] = [
            "# The chat template is none Ollama's TEMPLATE is written for here. It is embedded in the GGUF",
            "# (tokenizer.chat_template), but Ollama does not run Jinja templates: it uses one of its own only",
            "# when the embedded text is within 100 edits of it, else it sends prompts bare. Write the template",
            "# as a TEMPLATE \"\"\"...\"\"\" line in Go's syntax (.Messages, .Role, .Content) to chat as trained."]
    else:
        lines += [f"# The {family.name} chat template the model was trained with, in Ollama's Go syntax.",
                  f'TEMPLATE """{family.template}"""']
        system = default_system(tokenizer)
        if system:  # what the template writes when a conversation has no system message
            lines.append(f'SYSTEM """{system}"""')
    if stop:
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    return "\n".join(lines) + "\n"
