"""FSDP-QLoRA memory: per-process parameter bytes and peak RSS with the 4-bit base sharded.

The model is Llama-3.2-1B's published shape cut to 4 of its 16 decoder layers (505M
parameters: the 262M-parameter embedding, tied to the head, stays whole in shape), saved
with seeded random bf16 weights. For N = 1 and N = 2 processes (gloo, CPU), `torchrun`
starts `kbitprep.app.distributed.fsdp.load_sharded` exactly as `finetune --fsdp` does (rank 0 loads
NF4 and sends each tensor; every rank keeps its rows), then runs one forward/backward
step; each rank reports the bytes of its parameter shards and its peak resident memory.

Run alone: `python benchmarks/sharded.py` (prints the figures), or as part of `make bench`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script (also by torchrun): make `benchmarks` importable
    sys.path[0] = str(REPO_ROOT)

from benchmarks.pace import Progress  # noqa: E402
from benchmarks.shapes import PUBLISHED_CONFIGS  # noqa: E402

__all__ = ["LLAMA_3_70B_CONFIG", "SHARDED_CONFIG", "SHARDED_LAYERS", "TINY_SHARDED_CONFIG", "ShardedResult",
           "ShardedRun", "measure_sharded"]

SHARDED_LAYERS = 4
SHARDED_CONFIG: Mapping[str, Any] = {**PUBLISHED_CONFIGS["Llama-3.2-1B"], "num_hidden_layers": SHARDED_LAYERS}
# https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json (the fields that shape the weights)
LLAMA_3_70B_CONFIG: Mapping[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "hidden_act": "silu",
    "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
TINY_SHARDED_CONFIG: Mapping[str, Any] = {**SHARDED_CONFIG, "hidden_size": 64, "intermediate_size": 128,
                                          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                          "vocab_size": 256}


@dataclasses.dataclass(frozen=True)
class ShardedRun:
    """One `torchrun --nproc_per_node N` launch: what each rank held.

    Args:
        processes (int): N.
        parameter_bytes (int): the whole model's parameter bytes (every shard together).
        local_bytes (list[int]): parameter bytes each rank holds after loading.
        peak_rss (list[int]): each rank's peak resident memory, loading and one step included.
        loaded_rss (list[int]): each rank's peak resident memory when loading finished.
        seconds (float): wall time of the launch (start-up, loading, one step).
    """

    processes: int
    parameter_bytes: int
    local_bytes: list[int]
    peak_rss: list[int]
    loaded_rss: list[int]
    seconds: float


@dataclasses.dataclass(frozen=True)
class ShardedResult:
    """N = 1 and N = 2 on the same model, same run."""

    model: str
    parameters: int
    runs: list[ShardedRun]
    inspect_70b: dict[str, Any] = dataclasses.field(default_factory=dict)

    def run(self, processes: int) -> ShardedRun:
        return next(run for run in self.runs if run.processes == processes)

    def bytes_ratio(self, processes: int = 2) -> float:
        """Largest per-process parameter bytes at N over those of one process."""
        return max(self.run(processes).local_bytes) / max(self.run(1).local_bytes)


def measure_sharded(config: Mapping[str, Any] = SHARDED_CONFIG, *, name: str = "Llama-3.2-1B (4 of 16 layers)",
                    processes: Sequence[int] = (1, 2), workdir: Path | None = None,
                    log: Callable[[str], None] = print) -> ShardedResult:
    """Save the model once, then load it sharded over each N in `processes` (one torchrun each)."""
    from benchmarks.checkpoints import save_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="kbitprep-fsdp-") as scratch:
        root = Path(workdir or scratch)
        checkpoint = save_random_checkpoint(config, root / "model")
        parameters = _parameter_count(config)
        runs = []
        progress = Progress("fsdp launches", len(processes), log, unit="launch", every_s=0)
        for count in processes:
            runs.append(_launch(checkpoint, count, root / f"n{count}.json"))
            log(f"  N={count}: per-process parameter bytes {runs[-1].local_bytes}, peak RSS {runs[-1].peak_rss}")
            progress.advance()
        sizing = _inspect_70b(root / "llama-3-70b")
        log(f"  inspect Llama-3-70B --devices 2: {sizing['seconds']:.1f} s")
    return ShardedResult(name, parameters, runs, sizing)


def _inspect_70b(folder: Path) -> dict[str, Any]:
    """`kbitprep inspect --devices 2` on the Llama-3-70B config, in process: seconds and bytes per process."""
    from kbitprep.app.model.inspection import inspect_model

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(LLAMA_3_70B_CONFIG)), encoding="utf-8")
    started = time.perf_counter()
    report = inspect_model(folder, devices=2)
    seconds = time.perf_counter() - started
    sharded = report.sharding["norms"]["fsdp2"]
    return {"seconds": seconds, "per_process": list(sharded.per_process), "parameter_bytes": sharded.parameter_bytes}


def _parameter_count(config: Mapping[str, Any]) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from kbitprep.sizing import load_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(dict(config)))
    return sum(p.numel() for p in model.parameters())


def _launch(checkpoint: Path, processes: int, output: Path) -> ShardedRun:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(Path(__file__).resolve()), "--worker", str(checkpoint), str(output)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun with {processes} process(es) failed:\n{result.stderr[-4000:]}")
    figures = json.loads(output.read_text(encoding="utf-8"))
    return ShardedRun(processes=processes, seconds=time.perf_counter() - started, **figures)


# --- the worker (one per rank, started by torchrun) -------------------------------------


def _worker(checkpoint: str, output: str) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model

    from kbitprep.app.distributed.fsdp import load_sharded, peak_rss_bytes, prepare_for_sharding, shard_stats
    from kbitprep.app.model.loading import check_model_folder, compute_dtype, load_quantized_model
    from kbitprep.app.training.run import linear_layer_names
    from kbitprep.sizing import build_meta_model

    def build(model):
        prepare_for_sharding(model, upcast="norms")
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=linear_layer_names(model)))

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    dtype = compute_dtype(check_model_folder(checkpoint, need_weights=False))
    model = load_sharded(lambda: load_quantized_model(checkpoint, "nf4"),
                         lambda: build_meta_model(checkpoint, quantize="nf4", dtype=dtype), build)
    loaded = shard_stats(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()  # a step gathers every unit once each way
    figures = [None] * dist.get_world_size()
    dist.all_gather_object(figures, (loaded.local_parameter_bytes, loaded.full_parameter_bytes,
                                     loaded.peak_rss_bytes, peak_rss_bytes()))
    if dist.get_rank() == 0:
        Path(output).write_text(json.dumps({
            "parameter_bytes": figures[0][1], "local_bytes": [f[0] for f in figures],
            "loaded_rss": [f[2] for f in figures], "peak_rss": [f[3] for f in figures]}), encoding="utf-8")
    dist.destroy_process_group()


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--worker"]:
        _worker(argv[1], argv[2])
        return 0
    quick = argv[:1] == ["--quick"]
    result = measure_sharded(TINY_SHARDED_CONFIG if quick else SHARDED_CONFIG)
    print(json.dumps(dataclasses.asdict(result), indent=1))
    print(f"per-process parameter bytes at N=2 / N=1: {result.bytes_ratio():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
