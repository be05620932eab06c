"""`kbitprep generate`: talk to what a run trained, from its run folder or a merged folder.

    run folder ──> base loaded and prepared exactly as the run did (its --quantize,
                   --compute-dtype, --upcast) + the adapter (peft) ──┐
    merged folder (kbitprep-merge.json) ──> from_pretrained ─────────┴─> generate, streamed

A prompt is completed after the tokenizer's BOS, as the run's own samples are. `--chat`
renders the conversation with the tokenizer's chat template (the run's `--chat-template`
when it had one) and stops at the template's end-of-turn text (`<|im_end|>`, `<|end|>`,
`</s>`), found by rendering a turn, so any template works; that text is a stop string
to transformers, whether it is one token or several. Tokens are written as they come by
transformers' own `TextStreamer`.

Greedy decoding by default (`do_sample=False`), so a completion equals `model.generate`'s
from the same weights; a temperature above 0 samples, seeded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ...errors import KbitPrepError
from .merge import MERGE_RECORD, MergeError, read_finished_run, run_tokenizer
from .run_model import load_run_model
from .stops import end_of_turn_text, generation_eos_ids

__all__ = ["CHAT_EXIT", "GenerateError", "Generator", "chat", "end_of_turn", "load_generator"]

CHAT_EXIT = "/exit"  # a chat line that ends the conversation (as end of input does)


class GenerateError(KbitPrepError, ValueError):
    """A folder cannot be generated from as asked; the message names the problem and the fix."""


@dataclasses.dataclass
class Generator:
    """A model ready to generate, with its tokenizer and where it came from.

    Args:
        model (Any): a transformers (or peft) causal LM, in evaluation mode.
        tokenizer (Any): its tokenizer (carrying the chat template the run trained with).
        source (str): "run" (base + adapter) or "merged".
    """

    model: Any
    tokenizer: Any
    source: str

    def complete(self, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                 stream: Callable[[str], None] | None = None) -> str:
        """The completion of `prompt` after the tokenizer's BOS (as the run's samples are made).

        Args:
            prompt (str): the text to complete.
            max_new_tokens (int): at most this many new tokens. Default: 128
            temperature (float): 0 decodes greedily; above 0 samples at that temperature. Default: 0.0
            seed (int): the seed for sampling. Default: 0
            stream (Callable[[str], None] | None): receives the text as it is decoded. Default: None

        Returns:
            str: the completion, without the prompt and special tokens.
        """
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids = bos + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self._generate(ids, max_new_tokens, temperature, seed, stream, stop=None)

    def reply(self, messages: list[dict[str, str]], *, max_new_tokens: int = 128, temperature: float = 0.0,
              seed: int = 0, stream: Callable[[str], None] | None = None) -> str:
        """The assistant's next turn after `messages`, cut at the template's end-of-turn text.

        Raises:
            GenerateError: the tokenizer has no chat template.
        """
        stop = end_of_turn(self.tokenizer)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        reply = self._generate(ids, max_new_tokens, temperature, seed, stream, stop=stop)
        return reply.split(stop, 1)[0] if stop else reply

    def _generate(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int,
                  stream: Callable[[str], None] | None, stop: str | None) -> str:
        import torch
        from transformers import set_seed

        from ..training.sampling import pad_token_id

        if temperature < 0:
            raise GenerateError(f"--temperature must be 0 (greedy) or more, not {temperature}")
        device = next(p.device for p in self.model.parameters())
        input_ids = torch.tensor([ids], device=device)
        options: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            set_seed(seed)
            options = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        # The tokenizer's eos and the generation config's (a merged folder's lists the end-of-turn token too).
        eos = generation_eos_ids(self.model, self.tokenizer)
        if stop:
            options.update(stop_strings=[stop], tokenizer=self.tokenizer)
        streamer = _streamer(self.tokenizer, stream, stop) if stream is not None else None
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(self.tokenizer),
                                      eos_token_id=eos or None, use_cache=True, streamer=streamer, **options)
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def _streamer(tokenizer: Any, write: Callable[[str], None], stop: str | None) -> Any:
    """transformers' `TextStreamer`, writing to `write` and never the end-of-turn text `stop`.

    Text that may be the start of `stop` is held back until the next piece settles it,
    since the stop text can arrive over several tokens.
    """
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        pending, stopped = "", False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if self.stopped:
                return
            self.pending += text
            if stop and stop in self.pending:
                write(self.pending.split(stop, 1)[0])
                self.pending, self.stopped = "", True
                return
            held = next((n for n in range(len(stop or ""), 0, -1) if stop and self.pending.endswith(stop[:n])), 0)
            if stream_end:
                held = 0
            ready, self.pending = self.pending[:len(self.pending) - held], self.pending[len(self.pending) - held:]
            if ready:
                write(ready)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def end_of_turn(tokenizer: Any) -> str:
    """The text a chat template writes after an assistant's turn, stripped (`<|im_end|>`, `</s>`); "" if none.

    Raises:
        GenerateError: the tokenizer has no chat template.
    """
    text = end_of_turn_text(tokenizer)
    if text is None:
        raise GenerateError("the tokenizer has no chat template, so --chat cannot render a conversation; use "
                            "--prompt TEXT, or train with --chat-template FILE (the run then carries it)")
    return text


def load_generator(folder: str | os.PathLike[str]) -> Generator:
    """The model of a finished run (base + adapter, loaded as the run loaded it) or of a merged folder.

    Raises:
        GenerateError: the folder is neither, or the run is unfinished; the message names the fix.
    """
    path = Path(folder)
    if (path / MERGE_RECORD).is_file():
        return _merged(path)
    try:
        run = read_finished_run(path, command="generate")
    except MergeError as error:
        raise GenerateError(f"{error} (or a folder written by `kbitprep merge`)") from None
    model = load_run_model(run.settings, run.adapter)
    return Generator(model, run_tokenizer(run), "run")


def _merged(path: Path) -> Generator:
    from transformers import AutoModelForCausalLM

    from ..model.loading import ModelFolderError, load_tokenizer

    try:
        json.loads((path / MERGE_RECORD).read_text(encoding="utf-8"))
        model = AutoModelForCausalLM.from_pretrained(os.fspath(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise GenerateError(f"{path}: a merged folder that cannot be loaded ({error}); merge the run again") from None
    try:
        tokenizer = load_tokenizer(path)
    except ModelFolderError as error:
        raise GenerateError(str(error)) from None
    return Generator(model.eval(), tokenizer, "merged")


def chat(generator: Generator, lines: Iterable[str], write: Callable[[str], None], *, max_new_tokens: int = 128,
         temperature: float = 0.0, seed: int = 0) -> list[dict[str, str]]:
    """An interactive conversation: each line is a user turn, each reply is streamed to `write`.

    The history is kept and rendered whole each turn. Ends at the end of `lines` or at `/exit`.

    Returns:
        list[dict[str, str]]: the conversation.

    Raises:
        GenerateError: the tokenizer has no chat template (before the first line is read).
    """
    end_of_turn(generator.tokenizer)  # no template: say so before waiting for input
    messages: list[dict[str, str]] = []
    for line in _turns(lines):
        messages.append({"role": "user", "content": line})
        reply = generator.reply(messages, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                stream=write)
        write("\n")
        messages.append({"role": "assistant", "content": reply})
    return messages


def _turns(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        text = line.rstrip("\n")
        if text.strip() == CHAT_EXIT:
            return
        if text.strip():
            yield text
