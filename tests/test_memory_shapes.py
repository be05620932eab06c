"""The memory model on the published shapes of thirteen models, sized from config.json alone.

Each model is saved as a folder with only its config.json (`published_shapes.PUBLISHED`)
and sized as `kbitprep inspect MODEL --memory` sizes it: one case per shape here (seq
2048, batch 1, nf4, the chunked loss, with the head upcast in pieces as on a CPU without
fast bf16, the path whose vocabulary-wide matmul once failed on every real vocabulary).
The full matrix (both lengths and batch sizes, every quantization and loss) and every
causal LM transformers ships are `make sweep` (benchmarks/memory_sweep.py).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from kbitprep.app.memory.estimate import MemorySettings, TrainingSkeleton
from kbitprep.precision import override_fast_dtypes
from published_shapes import PUBLISHED, generous_bound, save_config, weight_bytes

SETTINGS = MemorySettings(seq_len=2048, batch_size=1, lora_r=16, upcast="norms", loss="chunked", device="cpu")


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_a_published_shape_is_sized_from_its_config_alone(name: str, tmp_path: Path) -> None:
    folder = save_config(name, tmp_path)
    assert [path.name for path in folder.iterdir()] == ["config.json"]
    started = time.perf_counter()
    with override_fast_dtypes("cpu", set()):  # bf16 is slow here: the loss upcasts the head piece by piece
        skeleton = TrainingSkeleton(folder, SETTINGS)
        base = skeleton.estimate()
        longer = skeleton.estimate(1, 4096)
        wider = skeleton.estimate(2, 2048)
    assert time.perf_counter() - started < 60
    weights = weight_bytes(base)
    assert weights < base.total < weights + generous_bound(PUBLISHED[name], 1, 2048), base.to_dict()
    assert base.total < longer.total and base.total < wider.total
    assert base.component("activations kept") > 0 and base.component("LoRA parameters") > 0


def test_the_chunked_loss_sizes_a_real_vocabulary_in_its_upcast_pieces() -> None:
    """The loss's plan for Llama-3's head: 128-token chunks, 1,024 rows upcast at a time, and the step runs."""
    from kbitprep.app.memory.simulated_loss import chunked_loss_plan

    with override_fast_dtypes("cpu", set()):
        skeleton = TrainingSkeleton(PUBLISHED["llama-3.2-1b"], dataclasses.replace(SETTINGS, seq_len=256))
        plan = chunked_loss_plan(skeleton.model, "cpu")
        estimate = skeleton.estimate()
    assert (plan.head_rows, plan.hidden_size, plan.chunk_tokens, plan.weight_rows) == (128256, 2048, 128, 2048)
    assert estimate.total > weight_bytes(estimate)
