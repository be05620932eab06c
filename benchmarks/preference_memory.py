"""Peak memory of one DPO step: kbitprep's chunked log-probabilities against the full logits.

One worker per loss, each a process of its own (`python -m benchmarks.preference_memory ...`),
on the same 4-bit checkpoint, LoRA, optimizer, seed and batch (`pairs` pairs: 2 x pairs rows
of `seq_len` tokens, every token of each row scored):

- "full": `kbitprep.preference_loss(..., loss="full")`: the log-probabilities from the
  model's own logits, (2 x pairs, seq_len, vocabulary) in fp32, for the policy and again for
  the reference (adapter off, no gradients);
- "chunked": the default, `loss="chunked"`: the LM head and log-softmax over chunks of
  positions, no (tokens x vocabulary) tensor in the forward or the backward pass.

Each worker loads, prepares (`upcast="norms"`), attaches LoRA (`attach_lora`, as finetune does)
and runs one DPO step (forward of both sides, the reference, backward, AdamW step) to warm
up; then it measures a second step two ways: the live tensor bytes (`PeakMeter`, the model's
own tensors included) and the peak RSS (VmHWM, reset before the step). Beside them is the
memory model's prediction for the same step (`estimate_memory`, method "dpo"), from config.json.

TRL is not a full-logit baseline: TRL 1.16's DPOTrainer computes the LM head in tiles as well
(its fused LM-head path), so the full-logit figure here is kbitprep's own `--loss full`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_4bit, save_random_checkpoint
from .training import REPO_ROOT, WORKER_ENV, _reset_peak_rss, _rss_bytes

__all__ = ["PREFERENCE_CONFIG", "PREFERENCE_LOSSES", "PreferenceMemorySettings", "render_preference_memory",
           "run_preference_memory", "write_preference_memory"]

BEGIN, END = "<!-- preference-memory: begin -->", "<!-- preference-memory: end -->"
PREFERENCE_LOSSES = {"full": "full logits (`--loss full`)", "chunked": "chunked log-probabilities (default)"}
# Llama-3's vocabulary and head width on a two-layer body: the head dominates, as it does in a 1B-8B model's DPO step.
PREFERENCE_CONFIG: Mapping[str, Any] = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 512, "intermediate_size": 1024,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 2048,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@dataclasses.dataclass(frozen=True)
class PreferenceMemorySettings:
    """The DPO step measured.

    Args:
        pairs (int): preference pairs per step (2 x pairs rows). Default: 1
        seq_len (int): tokens per row. Default: 256
        rank (int): LoRA rank, every linear layer but the head. Default: 16
        beta (float): DPO's beta. Default: 0.1
        seed (int): seeds the weights, the LoRA init and the batch. Default: 0
        threads (int): torch threads per worker. Default: 2
    """

    pairs: int = 1
    seq_len: int = 256
    rank: int = 16
    beta: float = 0.1
    seed: int = 0
    threads: int = 2

    def memory_settings(self, loss: str) -> Any:
        from kbitprep.app.memory.estimate import MemorySettings

        return MemorySettings(upcast="norms", lora_r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0,
                              batch_size=self.pairs, seq_len=self.seq_len, loss=loss, method="dpo", device="cpu")


def _step(model: torch.nn.Module, optimizer: Any, batch: dict[str, torch.Tensor], loss: str, beta: float) -> float:
    from kbitprep.loss import preference_loss

    result = preference_loss(model, batch, "dpo", beta, loss=loss)
    result.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(result.loss.detach())


def measure(checkpoint: Path, loss: str, settings: PreferenceMemorySettings) -> dict[str, Any]:
    """One loss's DPO step in this process: its live tensor peak, peak RSS and predicted peak."""
    import types
    import warnings

    from kbitprep import prepare_model_for_kbit_training
    from kbitprep.app.config.optimizer import make_optimizer
    from kbitprep.app.memory.estimate import estimate_memory
    from kbitprep.app.memory.live_bytes import PeakMeter
    from kbitprep.app.model.lora import attach_lora

    torch.set_num_threads(settings.threads)
    memory = settings.memory_settings(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_4bit(checkpoint)
        prepare_model_for_kbit_training(model, upcast=memory.upcast)
        torch.manual_seed(settings.seed)
        model = attach_lora(model, memory)
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                               types.SimpleNamespace(optim=memory.optim, lr=1e-3))
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, model.config.vocab_size, (2 * settings.pairs, settings.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    first = _step(model, optimizer, batch, loss, settings.beta)  # the optimizer's state exists from here on
    _reset_peak_rss()
    meter = PeakMeter(model).start()
    second = _step(model, optimizer, batch, loss, settings.beta)
    live = meter.stop()
    predicted = estimate_memory(checkpoint, memory).total
    return {"loss": loss, "live_peak_bytes": live, "peak_rss_bytes": _rss_bytes("VmHWM") or 0,
            "predicted_bytes": predicted, "losses": [first, second], "compute_dtype": str(model.dtype)}


def run_preference_memory(config: Mapping[str, Any], settings: PreferenceMemorySettings, *,
                          log=print) -> dict[str, dict[str, Any]]:
    """Each of `PREFERENCE_LOSSES` measured in a process of its own, on one saved checkpoint; by loss name.

    Raises:
        RuntimeError: a worker failed; its stderr is in the message.
    """
    results = {}
    with tempfile.TemporaryDirectory(prefix="kbitprep-bench-dpo-") as tmp:
        checkpoint = save_random_checkpoint(config, Path(tmp) / "model", seed=settings.seed)
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, **WORKER_ENV, "PYTHONPATH": pythonpath}
        for loss in PREFERENCE_LOSSES:
            output = Path(tmp) / f"{loss}.json"
            command = [sys.executable, "-m", "benchmarks.preference_memory", "--checkpoint", str(checkpoint),
                       "--loss", loss, "--output", str(output), "--settings",
                       json.dumps(dataclasses.asdict(settings))]
            done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"the DPO memory worker for {loss!r} exited ({done.returncode}):\n"
                                   f"{done.stderr[-4000:]}")
            results[loss] = json.loads(output.read_text())
            log(f"    {loss}: live peak {results[loss]['live_peak_bytes'] / 2**20:,.0f} MiB, "
                f"predicted {results[loss]['predicted_bytes'] / 2**20:,.0f} MiB, "
                f"peak RSS {results[loss]['peak_rss_bytes'] / 2**20:,.0f} MiB")
    return results


def _mib(count: int) -> str:
    return f"{count / 2**20:,.1f}"


def render_preference_memory(results: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any],
                             settings: PreferenceMemorySettings, command: str) -> str:
    """The section of BENCHMARKS.md, between its markers."""
    full = results["full"]
    lines = [
        BEGIN,
        "## Peak memory of a DPO step: chunked log-probabilities against the full logits",
        "",
        f"`{command}`. One DPO step (after one warm-up step) on a 4-bit NF4 Llama of "
        f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, vocabulary "
        f"{config['vocab_size']:,} (Llama-3's): {settings.pairs} pair(s) = {2 * settings.pairs} rows of "
        f"{settings.seq_len} tokens, every token scored; policy forward of both sides, the reference's (the adapter",
        f"off, no gradients), backward, AdamW; LoRA r={settings.rank} on every linear layer but the head, "
        f"`upcast=\"norms\"`, {settings.threads} threads. Each loss runs in a process of its own. Live peak: tensor",
        "storages alive at once (`PeakMeter`, the model's own included); peak RSS: VmHWM reset before the step",
        "(Python and the libraries included); predicted: `kbitprep inspect --memory --method dpo` for the step.",
        "",
        "TRL is not the full-logit baseline here: TRL 1.16's DPOTrainer computes its LM head in tiles too (its",
        "fused LM-head path), so the full logits are kbitprep's own `--loss full` (the model's logits, then",
        "log-softmax in fp32), which is what a DPO implementation that takes `model(...).logits` holds.",
        "",
        "| log-probabilities | live peak (MiB) | vs full | predicted (MiB) | predicted vs live | peak RSS (MiB) "
        "| vs full | loss at step 2 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, label in PREFERENCE_LOSSES.items():
        row = results[name]
        lines.append(
            f"| {label} | {_mib(row['live_peak_bytes'])} | {row['live_peak_bytes'] / full['live_peak_bytes']:.3f}x "
            f"| {_mib(row['predicted_bytes'])} | "
            f"{(row['predicted_bytes'] - row['live_peak_bytes']) / row['live_peak_bytes']:+.1%} "
            f"| {_mib(row['peak_rss_bytes'])} | {row['peak_rss_bytes'] / full['peak_rss_bytes']:.3f}x "
            f"| {row['losses'][1]:.6f} |")
    lines.append(END)
    return "\n".join(lines)


def write_preference_memory(text: str, path: Path) -> None:
    """Replace this benchmark's section of BENCHMARKS.md at `path` (appended when absent); nothing else changes."""
    from .memory_sweep import write_section

    write_section(text, path, begin=BEGIN, end=END)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One loss's worker for the DPO step memory benchmark.")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--loss", required=True, choices=list(PREFERENCE_LOSSES))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--settings", required=True, help="PreferenceMemorySettings as JSON")
    args = parser.parse_args(argv)
    from .pace import treat_bf16_as_configured

    treat_bf16_as_configured()
    figures = measure(args.checkpoint, args.loss, PreferenceMemorySettings(**json.loads(args.settings)))
    args.output.write_text(json.dumps(figures), encoding="utf-8")


if __name__ == "__main__":
    main()
