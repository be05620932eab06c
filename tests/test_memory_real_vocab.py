"""The memory model within 10% of the measured peak at a real vocabulary and head width.

Qwen2.5-0.5B's shape (151,936 tokens, hidden 896, intermediate 4,864) cut to one layer, trained
two steps by `finetune` (the chunked loss, nf4, LoRA r=16), at the precision the product picks
on this machine; report.json's prediction (from config.json) against its measured live-tensor
peak. benchmarks/real_vocab_fit.py runs Llama-3's and Gemma's vocabularies too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from conftest import save_tiny_model
from published_shapes import PUBLISHED

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # `benchmarks` is a folder of the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def test_a_real_vocabulary_run_is_predicted_within_ten_percent(tmp_path: Path) -> None:
    from benchmarks.real_vocab_fit import full_rows

    from kbitprep.app.training.run import FinetuneSettings, finetune

    config = {key: value for key, value in PUBLISHED["qwen2.5-0.5b"].items() if key != "architectures"}
    config["num_hidden_layers"] = 1
    folder = save_tiny_model(tmp_path / "qwen", AutoConfig.for_model(**config), dtype=torch.bfloat16, tokenizer=True)
    data = full_rows(tmp_path / "rows.jsonl", 256)  # every row longer than the sequence: full-length batches
    report = finetune(FinetuneSettings(str(folder), str(data), str(tmp_path / "run"), max_steps=2, batch_size=1,
                                       seq_len=256, lora_r=16, save_steps=2))
    memory = report.memory
    assert memory["predicted"] is not None, memory.get("why_not_predicted")
    assert memory["predicted"]["settings"]["loss"] == "chunked"
    assert abs(memory["error_percent"]) <= 10, memory
