"""The memory model over the published shapes' full matrix and over every causal LM transformers ships: `make sweep`.

1. The thirteen published shapes of tests/published_shapes.py, each saved as a folder with only
   config.json, sized at seq 2048 and 8192, batch 1 and 4, each quantization (nf4, fp4, int8,
   none) and each loss (chunked, full), with the LM head upcast in pieces as on a CPU without
   fast bf16. Each prediction must lie between the weights' bytes and the weights plus a
   generous bound, and grow with the sequence length and the batch size. Each shape runs in
   a process of its own, whose time and peak RSS are checked (under 60 s and 2 GiB).
2. Every architecture in transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` built from its
   default config (seq 256, batch 1, nf4, chunked): a prediction, or kbitprep's one-line
   reason; any other exception is a failure of the sweep.

The counts and the reasons, grouped, go into BENCHMARKS.md's section "Memory model sweep"
(between its markers; the rest of the file is not touched). Exit status 1 on any failure.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- memory-sweep: begin -->", "<!-- memory-sweep: end -->"
QUANTIZE, LOSSES, SEQS, BATCHES = ("nf4", "fp4", "int8", "none"), ("chunked", "full"), (2048, 8192), (1, 4)


def _shape_matrix(name: str, queue: Any) -> None:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from kbitprep.app.memory.estimate import MemorySettings, TrainingSkeleton
    from kbitprep.precision import override_fast_dtypes
    from published_shapes import PUBLISHED, generous_bound, save_config, weight_bytes

    started, failures, cases = time.perf_counter(), [], 0
    folder = save_config(name, Path(tempfile.mkdtemp()))
    with override_fast_dtypes("cpu", set()):
        for quantize in QUANTIZE:
            for loss in LOSSES:
                settings = MemorySettings(quantize=quantize, loss=loss, lora_r=16, upcast="norms", device="cpu",
                                          seq_len=2048, batch_size=1)
                try:
                    skeleton = TrainingSkeleton(folder, settings)
                    totals = {(b, s): skeleton.estimate(b, s) for b in BATCHES for s in SEQS}
                except Exception as error:  # noqa: BLE001 - recorded as the case's failure
                    failures.append(f"{quantize} {loss}: {type(error).__name__}: {error}")
                    continue
                for (batch, seq), estimate in totals.items():
                    cases += 1
                    low = weight_bytes(estimate)
                    # the preparation checkpoints only quantized models
                    high = low + generous_bound(PUBLISHED[name], batch, seq, checkpointed=quantize != "none")
                    if not low < estimate.total < high:
                        failures.append(f"{quantize} {loss} b{batch} s{seq}: {estimate.total} not in ({low}, {high})")
                base = totals[1, 2048].total
                if not (base < totals[1, 8192].total and base < totals[4, 2048].total):
                    failures.append(f"{quantize} {loss}: does not grow with seq and batch")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put({"name": name, "cases": cases, "failures": failures, "seconds": time.perf_counter() - started,
               "rss": rss})


def run_matrix() -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from published_shapes import PUBLISHED

    context = multiprocessing.get_context("spawn")
    rows = []
    for name in PUBLISHED:
        queue = context.Queue()
        process = context.Process(target=_shape_matrix, args=(name, queue))
        process.start()
        row = queue.get(timeout=600)
        process.join()
        for limit, key, bound in (("time", "seconds", 60), ("memory", "rss", 2 * 2**30)):
            if row[key] > bound:
                row["failures"].append(f"{limit} {row[key]:.0f} over {bound}")
        print(f"{name}: {row['cases']} cases, {row['seconds']:.1f} s, {row['rss'] / 2**30:.2f} GiB RSS, "
              f"{len(row['failures'])} failures {row['failures'][:2]}", flush=True)
        rows.append(row)
    return rows


def _architecture(model_type: str) -> dict[str, Any]:
    import warnings

    from transformers import AutoConfig

    from kbitprep.app.memory.estimate import MemorySettings, estimate_memory
    from kbitprep.errors import KbitPrepError

    warnings.simplefilter("ignore")
    started = time.perf_counter()
    try:
        config = AutoConfig.for_model(model_type)
    except Exception as error:  # noqa: BLE001 - a default config transformers itself refuses: not in the count
        return {"arch": model_type, "status": "no default config", "why": type(error).__name__}
    try:
        estimate = estimate_memory(config, MemorySettings(seq_len=256, batch_size=1, lora_r=8, device="cpu",
                                                          loss="chunked"))
        return {"arch": model_type, "status": "prediction", "total": estimate.total,
                "seconds": time.perf_counter() - started}
    except KbitPrepError as error:
        return {"arch": model_type, "status": "reason", "why": str(error).splitlines()[0],
                "seconds": time.perf_counter() - started}
    except Exception as error:  # noqa: BLE001 - a failure of the sweep: the product let a library error through
        return {"arch": model_type, "status": "unhandled", "why": f"{type(error).__name__}: {str(error)[:200]}"}


def run_architectures() -> list[dict[str, Any]]:
    import logging

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    logging.disable(logging.WARNING)
    rows = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        row = _architecture(model_type)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _group(why: str) -> str:
    """The reason without the model's own names, so that equal reasons group."""
    for marker in ("; the model's linear layers are", "; measure this model", "; check the config"):
        why = why.split(marker)[0]
    return why.split(" (")[0] if why.startswith("--target-modules") else why


def render(matrix: list[dict[str, Any]], archs: list[dict[str, Any]], seconds: float) -> str:
    import transformers

    buildable = [row for row in archs if row["status"] != "no default config"]
    answered = [row for row in buildable if row["status"] == "prediction"]
    reasons = collections.Counter(_group(row["why"]) for row in buildable if row["status"] == "reason")
    lines = [BEGIN, "## Memory model sweep (`make sweep`)", "",
             f"`make sweep` (benchmarks/memory_sweep.py), transformers {transformers.__version__}, "
             f"{seconds / 60:.1f} minutes on this machine.", "",
             "**Published shapes, full matrix** (config.json only; seq 2048/8192 x batch 1/4 x nf4/fp4/int8/none x "
             "chunked/full; each prediction between the weights' bytes and weights + a generous bound, growing with "
             "seq and batch; one process per shape):", "",
             "| model | cases | failures | seconds | peak RSS |", "|---|---:|---:|---:|---:|"]
    for row in matrix:
        lines.append(f"| {row['name']} | {row['cases']} | {len(row['failures'])} | {row['seconds']:.1f} | "
                     f"{row['rss'] / 2**30:.2f} GiB |")
    lines += ["", f"**Every causal LM transformers ships** (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, {len(archs)} "
              f"model types; {len(buildable)} build from their default config): **{len(answered)} give a "
              f"prediction**, {sum(reasons.values())} give kbitprep's reason, "
              f"{sum(row['status'] == 'unhandled' for row in buildable)} let another error through.", "",
              "| reasons (grouped) | architectures |", "|---|---:|"]
    for why, count in reasons.most_common():
        lines.append(f"| {why.replace('|', '/')} | {count} |")
    unhandled = [row for row in buildable if row["status"] == "unhandled"]
    if unhandled:
        lines += ["", "Errors let through: " + "; ".join(f"{row['arch']} ({row['why'][:80]})" for row in unhandled)]
    return "\n".join([*lines, END])


def write_section(text: str, path: Path = REPO_ROOT / "BENCHMARKS.md", *, begin: str = BEGIN,
                  end: str = END) -> None:
    """Replace one section of BENCHMARKS.md, between its markers (appended when it has none); nothing else changes."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + text + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(current, encoding="utf-8")


def main() -> int:
    started = time.perf_counter()
    matrix = run_matrix()
    archs = run_architectures()
    write_section(render(matrix, archs, time.perf_counter() - started))
    failed = sum(len(row["failures"]) for row in matrix) + sum(row["status"] == "unhandled" for row in archs)
    print(f"{failed} failures", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
