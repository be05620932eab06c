"""Evaluation during training, and the run options that shape the data (chat template, packing).

The eval loss is checked against the reference computed from the full logits (every
token weighted the same across batches), while the LM head is watched to show that no
forward pass of the evaluation produces logits for every position. The end-to-end run
trains the shipped chat example, packed, with rows held out for evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import Zoo

from kbitprep.app.data.rows import IGNORE_INDEX, DataError, Row
from kbitprep.app.data.tokenize import TokenizedData
from kbitprep.app.training.evaluation import eval_every, evaluate, hold_out


def test_hold_out_is_seeded_keeps_file_order_and_leaves_rows_on_both_sides() -> None:
    rows = [Row(i, "", f"row {i}") for i in range(1, 21)]
    train, held = hold_out(rows, 0.25, seed=3, source="d.jsonl")
    assert len(held) == 5 and len(train) == 15 and sorted(train + held, key=lambda r: r.line) == rows
    assert [r.line for r in held] == sorted(r.line for r in held)
    assert hold_out(rows, 0.25, seed=3, source="d.jsonl") == (train, held)  # a resumed run holds out the same rows
    assert hold_out(rows, 0.25, seed=4, source="d.jsonl")[1] != held
    assert len(hold_out(rows[:3], 0.01, seed=0, source="d")[1]) == 1  # at least one row
    assert len(hold_out(rows[:3], 0.99, seed=0, source="d")[0]) == 1  # at least one left to train
    with pytest.raises(DataError, match="d.jsonl: --eval-fraction needs at least 2 rows"):
        hold_out(rows[:1], 0.5, seed=0, source="d.jsonl")


def test_eval_every_defaults_to_a_tenth_of_the_run() -> None:
    assert (eval_every(None, 120), eval_every(None, 7), eval_every(25, 120)) == (12, 1, 25)


def test_eval_loss_weights_every_token_alike_and_never_computes_all_logits(zoo: Zoo, single_thread: None) -> None:
    model = zoo.load("llama", "fp32").eval()
    generator = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 17, 9, 30, 3):
        ids = torch.randint(3, 128, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    data = TokenizedData(examples, 0, ())

    head_rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_rows.append(output.reshape(-1, output.shape[-1]).shape[0]))
    try:
        loss, perplexity = evaluate(model, data, batch_size=2, pad_token_id=0)
    finally:
        hook.remove()

    total, tokens = 0.0, 0
    for example in examples:  # the reference: each row's full logits, summed over its trained tokens
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(example["labels"][1:])
        total += float(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((labels != IGNORE_INDEX).sum())
    assert loss == pytest.approx(total / tokens, rel=1e-5) and perplexity == pytest.approx(math.exp(total / tokens))
    # The head ran on each batch's trained positions only (3 + 15, 7 + 28, 1), never on all of a
    # batch's (rows x padded length) positions (34, 60, 3); calls with no positions aside.
    assert [rows for rows in head_rows if rows][-3:] == [18, 35, 1]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped chat example, packed, a fifth held out, evaluated every 5 of 15 steps."""
    from kbitprep.app.demo import DEMO_CHAT_DATA, build_tiny_model
    from kbitprep.app.training.run import FinetuneSettings, finetune

    root = tmp_path_factory.mktemp("eval-run")
    model = build_tiny_model(root / "model")
    settings = FinetuneSettings(str(model), str(DEMO_CHAT_DATA), str(root / "run"), max_steps=15, lr=1e-2,
                                batch_size=4, lora_r=8, lora_alpha=16, lora_dropout=0.0, seq_len=64, pack=True,
                                eval_fraction=0.2, eval_steps=5)
    finetune(settings)
    return root / "run"


def test_a_packed_chat_run_reports_its_evaluations_and_the_padding_it_saved(chat_run: Path) -> None:
    report = json.loads((chat_run / "report.json").read_text())
    evaluations = report["eval_history"]
    assert [e["step"] for e in evaluations] == [5, 10, 15]
    assert all(e["perplexity"] == pytest.approx(math.exp(e["loss"])) for e in evaluations)
    assert evaluations[-1]["loss"] < evaluations[0]["loss"]
    data = report["data"]
    assert data["kind"] == "messages" and data["eval"] == {"file": None, "fraction": 0.2, "rows": 10, "examples": 10}
    assert data["rows"] == 38 and data["packing"]["rows"] == 38
    assert data["packing"]["packs"] < 38 and data["packing"]["padding_tokens_saved"] > 0
    assert report["settings"]["pack"] is True and report["settings"]["eval_steps"] == 5
    assert (chat_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_eval_and_chat_inputs_fail_before_the_run_folder_is_touched(tmp_path: Path) -> None:
    from kbitprep.app.data.chat import ChatTemplateError
    from kbitprep.app.demo import DEMO_CHAT_DATA, DEMO_DATA, build_tiny_model
    from kbitprep.app.training.run import FinetuneSettings, finetune

    model = str(build_tiny_model(tmp_path / "model"))
    (tmp_path / "plain-model").mkdir()
    for path in Path(model).iterdir():
        (tmp_path / "plain-model" / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "plain-model" / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "plain-model" / "tokenizer_config.json").write_text(json.dumps(config))
    output = tmp_path / "run"
    cases = [
        (FinetuneSettings(model, str(DEMO_DATA), str(output), eval_data=str(DEMO_CHAT_DATA)), DataError,
         r'demo-chat.jsonl:1: --eval-data holds "messages" rows but DATA holds "text" rows'),
        (FinetuneSettings(str(tmp_path / "plain-model"), str(DEMO_CHAT_DATA), str(output)), ChatTemplateError,
         r"the tokenizer has no chat template.*pass --chat-template FILE"),
        (FinetuneSettings(model, str(DEMO_CHAT_DATA), str(output), chat_template=str(tmp_path / "none.jinja")),
         ChatTemplateError, r"none.jinja: no such --chat-template file"),
    ]
    for settings, error, message in cases:
        with pytest.raises(error, match=message):
            finetune(settings)
        assert not output.exists()
