"""Packing: trained tokens per second with and without `--pack`, on rows of mixed lengths.

The same 4-bit model, LoRA and rows train for the same number of optimizer steps, once
with the rows padded batch by batch (what `finetune` does without `--pack`) and once
packed into sequences of `seq_len` (`kbitprep.app.data.packing`). Trained tokens are the
positions whose label is not -100, counted identically for both; time is the wall time
of the optimizer steps after a warm-up step. Padding costs compute but trains nothing, so
the ratio of trained tokens per second is the figure packing exists for.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .pace import Progress

__all__ = ["PACKING_CONFIG", "PackingResult", "PackingSettings", "measure_packing", "mixed_rows", "render_packing"]

# A small Llama, computed in float32 (fast on any CPU), so the minute goes to steps, not loading.
PACKING_CONFIG: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 344,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
    "max_position_embeddings": 1024, "torch_dtype": "float32", "tie_word_embeddings": False,
}


@dataclasses.dataclass(frozen=True)
class PackingSettings:
    """Args: rows, seq_len, batch_size, steps (timed per round, after one warm-up step), rounds (padded and
    packed alternate; each batch counts its fastest round), threads (torch threads)."""

    rows: int = 192
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 6
    rounds: int = 3
    threads: int = 2


@dataclasses.dataclass(frozen=True)
class ModeFigures:
    """One mode's figures: trained tokens, all tokens (padding included), seconds, over the timed steps."""

    trained_tokens: int
    tokens: int
    seconds: float

    @property
    def trained_per_second(self) -> float:
        return self.trained_tokens / self.seconds

    @property
    def padding_fraction(self) -> float:
        return 1 - self.trained_tokens / self.tokens if self.tokens else 0.0


@dataclasses.dataclass(frozen=True)
class PackingResult:
    """Padded and packed figures, the data set's lengths and the padding the packer reports."""

    settings: PackingSettings
    length_quartiles: tuple[int, int, int]
    padded: ModeFigures
    packed: ModeFigures
    packing_summary: dict[str, int]

    @property
    def speedup(self) -> float:
        return self.packed.trained_per_second / self.padded.trained_per_second


def mixed_rows(count: int, seq_len: int, *, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Token rows of mixed lengths, as instruction data has: mostly short, some long.

    Three in four rows are 16-128 tokens, one in four 128-`seq_len` (for a `seq_len` under 256,
    half of it splits short from long); a quarter of each row
    is a masked prompt (label -100), as prompt/completion rows have.
    """
    generator = random.Random(seed)
    short = min(128, seq_len // 2)  # the longest short row
    rows = []
    for _ in range(count):
        length = generator.randint(16, short) if generator.random() < 0.75 else generator.randint(short, seq_len)
        ids = [generator.randrange(3, vocab) for _ in range(length)]
        prompt = length // 4
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _model(directory: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kbitprep import prepare_model_for_kbit_training
    from kbitprep.app.model.loading import load_quantized_model
    from kbitprep.sizing import load_config

    torch.manual_seed(0)
    # Saved in float32, so the 4-bit layers compute in float32: bfloat16 is slow on many CPUs.
    AutoModelForCausalLM.from_config(load_config(dict(PACKING_CONFIG)), dtype=torch.float32).save_pretrained(directory)
    model = load_quantized_model(directory, "nf4")
    model = prepare_model_for_kbit_training(model, upcast="norms", use_gradient_checkpointing=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft reads a deprecated transformers property
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def _step_times(model: torch.nn.Module, batches: Sequence[dict[str, Any]], steps: int) -> list[float]:
    """Seconds of each of `steps` optimizer steps over the first `steps` batches, after one warm-up step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for step in range(-1, steps):
        started = time.perf_counter()
        model(**batches[max(step, 0)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 0:
            times.append(time.perf_counter() - started)
    return times


def _figures(batches: Sequence[dict[str, Any]], rounds: list[list[float]]) -> ModeFigures:
    """Each batch's fastest time over the rounds (what the machine does when nothing else runs), summed."""
    seconds = sum(min(times) for times in zip(*rounds, strict=True))
    used = batches[:len(rounds[0])]
    trained = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in used)
    return ModeFigures(trained, sum(batch["input_ids"].numel() for batch in used), seconds)


def measure_packing(settings: PackingSettings | None = None, *, log: Callable[[str], None] = print) -> PackingResult:
    """Train the same rows padded and packed; return both modes' figures."""
    from kbitprep.app.data.packing import check_packing, pack_examples
    from kbitprep.app.data.tokenize import CausalLMCollator

    settings = settings or PackingSettings()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        rows = mixed_rows(settings.rows, settings.seq_len, vocab=PACKING_CONFIG["vocab_size"])
        random.Random(1).shuffle(rows)  # the Trainer samples rows in random order
        packed = pack_examples(rows, settings.seq_len, settings.batch_size)
        collate = CausalLMCollator(pad_token_id=0)
        size = settings.batch_size
        modes = {name: [collate(examples[i:i + size]) for i in range(0, len(examples), size)]
                 for name, examples in (("padded", rows), ("packed", packed.examples))}
        with tempfile.TemporaryDirectory() as workdir:
            model = _model(Path(workdir) / "model")
            check_packing(model, PACKING_CONFIG["vocab_size"])
            rounds: dict[str, list[list[float]]] = {name: [] for name in modes}
            progress = Progress("packing", settings.rounds * len(modes), log, unit="timed pass", every_s=0)
            for _ in range(settings.rounds):
                for name, batches in modes.items():
                    rounds[name].append(_step_times(model, batches, settings.steps))
                    progress.advance()
        padded, packed_figures = (_figures(modes[name], rounds[name]) for name in modes)
        log(f"  padded {padded.trained_per_second:.0f}, packed {packed_figures.trained_per_second:.0f} "
            "trained tokens/s")
    finally:
        torch.set_num_threads(threads)
    lengths = sorted(len(row["input_ids"]) for row in rows)
    quartiles = (lengths[len(lengths) // 4], lengths[len(lengths) // 2], lengths[3 * len(lengths) // 4])
    return PackingResult(settings, quartiles, padded, packed_figures, packed.summary())


def render_packing(result: PackingResult | None) -> list[str]:
    """The BENCHMARKS.md section for packing (nothing when it was not measured)."""
    if result is None:
        return []
    s, summary = result.settings, result.packing_summary
    q1, median, q3 = result.length_quartiles
    lines = [
        "## Packing: trained tokens per second", "",
        (f"{s.rows} rows of mixed lengths (quartiles {q1} / {median} / {q3} tokens; three in four short, one in four "
         f"up to {s.seq_len}; a quarter of each row a masked prompt), batch {s.batch_size}, `--seq-len {s.seq_len}`, "
         "a 2-layer Llama (hidden 128, vocabulary 2048) in 4-bit NF4 computing in float32, LoRA r=16 on the "
         f"attention, the first {s.steps} batches of each mode timed as optimizer steps {s.rounds} times (the modes "
         f"alternating; each batch counts its fastest time), {s.threads} threads. Padded: rows in random order, "
         "each batch padded to its longest row (`finetune` without `--pack`). Packed: `--pack` "
         f"({summary['rows']} rows into {summary['packs']} sequences)."), "",
        "| mode | trained tokens/s | tokens computed that are padding or masked | |",
        "| --- | ---: | ---: | --- |",
        f"| padded | {result.padded.trained_per_second:,.0f} | {100 * result.padded.padding_fraction:.0f}% | |",
        (f"| packed | {result.packed.trained_per_second:,.0f} | {100 * result.packed.padding_fraction:.0f}% | "
         f"**{result.speedup:.2f}x** |"), "",
        (f"Over one epoch in file order the packer reports {summary['padding_tokens_unpacked']:,} padding tokens "
         f"unpacked and {summary['padding_tokens_packed']:,} packed ({summary['padding_tokens_saved']:,} saved; "
         "`report.json` records the same figures for a `--pack` run)."), "",
    ]
    return lines
