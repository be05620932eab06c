"""Known, expected log notes from other libraries, and a way to drop exactly those.

Each row names the logger and the start of the message. Only records that match are
dropped; everything else those libraries log still reaches the user.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

__all__ = ["LOG_NOTES", "without_log_notes"]

LOG_NOTES: Mapping[str, tuple[str, str]] = {
    # Logged when bitsandbytes is imported on a CPU without the optional `kernels` package;
    # it then uses its own CPU code, which is what kbitprep wants anyway.
    "bnb-cpu-kernels": ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # Logged on every 8-bit matmul with float32 inputs (bitsandbytes int8 always computes in
    # float16): hundreds of identical lines per run.
    "bnb-int8-cast": ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"),
    # Logged once per tokenizer when a row tokenizes past its model_max_length, warning of
    # "indexing errors": kbitprep cuts every row at --seq-len, and refuses a --seq-len past the
    # model's learned positions, so the note warns of what cannot happen.
    "long-row-tokens": ("transformers.tokenization_utils_base", "Token indices sequence length is longer"),
}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def without_log_notes(*names: str) -> Iterator[None]:
    """Drop the `LOG_NOTES` rows named, for the duration of the block.

    Example:
        >>> with without_log_notes("bnb-int8-cast"):
        ...     trainer.train()
    """
    attached = []
    for name in names:
        logger_name, prefix = LOG_NOTES[name]
        logger, note = logging.getLogger(logger_name), _DropPrefix(prefix)
        logger.addFilter(note)
        attached.append((logger, note))
    try:
        yield
    finally:
        for logger, note in attached:
            logger.removeFilter(note)
