"""`inspect --memory BUDGET`: the largest batch size and sequence length that fit, and which change buys the most,
each change's peak the memory model's own estimate with that one setting changed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kbitprep.app.memory.estimate import MemorySettings, estimate_memory
from kbitprep.cli import main

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 8000, "max_position_embeddings": 1024,
          "torch_dtype": "bfloat16"}
ASKED = MemorySettings(seq_len=256, batch_size=2, lora_r=16, loss="full", gradient_checkpointing=False,
                       device="cpu", upcast="norms")
ARGS = ["--seq-len", "256", "--batch-size", "2", "--lora-r", "16", "--loss", "full", "--no-gradient-checkpointing",
        "--device", "cpu", "--upcast", "norms"]


def test_json_carries_each_change_with_its_peak_most_bytes_first(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    asked = estimate_memory(CONFIG, ASKED).total
    budget = asked - 1  # the run as asked does not fit
    assert main(["inspect", str(folder), "--json", *ARGS, "--memory", str(budget)]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["fit"]["fits"] is False and memory["total_bytes"] == asked
    assert memory["fit"]["largest_batch_size"] == 1 and 2 <= memory["fit"]["largest_seq_len"] < 256
    changes = memory["changes"]
    assert [c["option"] for c in changes if c["option"].startswith("--optim")] == ["--optim paged_adamw_8bit"]
    expected = {"drop --no-gradient-checkpointing": {"gradient_checkpointing": True},
                "--loss chunked": {"loss": "chunked"}, "--optim paged_adamw_8bit": {"optim": "paged_adamw_8bit"},
                "--lora-r 8": {"lora_r": 8}}
    assert {c["option"] for c in changes} == set(expected)
    for change in changes:  # each is the estimate with that one setting changed
        peak = estimate_memory(CONFIG, dataclasses.replace(ASKED, **expected[change["option"]])).total
        assert change["peak"] == peak and change["saves"] == asked - peak and change["fits"] == (peak <= budget)
    assert [c["saves"] for c in changes] == sorted((c["saves"] for c in changes), reverse=True)
    assert changes[0]["saves"] > 0 and changes[0]["fits"]  # something makes it fit


def test_the_text_report_names_what_buys_the_most(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    assert main(["inspect", str(folder), *ARGS, "--memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "what buys the most memory, each alone:" in out and "(--optim paged_adamw_8bit): peak" in out
    assert "largest batch size" in out
