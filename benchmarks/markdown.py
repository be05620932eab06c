"""Rendering a run's results as BENCHMARKS.md. Reads the results; never changes them."""

from __future__ import annotations

from collections.abc import Sequence

from kbitprep.report import format_count

from .capture import Emitted, distinct
from .fit import render_fit
from .loss_memory import LOSS_VARIANTS, LossMemorySettings
from .pace import SLOW_BF16_ENV
from .packing import render_packing
from .results import BenchmarkResults, check_targets, ratio_of
from .shapes import published_source
from .training import PATTERN_TOKENS, WARNING_STEPS, WORKER_ENV, TrainingSettings
from .trl_sft import render_trl
from .variants import REFERENCE, VARIANTS

__all__ = ["render"]

_MIB = 1024 * 1024


def _mib(count: int) -> str:
    return f"{count / _MIB:,.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> list[str]:
    """A markdown table; `align` has one letter per column: l(eft) or r(ight), default all right but the first."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"] + \
           ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _label(name: str) -> str:
    return VARIANTS[name].label


def _header(results: BenchmarkResults) -> list[str]:
    machine = results.machine
    ram = f"{machine.ram_bytes / 1024 ** 3:.1f} GiB" if machine.ram_bytes else "unknown"
    load = ", ".join(f"{value:.2f}" for value in machine.load_average) if machine.load_average else "unknown"
    lines = [
        "# Benchmarks: kbitprep against the reference",
        "",
        "Written by `benchmarks/run.py`; do not edit by hand, re-run it. Every ratio compares kbitprep with",
        "the reference, `peft.prepare_model_for_kbit_training`, measured in the same run.",
        "",
        "## How this was made",
        "",
        "```bash",
        "make bench                       # = .venv/bin/python benchmarks/run.py",
        "```",
        "",
        f"This run: `{results.command}`, started {results.started_utc}, took {results.duration_s / 60:.1f} min.",
        "",
    ]
    rows = [
        ("CPU", machine.cpu),
        ("cores", f"{machine.cores} (torch's default: {machine.torch_threads} threads; training: see section 2)"),
        ("RAM", ram),
        ("load average at start (1/5/15 min)", load),
        ("platform", machine.platform),
        ("Python", machine.python),
        *((package, version) for package, version in machine.packages.items()),
        ("git commit", machine.commit or "unknown"),
    ]
    return lines + _table(("machine", ""), rows, "ll") + [""]


def _targets(results: BenchmarkResults) -> list[str]:
    rows = [(target.name, measured, {True: "met", False: "**missed**", None: "not measured"}[met])
            for target, measured, met in check_targets(results)]
    return ["## Targets", ""] + _table(("target", "measured", ""), rows, "lrl") + [""]


def _footprint(results: BenchmarkResults) -> list[str]:
    names = [name for name in VARIANTS]
    lines = [
        "## 1. Prepared footprint of real model shapes (4-bit NF4, bf16)",
        "",
        "Parameter + buffer bytes (shared tensors once) after each preparation. The floor is the",
        "quantized model before any cast. Shapes are the published configs (sources below), built on the",
        "meta device by `kbitprep.sizing.build_meta_model` with bitsandbytes layers as a real load has them;",
        "kbitprep's figures are `plan_preparation(...).bytes_after`, the reference's come from running",
        "`peft.prepare_model_for_kbit_training` itself on a second meta model (it works there: a cast on meta",
        "changes only the dtype), and are cross-checked against its rule (every fp16/bf16 parameter that is",
        "not a `Params4bit` -> fp32) applied by hand.",
        "",
        "MiB, and the ratio to the reference:",
        "",
    ]
    header = ["model", "parameters", "floor", *(_label(name) for name in names),
              *(f"{_label(name)} / ref" for name in names if name != REFERENCE.name), "floor / ref"]
    rows = []
    for row in results.footprint:
        rows.append([row.model, format_count(row.parameters), _mib(row.floor), *(_mib(row.after[n]) for n in names),
                     *(f"{row.ratio(n):.3f}x" for n in names if n != REFERENCE.name),
                     f"{row.floor / row.after[REFERENCE.name]:.3f}x"])
    lines += _table(header, rows) + ["", "Exact bytes:", ""]
    exact = [[row.model, f"{row.floor:,}", *(f"{row.after[n]:,}" for n in names),
              "yes" if row.reference_rule == row.after[REFERENCE.name] else f"**no** ({row.reference_rule:,})"]
             for row in results.footprint]
    lines += _table(["model", "floor", *(_label(n) for n in names), "reference = its rule"], exact)
    largest = max(results.footprint, key=lambda row: row.parameters)
    lines += ["", f"Sizing from the config alone (building the meta skeleton and planning it once, as "
                  f"`kbitprep inspect` does) took {largest.sizing_s:.1f} s for {largest.model}, the largest shape."]
    sources = ", ".join(f"{row.model}: `{published_source(row.model)}`" for row in results.footprint
                        if _has_source(row.model))
    if sources:
        lines += ["", f"Configs: `config.json` of {sources} on the Hugging Face Hub (written into "
                      "`benchmarks/shapes.py`). All loaded in bf16; Gemma-2-2B's config names float32, the others",
                  "bfloat16."]
    return lines + [""] + _validation(results)


def _has_source(model: str) -> bool:
    try:
        published_source(model)
    except KeyError:
        return False
    return True


def _validation(results: BenchmarkResults) -> list[str]:
    real = results.real
    if real is None:
        return []
    meta = results.footprint_of(real.model)
    lines = [
        f"### Validation on a real, materialised {real.model}",
        "",
        f"{real.model} built with random bf16 weights, saved, and loaded back with `BitsAndBytesConfig` NF4",
        f"(double quantization, bf16 compute) on CPU, {len(real.loads)} loads in all; each load prepared once,",
        "by one variant, and measured before and after. \"planned\" is kbitprep's plan on the loaded model",
        "(for the reference: its rule), \"meta\" the figure of the table above.",
        "",
    ]
    rows = []
    floors = real.floors()
    floor = floors.pop() if len(floors) == 1 else None
    meta_floor = meta.floor if meta else None
    rows.append(["floor (before preparation)", _fmt(meta_floor), "", _fmt(floor) if floor is not None else "varies!",
                 _agree(meta_floor, floor, floor)])
    for name in VARIANTS:
        if not real.of(name):
            continue
        planned = {load.planned for load in real.of(name)}
        measured = real.measured(name)
        meta_bytes = meta.after[name] if meta else None
        planned_one = planned.pop() if len(planned) == 1 else None
        rows.append([_label(name), _fmt(meta_bytes), _fmt(planned_one), _fmt(measured),
                     _agree(meta_bytes, planned_one, measured)])
    lines += _table(["", "meta", "planned on the real model", "measured after real preparation", "all agree"], rows)
    lines += ["", "Not counted anywhere above, because it is neither a parameter nor a buffer: the 4-bit quantization",
              f"state (absmax, code, nested state), {real.quant_state_bytes:,} bytes "
              f"({_mib(real.quant_state_bytes)} MiB)",
              f"on {real.model}, the same under every variant.", ""]
    return lines


def _fmt(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _agree(*values: int | None) -> str:
    present = [value for value in values if value is not None]
    return "yes, to the byte" if present and len(set(present)) == 1 and len(present) == len(values) else "**no**"


def _training(results: BenchmarkResults) -> list[str]:
    if not results.training:
        return []
    settings = results.training_settings
    config = results.training_config
    reference = results.training[REFERENCE.name]
    lines = [
        "## 2. Training (LoRA on a 4-bit model, CPU)",
        "",
        f"Model: {config['architectures'][0]}, {format_count(results.training_footprint.parameters)} parameters "
        f"(hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']} heads / "
        f"{config['num_key_value_heads']} KV heads, intermediate {config['intermediate_size']}, vocabulary "
        f"{config['vocab_size']:,}, {'tied' if config['tie_word_embeddings'] else 'untied'} LM head), "
        "random bf16 weights "
        "saved once and loaded by every",
        f"variant with NF4 (double quantization, {_compute(results)}). LoRA r="
        f"{settings.rank}, alpha={2 * settings.rank}, dropout 0 on all linear layers "
        f"({reference.trainable_parameters:,} trainable parameters), AdamW lr {settings.lr}, "
        f"{_steps_run(reference.steps, settings)} of batch {settings.batch_size} x {settings.seq_len} tokens, "
        f"seed {settings.seed} for weights, adapters and data. The data walks a fixed random successor table over "
        f"{PATTERN_TOKENS} token ids, "
        "so the loss falls within a few steps. Gradient checkpointing is on (each preparation's default).",
        "",
        "Each variant runs in a process of its own, all three alive at once and taking turns: one step each per",
        "round, in an order rotated every round, the others idle meanwhile, so a busy spell of a shared machine",
        f"falls on every variant alike. Each worker uses {_threads(settings)}, and glibc's mmap threshold is fixed",
        f"(`{_env(WORKER_ENV)}`) so that freed tensors leave the process at once and peak RSS follows the",
        "tensors alive at the peak rather than the allocator's history (without it, two identical runs differed",
        "by tens of MiB).",
        "",
        "Peak RSS is the kernel's high-water mark (VmHWM) of the variant's process, loading included; the peak",
        "from preparation on is the same mark, reset right after loading. (`getrusage(RUSAGE_SELF).ru_maxrss` is",
        "not used: Linux carries it across exec, so each worker reports the parent's size when that is larger;",
        "here it reads " + ", ".join(f"{_mib(r.ru_maxrss_bytes)}" for r in results.training.values())
        + " MiB in the same order as the table.) Step time is the median",
        f"over steps {settings.warmup + 1}-{reference.steps}, after {settings.warmup} warm-up step(s); CPU time is the",
        "process's CPU seconds per step (all threads), steadier than wall time on a shared machine.",
        "",
    ]
    header = ["variant", "peak RSS (MiB)", "vs ref", "peak from preparation (MiB)", "vs ref", "median step (s)",
              "vs ref", "median CPU per step (s)", "vs ref", "final loss", "vs ref"]
    rows = []
    for name, result in results.training.items():
        from_prepare = result.peak_rss_from_prepare_bytes
        reference_from_prepare = reference.peak_rss_from_prepare_bytes
        rows.append([
            _label(name), _mib(result.peak_rss_bytes), f"{result.peak_rss_bytes / reference.peak_rss_bytes:.3f}x",
            _mib(from_prepare) if from_prepare else "n/a",
            f"{from_prepare / reference_from_prepare:.3f}x" if from_prepare and reference_from_prepare else "n/a",
            f"{result.median_step_s:.3f}", f"{result.median_step_s / reference.median_step_s:.3f}x",
            f"{result.median_step_cpu_s:.3f}", f"{result.median_step_cpu_s / reference.median_step_cpu_s:.3f}x",
            f"{result.final_loss:.4f}", f"{(result.final_loss - reference.final_loss) / reference.final_loss:+.2%}",
        ])
    lines += _table(header, rows) + [""] + _memory_note(results) + \
        ["", "Loss curve (and each step's wall time in seconds):", ""]
    names = list(results.training)
    curve = [[step + 1, *(f"{results.training[n].losses[step]:.4f} ({results.training[n].step_wall_s[step]:.2f})"
                          for n in names)] for step in range(reference.steps)]
    return lines + _table(["step", *(_label(n) for n in names)], curve) + [""]


def _threads(settings) -> str:
    if settings.threads is None:
        return "torch's default number of threads"
    return f"{settings.threads} torch thread" + ("s" if settings.threads != 1 else "") + \
        " (a thread waiting for a busy core stalls every parallel op)"


def _env(variables: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in variables.items())


def _memory_note(results: BenchmarkResults) -> list[str]:
    """Why the peak-RSS saving of "norms" is smaller than its saving in weights."""
    weights = results.training_footprint
    settings = results.training_settings
    saved = weights.after[REFERENCE.name] - weights.after["norms"]
    logits = settings.batch_size * settings.seq_len * results.training_config["vocab_size"]
    return [
        f"Weights alone (the plan, as in section 1): {_mib(weights.after[REFERENCE.name])} MiB after the reference, "
        f"{_mib(weights.after['norms'])} MiB after \"norms\", {_mib(saved)} MiB less. The peak-RSS saving is smaller,",
        "most likely because the peak falls in the loss and its backward pass, where \"norms\" keeps the LM head's",
        "logits in bf16 and transformers' loss makes an fp32 copy of them (gradients likewise), while the",
        "reference's logits are fp32 from the start;",
        f"each bf16 logits tensor here ({settings.batch_size} x {settings.seq_len} x "
        f"{results.training_config['vocab_size']:,} values) is {_mib(logits * 2)} MiB.",
    ]


def _prepare_time(results: BenchmarkResults) -> list[str]:
    real = results.real
    if real is None:
        return []
    reference = real.median_prepare_s(REFERENCE.name)
    repeats = len(real.of(REFERENCE.name))
    rows = [[_label(name), f"{real.median_prepare_s(name) * 1000:.1f}",
             f"{real.median_prepare_s(name) / reference:.2f}x",
             ", ".join(f"{load.prepare_s * 1000:.0f}" for load in real.of(name))]
            for name in VARIANTS if real.of(name)]
    return [
        f"## 3. Preparation time ({real.model}, real 4-bit model)",
        "",
        "Wall time of the preparation call alone, on a fresh load each time (the model is reloaded from disk",
        f"between runs; variants take turns), median of {repeats}. kbitprep's time includes making its plan.",
        f"Loading took {min(real.load_s):.1f}-{max(real.load_s):.1f} s per load, for comparison.",
        "",
    ] + _table(["variant", "median (ms)", "vs ref", "each run (ms)"], rows) + [""]


def _warning_list(emitted: list[dict[str, str]]) -> str:
    if not emitted:
        return "none"
    items = distinct([Emitted(**item) for item in emitted])
    return "<br>".join(f"{count}x `{item.category}`: {item.message}" for item, count in items)


def _warnings(results: BenchmarkResults) -> list[str]:
    if not results.training:
        return []
    rows = []
    for name, result in results.training.items():
        both = result.warnings_prepare_and_steps
        rows.append([_label(name), len(both), len(set(map(_key, both))), _warning_list(result.warnings_prepare),
                     _warning_list(result.warnings_steps), _warning_list(result.warnings_lora)])
    return [
        "## 4. Warnings",
        "",
        "Python warnings and warning-level log lines (transformers reports some through its logger) emitted",
        f"while preparing and during the first {WARNING_STEPS} training steps, in the training processes above,",
        "every occurrence counted (filter \"always\"). Attaching LoRA (`peft.get_peft_model`, the same call for",
        "every variant) is counted apart: it triggers transformers' FutureWarning about `is_gradient_checkpointing`",
        "whatever prepared the model, which is peft's to fix, not a preparation's.",
        "",
    ] + _table(["variant", "count", "distinct", "from preparation", f"from {WARNING_STEPS} training steps",
                "from attaching LoRA (apart)"], rows, "lrrlll") + [""]


def _key(item: dict[str, str]) -> tuple[str, str, str]:
    return item["kind"], item["category"], item["message"]


def _compute(results: BenchmarkResults) -> str:
    """The 4-bit layers' compute dtype and why: the product's rule for this CPU (`pace.bench_compute_dtype`)."""
    dtype = str(results.compute_dtype).removeprefix("torch.")
    forced = f", bf16 treated as slow by `{SLOW_BF16_ENV}=1`" if results.bf16_treated_slow else ""
    return f"{dtype} compute: what kbitprep picks on this CPU{forced}"


def _loss_steps(results: BenchmarkResults) -> int:
    return min(len(run.losses) for runs in results.loss_memory.values() for run in runs.values())


def _steps_run(run: int, settings: TrainingSettings | LossMemorySettings) -> str:
    """"16 steps", or "6 of 16 steps (...)" where the section's time budget cut the rounds."""
    if run >= settings.steps:
        return f"{run} steps"
    budget = settings.budget_s or 0
    return (f"{run} of {settings.steps} steps (**fewer: the section's time budget of {budget / 60:.1f} min**, "
            "judged from the rounds done, ran out on this CPU)")


def _loss_memory(results: BenchmarkResults) -> list[str]:
    """Section 5: the chunked loss against transformers' loss, each after its own preparation."""
    settings = results.loss_memory_settings
    if settings is None or not results.loss_memory:
        return []
    speed = results.bf16_speed
    lines = [
        "## Training peak memory with the chunked loss",
        "",
        "The reference pipeline (peft's preparation, then transformers' own loss: the full logits, as the Trainer",
        "computes it) against kbitprep's command defaults (`upcast=\"norms\"`, then `kbitprep.causal_lm_loss`:",
        "the LM head and cross-entropy over chunks of positions). Same checkpoint, LoRA (r="
        f"{settings.rank}, every linear layer), AdamW, seed and data as section 2; every token is trained, so the",
        "chunked loss drops no position and its saving is the chunking alone. Each variant is a process of its",
        f"own ({_threads(settings)}); the two take turns, one step each per round. Peak = VmHWM, reset after",
        f"loading: the peak from preparation to the end of {_steps_run(_loss_steps(results), settings)} of batch "
        f"{settings.batch_size} x "
        f"{settings.seq_len}. Then, for each length, the mark is reset and one step run: the peak per length, and",
        "its least-squares slope per token of the batch. Median step over steps "
        f"{settings.warmup + 1}-{_loss_steps(results)}. The 4-bit layers run in {_compute(results)}.",
        "",
        f"CPU: {results.machine.cpu}. bf16 speed: a frozen `Linear(256, 32000)` on 512 tokens, forward + backward,"
        f" 1 thread: fp32 {speed.get('float32', 0) * 1000:.0f} ms, bf16 {speed.get('bfloat16', 0) * 1000:.0f} ms "
        f"({speed.get('bfloat16', 0) / speed.get('float32', 1):.2f}x fp32's time)"
        + (" -- a CPU with fast bf16." if speed.get("bfloat16", 0) <= speed.get("float32", 0) else
           " -- a CPU where bf16 is slow."),
        "",
    ]
    header = ["model", "variant", "peak from preparation (MiB)", "vs ref", "median step (s)", "vs ref",
              "final loss", "vs ref", *(f"peak at {t:,} tokens (MiB)" for t in _token_counts(results)),
              "KiB per token", "vs ref"]
    rows = []
    for label, runs in results.loss_memory.items():
        reference = runs["reference"]
        for name, run in runs.items():
            rows.append([label, LOSS_VARIANTS[name][0], _mib(run.peak_from_prepare_bytes),
                         f"{run.peak_from_prepare_bytes / reference.peak_from_prepare_bytes:.3f}x",
                         f"{run.median_step_s:.2f}", f"{run.median_step_s / reference.median_step_s:.3f}x",
                         f"{run.final_loss:.4f}",
                         f"{(run.final_loss - reference.final_loss) / reference.final_loss:+.3%}",
                         *(_mib(run.peak_by_tokens[str(t)]) for t in _token_counts(results)),
                         f"{run.slope_bytes_per_token / 1024:,.1f}",
                         f"{ratio_of(run.slope_bytes_per_token, reference.slope_bytes_per_token):.3f}x"])
    lines += _table(header, rows, "ll" + "r" * (len(header) - 2)) + [""]
    return lines + _loss_plans(results)


def _token_counts(results: BenchmarkResults) -> list[int]:
    settings = results.loss_memory_settings
    return [settings.batch_size * length for length in settings.seq_lens] if settings else []


def _loss_plans(results: BenchmarkResults) -> list[str]:
    lines = ["How kbitprep computed each loss (`kbitprep.plan_loss`):", ""]
    for label, runs in results.loss_memory.items():
        plan = runs["kbitprep"].loss_plan or {}
        config = results.loss_memory_configs.get(label, {})
        lines.append(f"- {label} (vocabulary {config.get('vocab_size', 0):,}, hidden {config.get('hidden_size', 0)},"
                     f" {config.get('num_hidden_layers', 0)} layers): {plan.get('loss')} loss, head: "
                     f"{plan.get('head')}, matmul in {plan.get('compute_dtype')} ({plan.get('precision')}), "
                     f"{plan.get('chunk_tokens')} positions per chunk, {_mib(plan.get('chunk_bytes', 0))} MiB per "
                     "chunk.")
    return lines + [""]


def _sharded(results: BenchmarkResults) -> list[str]:
    sharded = results.sharded
    if sharded is None:
        return []
    one = sharded.run(1)
    rows = []
    for run in sharded.runs:
        for rank, (local, peak, loaded) in enumerate(zip(run.local_bytes, run.peak_rss, run.loaded_rss, strict=True)):
            rows.append((f"N={run.processes}", rank, _mib(local), f"{local / max(one.local_bytes):.3f}x",
                         _mib(loaded), _mib(peak), f"{run.seconds:.0f} s" if rank == 0 else ""))
    return [
        f"## FSDP-QLoRA: the 4-bit base sharded across processes ({sharded.model}, CPU, gloo)",
        "",
        f"{sharded.parameters / 1e6:.0f}M parameters (Llama-3.2-1B's published shape with fewer decoder layers), "
        "random bf16 weights, loaded in NF4 by `kbitprep.app.distributed.fsdp.load_sharded` under `torchrun --nproc_per_node N`",
        "exactly as `finetune --fsdp` loads it (rank 0 reads the folder and sends each tensor; every rank keeps",
        "its rows, FSDP2 units per decoder layer plus the root), then one forward/backward step. Parameter bytes",
        "are the rank's local shards (4-bit packed bytes and absmax, bf16 embedding, fp32 norms, LoRA); both",
        "launches in this run.",
        "",
        *_table(("processes", "rank", "parameter bytes", "vs N=1", "peak RSS after loading", "peak RSS after a step",
                 "launch"), rows, "lrrrrrr"),
        "",
        "Rank 0 reads the whole model, so its peak RSS stays near one process's; the other ranks hold only",
        "their shards (plus Python, torch and the libraries) while loading. The host never holds N copies while",
        "loading. During a step each rank also holds the unit FSDP has gathered, here the root with its 525 MB",
        "bf16 embedding (all-gather buffer and unsharded copy), which is what the last RSS column adds.",
        "",
        *_inspect_70b(sharded.inspect_70b),
    ]


def _inspect_70b(sizing: dict) -> list[str]:
    if not sizing:
        return []
    return [f"`kbitprep inspect` on the Llama-3-70B config with `--devices 2` (config.json only, meta device, "
            f"every upcast policy, both wrappers) took {sizing['seconds']:.1f} s: {_mib(sizing['per_process'][0])} MiB "
            f"per process of {_mib(sizing['parameter_bytes'])} MiB (upcast \"norms\").", ""]


def _notes(results: BenchmarkResults) -> list[str]:
    return [
        "## Reading these numbers",
        "",
        "- Footprints are exact and deterministic; times are not. This machine's cores may be shared (see the",
        "  load average above); the training steps take turns to share out the noise, and the CPU-time column",
        "  helps when wall times jump. Re-run `make bench` to see the spread.",
        "- The training model is small and its vocabulary large for its size, so the logits weigh more in its peak",
        "  than in a 7B model's; on a GPU the fixed cost of Python and the libraries is not in device memory.",
        "- Step times are CPU times through bitsandbytes' CPU backend; on a GPU, fp32 against bf16 costs differently.",
        "- Peak RSS includes Python, torch and the libraries (a few hundred MiB common to every variant), so its",
        "  ratios are smaller than the footprint ratios.",
        "",
    ]


def render(results: BenchmarkResults) -> str:
    """BENCHMARKS.md for a run."""
    parts = [_header(results), _targets(results), _footprint(results), _training(results), _prepare_time(results),
             _warnings(results), render_packing(results.packing), render_fit(results.fit),
             _loss_memory(results), _sharded(results),
             render_trl(results.trl_settings, results.trl_config, results.trl), _notes(results)]
    return "\n".join(line for part in parts for line in part).rstrip() + "\n"
