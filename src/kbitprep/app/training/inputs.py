"""What a run reads, each once, before its model is loaded: `RunRequest`, then `RunInputs`.

    settings ──check, resolve──> RunRequest (settings, rows, eval_rows)     nothing of the model yet
    model folder ──────────────> RunInputs  (+ config.json, tokenizer, tokenized data)

`finetune` reads both before the run folder is claimed, so a bad option, model folder or
data row costs seconds and writes nothing. A run whose model is made inside its folder
(the demo writes its base model there) reads the model's part after that; either way each
input is read once and handed to the phases as a value: config.json once (transformers'
own loads aside), the tokenizer once (with --chat-template applied), the rows once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.settings import FinetuneSettings
from ..data.files import read_data
from ..data.packing import PackedData, pack_examples
from ..data.rows import DataError, Row
from ..data.template_checks import NO_FINDINGS, TemplateChecks, check_rows, probe_template
from ..data.tokenize import CausalLMCollator, TokenizedData, check_token_ids, longest_row, tokenize_rows
from ..model.loading import ModelFolderError, check_model_folder, load_tokenizer
from ..model.quiet import without_log_notes
from .sampling import pad_token_id

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["RunInputs", "RunRequest", "check_chat_rows", "check_method_rows", "configured_vocab_size",
           "evaluation_rows", "generation_stop_ids", "read_inputs", "resolve_settings"]


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """A run's settings, checked once and resolved (`resolve_settings`), with its rows read.

    Args:
        settings (FinetuneSettings): checked; paths absolute, `--quantize auto` resolved.
        rows (tuple[Row, ...]): the training rows.
        eval_rows (tuple[Row, ...]): rows to evaluate on (never trained).
        config (dict | None): the model folder's config.json, when the folder exists yet.
    """

    settings: FinetuneSettings
    rows: tuple[Row, ...]
    eval_rows: tuple[Row, ...] = ()
    config: dict[str, Any] | None = None


def resolve_settings(settings: FinetuneSettings, *, model_made_by_run: bool = False
                     ) -> tuple[FinetuneSettings, dict[str, Any] | None]:
    """The settings checked (once) and resolved, and config.json read (once, unless the run makes the model).

    Raises:
        FinetuneError, QuantizeConflictError, ModelFolderError: the message names the fix.
    """
    settings.check()
    config = None if model_made_by_run else check_model_folder(settings.model)
    resolved = settings.resolved(config)
    if resolved.fsdp:
        resolved.check_sharded()
    return resolved, config


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """Everything a run reads, read once.

    Args:
        request (RunRequest): the settings and rows.
        config (dict): the model folder's config.json.
        tokenizer (Any): the model's tokenizer, --chat-template applied.
        data (TokenizedData): the training rows, tokenized.
        train_data (TokenizedData | PackedData): `data`, packed with --pack.
        eval_data (TokenizedData | None): the evaluation rows, tokenized.
        checks (TemplateChecks): what the template checks found (`kbitprep.app.data.template_checks`).
            Default: none found
    """

    request: RunRequest
    config: dict[str, Any]
    tokenizer: Any
    data: TokenizedData
    train_data: TokenizedData | PackedData
    eval_data: TokenizedData | None
    checks: TemplateChecks = NO_FINDINGS

    @property
    def settings(self) -> FinetuneSettings:
        return self.request.settings

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.tokenizer)


def read_inputs(request: RunRequest, *, for_run: bool = True) -> RunInputs:
    """The model's config and tokenizer, and the rows tokenized (and packed) as the run trains them, checked.

    The template checks (`kbitprep.app.data.template_checks`) run here, before any weight is
    read: a template that renders no answer is refused at once; the rest is in `checks`.

    Args:
        request (RunRequest): the settings and rows.
        for_run (bool): the inputs of a run: the template checks' errors are raised, and what the
            run's own merge sets right (the generation config's stop token) is a note; False: for
            `kbitprep preview`, which shows them all. Default: True

    Raises:
        ModelFolderError, ChatTemplateError, DataError: the message names the file and the fix.
        TemplateCheckError: a template check's error (with `for_run`), its `.code` naming the check.
    """
    settings = request.settings
    check_method_rows(settings, request.rows, settings.data)
    check_method_rows(settings, request.eval_rows, settings.eval_data or settings.data)
    config = request.config if request.config is not None else check_model_folder(settings.model)
    tokenizer = load_tokenizer(settings.model)
    check_chat_rows(settings, request.rows, tokenizer)
    with without_log_notes("long-row-tokens"):  # rows are cut at --seq-len
        end, probed = probe_template(request.rows, tokenizer, settings.data)
        data = tokenize_rows(request.rows, tokenizer, settings.seq_len, source=settings.data)
        eval_data = tokenize_rows(request.eval_rows, tokenizer, settings.seq_len,
                                  source=settings.eval_data or f"{settings.data} (held out)") \
            if request.eval_rows else None
    pad = pad_token_id(tokenizer)
    stops, stops_file = generation_stop_ids(settings.model, config)
    checks = check_rows(request.rows, data, tokenizer, seq_len=settings.seq_len, end=end,
                        collator=CausalLMCollator(pad), pad_token_id=pad, generation_stops=stops,
                        generation_source=stops_file, source=settings.data, merge_writes_stops=for_run, probe=probed)
    if for_run:
        checks.raise_errors()
    train_data: TokenizedData | PackedData = data
    if settings.pack:
        train_data = pack_examples(data.examples, settings.seq_len, settings.batch_size)
    inputs = RunInputs(request, config, tokenizer, data, train_data, eval_data, checks)
    vocab_size = configured_vocab_size(config)
    if vocab_size is not None:  # before loading: another model's tokenizer costs seconds, not a model load
        check_vocabulary(inputs, vocab_size)
    return inputs


def check_vocabulary(inputs: RunInputs, vocab_size: int) -> None:
    """Refuse token ids (the padding id included) past the model's vocabulary."""
    for data in (inputs.data, inputs.eval_data):
        if data is not None:
            check_token_ids(data, vocab_size, tokenizer_source=inputs.settings.model,
                            pad_token_id=inputs.pad_token_id)


def learned_positions(model: Any) -> tuple[str, int] | None:
    """(the module's name, its positions) where the model looks positions up in a table of its own:
    GPT-2's `wpe`, OPT's `embed_positions` (two rows of offset). None for rotary or ALiBi models."""
    from torch import nn

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit < 1:
        return None
    tokens = model.get_input_embeddings()
    return next(((name, limit) for name, module in model.named_modules()
                 if isinstance(module, nn.Embedding) and module is not tokens
                 and limit <= module.num_embeddings <= limit + 2), None)


def check_positions(inputs: RunInputs, model: Any) -> None:
    """Refuse rows longer than a model's learned position embeddings have positions for.

    Raises:
        DataError: names the longest row, the model's positions and the --seq-len that fits.
    """
    table = learned_positions(model)
    longest = max(longest_row(inputs.data), longest_row(inputs.eval_data) if inputs.eval_data is not None else 0)
    if table is None or longest <= table[1]:
        return
    name, positions = table
    raise DataError(f"{inputs.settings.data}: rows of up to {longest} tokens (at --seq-len {inputs.settings.seq_len}) "
                    f"are longer than the model's {positions} positions (config.json max_position_embeddings): its "
                    f"position embeddings ({name}) have no row past position {positions - 1}. Pass --seq-len "
                    f"{positions} or less")


def evaluation_rows(settings: FinetuneSettings, rows: Sequence[Row]) -> tuple[list[Row], list[Row]]:
    """(training rows, evaluation rows) as --eval-data or --eval-fraction say; no evaluation rows without either.

    Raises:
        DataError: the evaluation file is bad, holds rows of another kind than DATA, or
            DATA has too few rows to hold some out.
    """
    from .evaluation import hold_out

    if settings.eval_fraction is not None:
        return hold_out(rows, settings.eval_fraction, settings.seed, settings.data)
    if settings.eval_data is None:
        return list(rows), []
    eval_rows = read_data(settings.eval_data, settings.data_format)
    if (eval_rows[0].kind == "messages") != (rows[0].kind == "messages"):
        raise DataError(f"{settings.eval_data}:{eval_rows[0].line}: --eval-data holds \"{eval_rows[0].kind}\" "
                        f"rows but DATA holds \"{rows[0].kind}\" rows; evaluate on rows of the kind you train on")
    return list(rows), eval_rows


def check_method_rows(settings: FinetuneSettings, rows: Sequence[Row], source: str) -> None:
    """Preference rows for --method dpo/orpo, demonstrations for sft: anything else is refused, naming the fix.

    Raises:
        DataError: the first row is of the other kind.
    """
    if not rows or rows[0].preference == (settings.method != "sft"):
        return
    if rows[0].preference:
        raise DataError(f"{source}:{rows[0].line}: holds preference rows (prompt, chosen, rejected), which --method "
                        "sft does not train on; pass --method dpo or --method orpo")
    raise DataError(f"{source}:{rows[0].line}: --method {settings.method} trains on preference rows with the keys "
                    f"prompt, chosen and rejected, but this is a \"{rows[0].kind}\" row; pass such rows, or "
                    "--method sft")


def check_chat_rows(settings: FinetuneSettings, rows: Sequence[Row], tokenizer: Any) -> None:
    """The --chat-template file reads and is set on `tokenizer`; chat rows have a template to render them.

    Raises:
        ChatTemplateError: naming the fix (`--chat-template FILE`).
    """
    from ..data.chat import check_chat_template, read_chat_template

    if settings.chat_template:
        tokenizer.chat_template = read_chat_template(settings.chat_template)
    if rows and rows[0].kind == "messages":
        check_chat_template(tokenizer, settings.model, settings.chat_template)


def generation_stop_ids(model_dir: str, config: Mapping[str, Any]) -> tuple[tuple[int, ...] | None, str]:
    """The eos ids generation stops at for a model folder, and the file that gives them.

    transformers reads them from generation_config.json where the folder has one, else from
    config.json (its own `eos_token_id`, or its text model's).

    Returns:
        tuple: (the ids, or None when neither file gives any; the file's path).

    Raises:
        ModelFolderError: generation_config.json is not valid JSON.
    """
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            section: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelFolderError(f"{path}: cannot be read as JSON ({error}); fix or remove it") from None
        sections = [section if isinstance(section, dict) else {}]
    else:
        path = Path(model_dir) / "config.json"
        sections = [dict(config), config.get("text_config") or {}]
    for section in sections:
        value = section.get("eos_token_id") if isinstance(section, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,), str(path)
        if isinstance(value, list) and all(isinstance(i, int) for i in value):
            return tuple(value), str(path)
    return None, str(path)


def configured_vocab_size(config: Mapping[str, Any]) -> int | None:
    """The vocabulary size config.json gives (its own, or its text model's); None if it gives none."""
    for section in (config, config.get("text_config") or {}):
        value = section.get("vocab_size") if isinstance(section, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
