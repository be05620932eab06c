"""`kbitprep preview MODEL DATA`: the rows as a run with these settings would train them, and the template checks.

It reads what `finetune` reads before it loads a model, with the run's own code
(`kbitprep.app.training.inputs.read_inputs`): config.json, the tokenizer (with
--chat-template), every row, tokenized and cut at --seq-len (and packed with --pack).
No weight file is opened, so a folder of config and tokenizer alone will do, and nothing
is written.
"""

from __future__ import annotations

from .config.settings import FinetuneSettings
from .data.files import read_data
from .data.packing import PackedData
from .data.preview import PreviewReport, preview_report
from .model.loading import check_model_folder
from .training.inputs import RunRequest, read_inputs

__all__ = ["preview"]


def preview(settings: FinetuneSettings, shown: int = 3) -> PreviewReport:
    """The rows as the run with `settings` would tokenize them, a summary of the whole file, and the checks.

    Only the data settings matter (model, data, --data-format, --chat-template, --seq-len,
    --pack, --batch-size for the padding figures); the others are checked but unused.

    Args:
        settings (FinetuneSettings): the run's settings.
        shown (int): rows to show, the file's first. Default: 3

    Raises:
        ModelFolderError, DataError, ChatTemplateError, FinetuneError: the message names the fix.
    """
    settings.check()
    config = check_model_folder(settings.model, need_weights=False)
    resolved = settings.resolved(config)
    rows = read_data(resolved.data, resolved.data_format)
    inputs = read_inputs(RunRequest(resolved, tuple(rows), (), config), for_run=False)
    packed = inputs.train_data if isinstance(inputs.train_data, PackedData) else None
    return preview_report(rows, inputs.data, inputs.tokenizer, model=resolved.model, source=resolved.data,
                          seq_len=resolved.seq_len, checks=inputs.checks, packed=packed, shown=shown)
