"""Packing: rows concatenated into full sequences train exactly as the rows apart.

The reference is the same rows unpacked (padded, with an attention mask): the model's
loss and each row's own loss must be the same packed, on several architectures and on
the 4-bit model the command trains. Architectures whose attention or positions ignore
restarting `position_ids` are refused by `check_packing`, not trained wrongly.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import Zoo

from kbitprep.app.data.rows import IGNORE_INDEX, Row
from kbitprep.app.data.tokenize import CausalLMCollator, tokenize_rows
from kbitprep.app.data.packing import (
    PackingError,
    check_packing,
    pack_examples,
    padding_tokens,
)


def rows_of(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=generator).tolist()
        labels = list(ids)
        labels[1] = IGNORE_INDEX  # a masked prompt token, as prompt/completion rows have
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def test_first_fit_decreasing_packs_with_restarting_positions() -> None:
    rows = [{"input_ids": [10 + i] * n, "labels": [10 + i] * n} for i, n in enumerate((3, 2, 4, 1))]
    packed = pack_examples(rows, seq_len=6, batch_size=2)
    assert packed.examples == [
        {"input_ids": [12] * 4 + [11] * 2, "labels": [-100, 12, 12, 12, -100, 11], "position_ids": [0, 1, 2, 3, 0, 1]},
        {"input_ids": [10] * 3 + [13], "labels": [-100, 10, 10, -100], "position_ids": [0, 1, 2, 0]},
    ]
    # Unpacked, in file order: batches (3, 2) and (4, 1) pad 1 + 3 tokens; packed: (6, 4) pads 2.
    assert packed.summary() == {"rows": 4, "packs": 2, "padding_tokens_unpacked": 4, "padding_tokens_packed": 2,
                                "padding_tokens_saved": 2}
    assert padding_tokens([5, 5, 1], 3) == 4
    with pytest.raises(ValueError, match="longer than seq_len 3"):
        pack_examples(rows, seq_len=3, batch_size=1)


def test_packed_batches_carry_positions_and_no_attention_mask() -> None:
    packed = pack_examples([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
                            {"input_ids": [4] * 6, "labels": [4] * 6}], seq_len=6, batch_size=2)
    batch = CausalLMCollator(pad_token_id=0)(packed.examples)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["input_ids"].tolist() == [[4] * 6, [5, 6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert batch["labels"].tolist()[1] == [-100, 6, 7, -100, 9, -100]


def per_row_losses_packed(model: torch.nn.Module, packed_examples: list[dict]) -> list[float]:
    """Each row's mean loss, read from one forward pass over the packed batch."""
    batch = CausalLMCollator(0)(packed_examples)
    with torch.no_grad():
        logits = model(**batch).logits.float()
    losses = []
    for b, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, stop in itertools.pairwise(starts):
            labels = batch["labels"][b, start + 1:stop]
            if (labels != IGNORE_INDEX).any():
                losses.append(float(F.cross_entropy(logits[b, start:stop - 1], labels, ignore_index=IGNORE_INDEX)))
    return losses


def per_row_losses_apart(model: torch.nn.Module, rows: list[dict]) -> list[float]:
    losses = []
    for row in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].float()
        losses.append(float(F.cross_entropy(logits[:-1], torch.tensor(row["labels"][1:]), ignore_index=IGNORE_INDEX)))
    return losses


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2", "phi", "falcon"])
def test_a_packed_batch_gives_each_row_the_loss_it_has_alone(zoo: Zoo, arch: str, single_thread: None) -> None:
    model = zoo.load(arch, "fp32").eval()
    rows = rows_of([9, 4, 13, 6, 3, 11])
    packed = pack_examples(rows, seq_len=16, batch_size=2)
    assert len(packed) < len(rows)
    check_packing(model, 128)
    # The packs reorder the rows (longest first); compare as a multiset, to float precision.
    assert sorted(per_row_losses_packed(model, packed.examples)) == pytest.approx(
        sorted(per_row_losses_apart(model, rows)), rel=1e-5)
    # And the training loss of the whole batch: the same tokens, the same mean.
    unpacked = CausalLMCollator(0)(rows)
    with torch.no_grad():
        assert float(model(**CausalLMCollator(0)(packed.examples)).loss) == pytest.approx(
            float(model(**unpacked).loss), rel=1e-5)


def test_packing_on_the_4bit_model_the_command_trains(tmp_path, single_thread: None) -> None:
    from kbitprep import prepare_model_for_kbit_training
    from kbitprep.app.demo import build_tiny_model
    from kbitprep.app.model.loading import load_quantized_model, load_tokenizer

    folder = build_tiny_model(tmp_path / "tiny")
    model = prepare_model_for_kbit_training(load_quantized_model(folder, "nf4"), upcast="norms").eval()
    check_packing(model, 100)
    rows = [Row(i, "", "abcdefghijklmnopqrstuvwxyz"[i:i + 3 + i % 9]) for i in range(12)]
    data = tokenize_rows(rows, load_tokenizer(folder), seq_len=32)
    packed = pack_examples(data.examples, seq_len=32, batch_size=4)
    assert packed.padding_saved > 0
    # bf16 compute: the packed and unpacked batches run through kernels of other shapes.
    assert sorted(per_row_losses_packed(model, packed.examples)) == pytest.approx(
        sorted(per_row_losses_apart(model, data.examples)), rel=2e-2)


@pytest.mark.parametrize("arch", ["opt", "bloom"])
def test_models_whose_rows_would_see_each_other_are_refused(zoo: Zoo, arch: str, single_thread: None) -> None:
    """OPT derives positions from the attention mask and Bloom its ALiBi bias: neither follows position_ids."""
    with pytest.raises(PackingError, match=rf"--pack: in {arch} packed rows .*train without --pack"):
        check_packing(zoo.load(arch, "fp32"), 128)
