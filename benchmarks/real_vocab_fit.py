"""The memory model against measurement at real vocabularies and head widths: `python benchmarks/real_vocab_fit.py`.

Published shapes cut only in depth (1 layer; hidden size, heads, intermediate size and the
vocabulary as published): Qwen2.5-0.5B (151,936 tokens, hidden 896), Llama-3.2-1B (128,256,
hidden 2048) and Gemma-2-2B (256,000, hidden 2304). Each is saved with seeded random weights
and trained two steps, on rows longer than the sequence length, by
`kbitprep.app.training.run.finetune` (the command's code: 4-bit load, preparation, LoRA, the
Trainer, the chunked loss), which records in report.json its prediction
(from config.json, before loading) and the measured peak of live tensor bytes. The table goes
into BENCHMARKS.md's section "Memory model at real vocabularies" (between its markers).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[0:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from benchmarks.memory_sweep import write_section  # noqa: E402

BEGIN, END = "<!-- memory-real-vocab: begin -->", "<!-- memory-real-vocab: end -->"
SHAPES = ("qwen2.5-0.5b", "llama-3.2-1b", "gemma-2-2b")
BATCHES = ((1, 256), (2, 512))  # (batch size, sequence length)


def full_rows(path: Path, seq_len: int, rows: int = 16) -> Path:
    """Rows longer than `seq_len` characters (one token each with the test tokenizer): every batch is full length,
    as the memory model assumes."""
    import json

    text = "the quick brown fox jumps over the lazy dog. " * (seq_len // 40 + 2)
    path.write_text("".join(json.dumps({"text": f"{index} {text}"}) + "\n" for index in range(rows)))
    return path


def measure(name: str, root: Path, seq_len: int = 256, batch_size: int = 1) -> dict:
    import torch
    from transformers import AutoConfig

    from conftest import save_tiny_model
    from kbitprep.app.training.run import FinetuneSettings, finetune
    from published_shapes import PUBLISHED

    config = {key: value for key, value in PUBLISHED[name].items() if key != "architectures"}
    config["num_hidden_layers"] = 1
    folder = save_tiny_model(root / name, AutoConfig.for_model(**config), dtype=torch.bfloat16, tokenizer=True)
    data = full_rows(root / f"{name}.jsonl", seq_len)
    started = time.perf_counter()
    report = finetune(FinetuneSettings(str(folder), str(data), str(root / f"{name}-run"), max_steps=2,
                                       batch_size=batch_size, seq_len=seq_len, lora_r=16, save_steps=2))
    memory = report.memory
    predicted = memory["predicted"]
    return {"name": name, "vocab": config["vocab_size"], "hidden": config["hidden_size"],
            "predicted": memory.get("predicted_peak_bytes"), "measured": memory.get("measured_peak_bytes"),
            "error": memory.get("error_percent"), "peak_at": predicted["peak_at"] if predicted else None,
            "why": memory.get("why_not_predicted"), "dtype": predicted["compute_dtype"] if predicted else None,
            "seconds": time.perf_counter() - started, "seq": seq_len, "batch": batch_size}


def render(rows: list[dict]) -> str:
    lines = [BEGIN, "## Memory model at real vocabularies (`python benchmarks/real_vocab_fit.py`)", "",
             "Published shapes cut to 1 layer (hidden, heads, intermediate and vocabulary as published), random "
             "weights, `finetune` two steps (nf4, chunked loss, LoRA r=16, upcast norms, the precision the product "
             "picks here); report.json's prediction against its measured peak of live tensor bytes.", "",
             "| shape | vocab | hidden | batch x seq | compute | predicted | measured | error | predicted peak at |",
             "|---|---:|---:|---|---|---:|---:|---:|---|"]
    for row in rows:
        if row["predicted"] is None:
            lines.append(f"| {row['name']} | {row['vocab']:,} | {row['hidden']} | | | not predicted: {row['why']} "
                         "| | | |")
            continue
        lines.append(f"| {row['name']} (1 layer) | {row['vocab']:,} | {row['hidden']} | {row['batch']} x {row['seq']} "
                     f"| {row['dtype']} | {row['predicted'] / 2**20:,.1f} MiB | {row['measured'] / 2**20:,.1f} MiB "
                     f"| {row['error']:+.1f}% | {row['peak_at']} |")
    return "\n".join([*lines, END])


def main() -> int:
    names = sys.argv[1:] or list(SHAPES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for batch_size, seq_len in BATCHES:
                rows.append(measure(name, Path(tmp) / f"b{batch_size}s{seq_len}", seq_len, batch_size))
                print(rows[-1], flush=True)
    write_section(render(rows), begin=BEGIN, end=END)
    return 0 if all(row["error"] is not None and abs(row["error"]) <= 10 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
