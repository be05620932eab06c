"""Template checks: do the rows, as the run tokenizes them, teach the model to stop, and does the template fit them?

The commonest QLoRA failure is no crash but a model that never stops generating, or that
learned a format it will not see again. Each check below is a named function with a
stable code (`kbitprep.diagnostics`); `preview` shows them, `finetune` runs them before
the model loads and refuses only what would certainly train the wrong thing::

    code                         severity  what
    template-drops-assistant     error     the chat template renders no assistant turn, or not its content
    generation-prompt-in-rows    warning   the template writes its generation prompt after the last answer
    no-stop-token                warning   the rows end their answers with no token generation could stop at
    stop-token-never-trained     error     no row trains its end-of-turn / eos token (all cut by --seq-len)
    stop-token-not-trained       warning   some rows do not
    pad-masks-stop-token         error     the collator turns the stop token's label into -100 (pad = eos)
    doubled-bos                  warning   rows start with the beginning-of-sequence token twice
    generation-stop-missing      warning   the generation config does not stop at the token the answers end with

The stop token of a `messages` row is the template's end of turn: the special token(s) the
template writes right after an assistant turn's content (ChatML's `<|im_end|>`, Llama-3's
`<|eot_id|>`, Llama-2's `</s>`), found by rendering a probe conversation; of a
prompt/completion row, the eos token kbitprep appends. `text` rows are plain text and
need not stop.

Where a check finds nothing wrong but a fact is worth knowing (pad = eos with kbitprep's
collator, which masks padding by position and so never hides the eos), it adds a `Note`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ...diagnostics import Diagnostic, error_code, warning_code
from .chat import assistant_spans
from .rows import IGNORE_INDEX, DataError, Row
from .tokenize import TokenizedData

__all__ = [
    "DOUBLED_BOS",
    "GENERATION_PROMPT_IN_ROWS",
    "GENERATION_STOP_MISSING",
    "NO_FINDINGS",
    "NO_STOP_TOKEN",
    "PAD_MASKS_STOP_TOKEN",
    "STOP_TOKEN_NEVER_TRAINED",
    "STOP_TOKEN_NOT_TRAINED",
    "TEMPLATE_DROPS_ASSISTANT",
    "EndOfTurn",
    "Note",
    "TemplateCheckError",
    "TemplateChecks",
    "check_rows",
    "probe_template",
]

TEMPLATE_DROPS_ASSISTANT = error_code("template-drops-assistant",
                                      "the chat template renders no assistant turn (or not its content) for the rows")
GENERATION_PROMPT_IN_ROWS = warning_code("generation-prompt-in-rows",
                                         "the chat template writes its generation prompt after the rows' last "
                                         "assistant turn, unasked")
NO_STOP_TOKEN = warning_code("no-stop-token", "the rows end their answers with no token generation could stop at")
STOP_TOKEN_NEVER_TRAINED = error_code("stop-token-never-trained",
                                      "no chat or prompt-completion row trains its end-of-turn or eos token")
STOP_TOKEN_NOT_TRAINED = warning_code("stop-token-not-trained",
                                      "some chat or prompt-completion rows end without a trained end-of-turn or eos")
PAD_MASKS_STOP_TOKEN = error_code("pad-masks-stop-token",
                                  "the collator masks the padding id, which is also the token the rows stop with")
DOUBLED_BOS = warning_code("doubled-bos", "rows start with the beginning-of-sequence token twice")
GENERATION_STOP_MISSING = warning_code("generation-stop-missing",
                                       "the generation config's eos ids lack the token the rows end answers with")

# Rows whose rendering is checked against the template (each costs a few renders).
SAMPLE_ROWS = 64
_PROBE_CONTENT = "Sure, here it is."
_PROBE = ({"role": "user", "content": "Hello there."}, {"role": "assistant", "content": _PROBE_CONTENT})


class TemplateCheckError(DataError):
    """A template check found that the run would certainly train the wrong thing; `.code` names the check.

    Args:
        diagnostic (Diagnostic): the error, with its code and message.
    """

    def __init__(self, diagnostic: Diagnostic) -> None:
        self.code = diagnostic.code
        self.diagnostic = diagnostic
        super().__init__(diagnostic.message)


@dataclasses.dataclass(frozen=True)
class Note:
    """A fact a check found worth saying that is no problem here.

    Args:
        code (str): the check's code.
        message (str): what it found, for people.
    """

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclasses.dataclass(frozen=True)
class EndOfTurn:
    """What the chat template writes right after an assistant turn's content.

    Args:
        text (str): the end-of-turn text, as trained (trailing whitespace aside): `<|im_end|>`.
        ids (tuple[int, ...]): its special tokens, the ones generation can stop at; empty when it has none.
    """

    text: str
    ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TemplateChecks:
    """What the checks found.

    Args:
        diagnostics (tuple[Diagnostic, ...]): warnings and errors, each with its code.
        notes (tuple[Note, ...]): facts that are no problem here. Default: ()
        end_of_turn (EndOfTurn | None): the template's end of turn (chat rows only). Default: None
        stop_ids (tuple[int, ...]): the tokens the rows end their answers with. Default: ()
    """

    diagnostics: tuple[Diagnostic, ...]
    notes: tuple[Note, ...] = ()
    end_of_turn: EndOfTurn | None = None
    stop_ids: tuple[int, ...] = ()

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "warning")

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(d.code for d in self.diagnostics)

    def raise_errors(self) -> None:
        """Raise the first error as `TemplateCheckError`; nothing when there is none."""
        if self.errors:
            raise TemplateCheckError(self.errors[0])

    def to_dict(self) -> dict[str, Any]:
        """The findings as report.json and `kbitprep preview --json` write them."""
        return {"diagnostics": [d.to_dict() for d in self.diagnostics], "notes": [n.to_dict() for n in self.notes],
                "end_of_turn": None if self.end_of_turn is None else
                {"text": self.end_of_turn.text, "ids": list(self.end_of_turn.ids)},
                "stop_ids": list(self.stop_ids)}


NO_FINDINGS = TemplateChecks(())


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, generation_prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt))


def _special_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's special and added tokens: the ones a template's markers are made of."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ()}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {int(i) for i, token in decoder.items() if getattr(token, "special", True)}


def _token(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.convert_ids_to_tokens(int(token_id)))


def _names(tokenizer: Any, ids: Sequence[int]) -> str:
    return " or ".join(f"{_token(tokenizer, i)!r} (id {i})" for i in ids)


# --- the template, before the rows are tokenized -------------------------------------------


def probe_template(rows: Sequence[Row], tokenizer: Any, source: str) -> tuple[EndOfTurn | None, list[Diagnostic]]:
    """The template's end of turn, and what is wrong with how it renders the rows (chat rows only).

    A probe conversation and the first `SAMPLE_ROWS` rows are rendered as the run renders
    them (`kbitprep.app.data.chat.assistant_spans`).

    Returns:
        tuple: (the end of turn, or None for rows that are not chat rows; warnings found).

    Raises:
        TemplateCheckError: `template-drops-assistant`, naming the row.
    """
    chat = [row for row in rows if row.kind == "messages"]
    if not chat:
        return None, []
    check_assistant_rendered(list(_PROBE), tokenizer, f"{source} (a probe conversation)")
    for row in chat[:SAMPLE_ROWS]:
        check_assistant_rendered(list(row.messages), tokenizer, f"{source}:{row.line}")
    found = [d for d in (check_generation_prompt(tokenizer, source),) if d is not None]
    return end_of_turn(tokenizer), found


def check_assistant_rendered(messages: list[dict[str, Any]], tokenizer: Any, where: str) -> None:
    """Refuse a template that renders no assistant turn, or not its content, where the run trains it.

    Raises:
        TemplateCheckError: `template-drops-assistant`.
    """
    answers = [m for m in messages if m["role"] == "assistant"]
    try:
        whole = _render(tokenizer, messages, generation_prompt=False)
    except Exception:  # noqa: BLE001 - assistant_spans below names a template that fails on the row
        whole = None
    for message in answers:
        content = message["content"].strip()
        if whole is not None and content and content not in whole:
            raise TemplateCheckError(TEMPLATE_DROPS_ASSISTANT(
                f"{where}: the chat template renders nothing of the assistant turn {content[:40]!r}, so the run "
                "would not train the answers; pass --chat-template FILE with a template that writes every message's "
                "content (assistant turns included)"))
    text, spans = assistant_spans(messages, tokenizer, where)
    for span, message in zip(spans, answers, strict=True):
        content = message["content"].strip()
        if content and content not in text[span.start:span.stop]:
            shown = text[span.start:span.stop]
            found = f"only {shown!r}" if shown.strip() else "nothing"
            raise TemplateCheckError(TEMPLATE_DROPS_ASSISTANT(
                f"{where}: the chat template renders {found} where the assistant turn {content[:40]!r} should be, "
                "so the run would not train the answers; pass --chat-template FILE with a template that writes "
                "every message's content (assistant turns included)"))


def check_generation_prompt(tokenizer: Any, source: str) -> Diagnostic | None:
    """Warn of a template that writes its generation prompt after a finished conversation, unasked.

    Such a template ignores `add_generation_prompt`: the text after a conversation's last
    assistant turn is not there when the conversation goes on, so every row trains the
    model to open a new turn after its answer (and a row of two answers is refused as not
    rendered incrementally).
    """
    user = [_PROBE[0]]
    if _render(tokenizer, user, generation_prompt=True) != _render(tokenizer, user, generation_prompt=False):
        return None  # the template writes its generation prompt only when asked
    finished = _render(tokenizer, _PROBE, generation_prompt=False)
    continued = _render(tokenizer, [*_PROBE, {"role": "user", "content": "And then?"}], generation_prompt=False)
    # The text from the first character where the finished conversation and the continued one part.
    common = next((i for i, (a, b) in enumerate(zip(finished, continued, strict=False)) if a != b),
                  min(len(finished), len(continued)))
    dangling = finished[finished.rfind("\n", 0, common) + 1:]  # from the start of that line: the whole marker
    if not dangling.strip():
        return None
    return GENERATION_PROMPT_IN_ROWS(
        f"{source}: the chat template writes {dangling!r} after a conversation's last assistant turn even without "
        "add_generation_prompt (a conversation that goes on has no such text there), so every row trains the model "
        "to write it after its answer; put the generation prompt inside `{% if add_generation_prompt %}` in the "
        "template, or pass --chat-template FILE")


def end_of_turn(tokenizer: Any) -> EndOfTurn:
    """What the template writes after an assistant turn's content, and its special tokens."""
    text, spans = assistant_spans(list(_PROBE), tokenizer, "the chat template")
    trained = text[spans[0].start:spans[0].stop]
    after = trained[trained.find(_PROBE_CONTENT) + len(_PROBE_CONTENT):] if _PROBE_CONTENT in trained else ""
    special = _special_ids(tokenizer)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return EndOfTurn(after, tuple(dict.fromkeys(int(i) for i in ids if int(i) in special)))


# --- the rows, tokenized ------------------------------------------------------------------


def _kept_rows(rows: Sequence[Row], data: TokenizedData) -> list[tuple[Row, dict[str, list[int]], int]]:
    """Each tokenized example with the row it came from and that row's length before the cut (dropped rows: none)."""
    dropped = set(data.dropped)
    lengths = data.lengths or tuple(len(example["input_ids"]) for example in data.examples)
    if len(lengths) == len(rows):
        lengths = tuple(n for row, n in zip(rows, lengths, strict=True) if row.line not in dropped)
    return list(zip([row for row in rows if row.line not in dropped], data.examples, lengths, strict=True))


def _last_trained(labels: Sequence[int]) -> int | None:
    return next((label for label in reversed(labels[1:]) if label != IGNORE_INDEX), None)


def check_rows(rows: Sequence[Row], data: TokenizedData, tokenizer: Any, *, seq_len: int,
               end: EndOfTurn | None, collator: Callable[[list[dict[str, list[int]]]], Mapping[str, Any]],
               pad_token_id: int, generation_stops: tuple[int, ...] | None, generation_source: str,
               source: str, merge_writes_stops: bool = False, probe: Sequence[Diagnostic] = ()) -> TemplateChecks:
    """Every row check over the rows as the run tokenized them.

    Args:
        rows (Sequence[Row]): the rows read.
        data (TokenizedData): the rows tokenized (`tokenize_rows`).
        tokenizer (Any): the tokenizer they were tokenized with.
        seq_len (int): the sequence length they were cut at.
        end (EndOfTurn | None): the template's end of turn (`probe_template`); None for rows that are no chat.
        collator (Callable): what batches the examples (the run's `CausalLMCollator`).
        pad_token_id (int): the id it pads with.
        generation_stops (tuple[int, ...] | None): the eos ids generation stops at; None: unknown.
        generation_source (str): the file they come from, for messages.
        source (str): the data file, for messages.
        merge_writes_stops (bool): the run's merge adds the stop token to the generation config,
            so a missing one is a note, not a warning. Default: False
        probe (Sequence[Diagnostic]): what `probe_template` found, kept first. Default: ()

    Returns:
        TemplateChecks: the diagnostics and notes.
    """
    kept = _kept_rows(rows, data)
    answers = [(row, example, length) for row, example, length in kept if row.kind != "text"]
    stops = _stop_ids(tokenizer, end, answers)
    found: list[Diagnostic] = list(probe)
    notes: list[Note] = []
    if answers:
        found += [d for d in (check_stop_token(answers, tokenizer, end, stops, seq_len, source),) if d is not None]
        pad_finding = check_pad(collator, pad_token_id, stops, tokenizer)
        if isinstance(pad_finding, Note):
            notes.append(pad_finding)
        elif pad_finding is not None:
            found.append(pad_finding)
        generation = check_generation_stops(stops, generation_stops, generation_source, tokenizer,
                                            merge_writes_stops=merge_writes_stops)
        if isinstance(generation, Note):
            notes.append(generation)
        elif generation is not None:
            found.append(generation)
    bos = check_doubled_bos([(row, example) for row, example, _ in kept], tokenizer, source)
    if bos is not None:
        found.append(bos)
    return TemplateChecks(tuple(found), tuple(notes), end, stops)


def _stop_ids(tokenizer: Any, end: EndOfTurn | None,
              answers: Sequence[tuple[Row, dict[str, list[int]], int]]) -> tuple[int, ...]:
    """The tokens the rows end their answers with: the template's end of turn (chat), the eos (prompt/completion)."""
    if not answers:
        return ()
    if answers[0][0].kind == "messages":
        return end.ids if end is not None else ()
    eos = getattr(tokenizer, "eos_token_id", None)
    return () if eos is None else (int(eos),)


def check_stop_token(answers: Sequence[tuple[Row, dict[str, list[int]], int]], tokenizer: Any,
                     end: EndOfTurn | None, stops: tuple[int, ...], seq_len: int, source: str) -> Diagnostic | None:
    """The rows' answers end with a token generation can stop at, and it is trained (not cut by --seq-len).

    No row that trains it is an error (`stop-token-never-trained`), some rows a warning.
    """
    chat = answers[0][0].kind == "messages"
    if not stops:
        if chat:
            written = f"writes {end.text!r}, which holds no special token" if end is not None and end.text.strip() \
                else "writes only whitespace"
            return NO_STOP_TOKEN(
                f"{source}: after an assistant turn the chat template {written}, so "
                "the model cannot learn a token to stop at and would run on past its answers; use a template that "
                "ends turns with a special token (the eos, or an end-of-turn token such as <|im_end|>)")
        return NO_STOP_TOKEN(
            f"{source}: the tokenizer has no eos token, so the completions end with nothing the model could learn to "
            "stop at and it would run on past its answers; set the tokenizer's eos_token (tokenizer.eos_token = ..., "
            "then save_pretrained)")
    missing = [(row, length) for row, example, length in answers if _last_trained(example["labels"]) not in stops]
    if not missing:
        return None
    cut = sum(length > seq_len for _, length in missing)
    what = "assistant turn" if chat else "completion"
    why = f"{cut} cut by --seq-len {seq_len} before it" if cut else "it is not trained"
    first = ", ".join(str(row.line) for row, _ in missing[:3])
    if len(missing) == len(answers):
        return STOP_TOKEN_NEVER_TRAINED(
            f"{source}: no row's last {what} ends with a trained {_names(tokenizer, stops)} ({why}), so the model "
            f"would never learn to stop; raise --seq-len or shorten the rows (first: line {first})")
    return STOP_TOKEN_NOT_TRAINED(
        f"{source}: {len(missing)} of {len(answers)} rows end their last {what} without a trained "
        f"{_names(tokenizer, stops)} ({why}; lines {first}{', ...' if len(missing) > 3 else ''}): they teach the "
        "model to run on past an answer; raise --seq-len, or shorten or drop those rows")


def check_pad(collator: Callable[[list[dict[str, list[int]]]], Mapping[str, Any]], pad_token_id: int,
              stops: tuple[int, ...], tokenizer: Any) -> Diagnostic | Note | None:
    """Whether the collator keeps a trained stop token's label: it is asked, on a batch that ends with one.

    A collator that masks labels equal to the padding id (transformers'
    `DataCollatorForLanguageModeling`) hides the eos from the loss when pad = eos; kbitprep's
    `CausalLMCollator` masks padding by position, so pad = eos is harmless with it (a note).
    """
    for stop in stops:
        other = next(i for i in range(max(stops) + 2) if i not in stops)
        batch = collator([{"input_ids": [other, stop], "labels": [other, stop]}] * 2)
        if int(batch["labels"][0][1]) == IGNORE_INDEX:
            return PAD_MASKS_STOP_TOKEN(
                f"the collator turns the label of {_names(tokenizer, [stop])} into -100 (it masks the padding id "
                f"{pad_token_id}, the same token), so the model would never learn to stop; give the tokenizer a pad "
                "token of its own, or use a collator that masks padding by position (kbitprep's CausalLMCollator)")
    if pad_token_id in stops:
        return Note("pad-is-stop-token",
                    f"the padding id is {_names(tokenizer, [pad_token_id])}, the token the rows stop with: harmless "
                    "here, kbitprep's collator masks padding by position, not by id, so the stop token is trained")
    return None


def check_generation_stops(stops: tuple[int, ...], generation_stops: tuple[int, ...] | None, generation_source: str,
                           tokenizer: Any, *, merge_writes_stops: bool = False) -> Diagnostic | Note | None:
    """The generation config stops at the token the rows end their answers with."""
    if not stops or generation_stops is None or set(stops) & set(generation_stops):
        return None
    ids = ", ".join(str(i) for i in generation_stops) or "nothing"
    message = (f"{generation_source} stops generation at eos_token_id {ids}, but the rows end their answers with "
               f"{_names(tokenizer, stops)}: generating with this folder and the adapter, the model would run on past "
               f"its answers")
    if merge_writes_stops:
        return Note(GENERATION_STOP_MISSING.code, message + "; `kbitprep merge` writes a generation_config.json that "
                    f"stops there too (elsewhere pass eos_token_id=[{', '.join(map(str, (*generation_stops, *stops)))}]"
                    " to generate)")
    return GENERATION_STOP_MISSING(message + f"; add {', '.join(map(str, stops))} to eos_token_id there (`kbitprep "
                                   "merge` writes a merged model whose generation_config.json does)")


def check_doubled_bos(kept: Sequence[tuple[Row, dict[str, list[int]]]], tokenizer: Any,
                      source: str) -> Diagnostic | None:
    """Warn of rows that start with the beginning-of-sequence token twice."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    doubled = [row for row, example in kept if example["input_ids"][:2] == [bos, bos]]
    if not doubled:
        return None
    token = _names(tokenizer, [bos])
    if doubled[0].kind == "messages":
        why = ("the chat template writes it and the conversation's text starts with it again; remove it from the "
               "messages, or the second bos from the template")
    else:
        why = (f"kbitprep adds it and the row's text starts with it again; remove the leading "
               f"{_token(tokenizer, bos)} from the rows' text")
    lines = ", ".join(str(row.line) for row in doubled[:3])
    return DOUBLED_BOS(f"{source}: {len(doubled)} of {len(kept)} rows start with {token} twice (lines {lines}"
                       f"{', ...' if len(doubled) > 3 else ''}): {why}")
