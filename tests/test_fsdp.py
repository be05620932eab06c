"""FSDP-QLoRA, checked against one unsharded process: two gloo processes on the CPU
(a CUDA/NCCL variant is marked `gpu`) shard a 4-bit Llama and train its adapters.

Checked: the packed 4-bit bytes and absmax each layer computes with inside its forward
pass are bit-identical to an unsharded load's; every process holds about half the
parameter bytes; the loss at every step and the adapter after training match a plain
one-process loop (bitsandbytes' own `Linear4bit`, no FSDP) on the same global batch,
within 1e-5 (float32 model: only summation order and padding length differ); resuming
from a checkpoint reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from kbitprep.app.data.jsonl import read_jsonl
from kbitprep.app.data.tokenize import CausalLMCollator, tokenize_rows
from kbitprep.app.training.run import FinetuneSettings, linear_layer_names
from kbitprep.app.model.loading import (
    check_model_folder,
    compute_dtype,
    load_quantized_model,
    load_tokenizer,
)
from kbitprep.sharding import plan_sharding

DEMO_DATA = Path(__file__).resolve().parents[1] / "src" / "kbitprep" / "data" / "demo.jsonl"
STEPS, GLOBAL_BATCH, WORLD = 3, 4, 2
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}  # losses (relative) and adapter values (absolute)


def _settings(model_dir: Path, out: Path, batch_size: int) -> FinetuneSettings:
    return FinetuneSettings(str(model_dir), str(DEMO_DATA), str(out), lora_r=4, lora_dropout=0.0, lr=1e-3,
                            batch_size=batch_size, max_steps=STEPS, save_steps=2, seq_len=48, upcast="norms")


def _build(settings: FinetuneSettings):
    """Prepare and attach LoRA, the same way on every process and in the reference."""
    def build(model):
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        from kbitprep.app.distributed.fsdp import prepare_for_sharding

        prepare_for_sharding(model, upcast=settings.upcast)
        set_seed(settings.seed)
        config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                            target_modules=linear_layer_names(model), task_type="CAUSAL_LM")
        return get_peft_model(model, config)
    return build


def _data(settings: FinetuneSettings):
    return tokenize_rows(read_jsonl(settings.data), load_tokenizer(settings.model), settings.seq_len)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny Llama with seeded weights, in float32 so one and two processes agree to 1e-5."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kbitprep.app.demo import DEMO_MODEL, build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("fsdp") / "tiny")
    config = AutoConfig.from_pretrained(DEMO_MODEL, local_files_only=True)
    config.dtype = "float32"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


# --- the processes ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(worker: Any, *args: Any, world: int = WORLD) -> None:
    import torch.multiprocessing as mp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    mp.start_processes(_process, args=(world, worker, args), nprocs=world, start_method="spawn")


def _process(rank: int, world: int, worker: Any, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    backend = "nccl" if args[-1] == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def _load_sharded(settings: FinetuneSettings, device: str):
    from kbitprep.app.distributed.fsdp import load_sharded
    from kbitprep.sizing import build_meta_model

    dtype = compute_dtype(check_model_folder(settings.model))
    return load_sharded(lambda: load_quantized_model(settings.model, "nf4"),
                        lambda: build_meta_model(settings.model, quantize="nf4", dtype=dtype),
                        _build(settings), device=None if device == "cuda" else device)  # None: this rank's GPU


def _train_two_ways(rank: int, model_dir: Path, out: Path, device: str) -> None:
    """Train 3 steps sharded (recording the bytes each layer computes with), then resume from step 2."""
    from kbitprep.app.distributed.fsdp import (
        ShardableLinear4bit,
        adapter_state,
        packed_4bit_bytes,
        shard_stats,
    )
    from kbitprep.app.training.sharded_loop import ShardedTraining

    settings = _settings(model_dir, out, GLOBAL_BATCH // WORLD)
    model = _load_sharded(settings, device)
    used: dict[str, bytes] = {}

    def record(name: str, layer: ShardableLinear4bit) -> None:  # inside the forward: FSDP has gathered the layer
        used.setdefault(name, packed_4bit_bytes(layer)[""])

    for name, module in model.named_modules():
        if isinstance(module, ShardableLinear4bit):
            module.register_forward_pre_hook(lambda layer, args, name=name: record(name, layer))
    stats = shard_stats(model)
    frozen = sum(p.to_local().numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    run = ShardedTraining(model, _data(settings), settings, 0, out / "checkpoints")
    history = run.train()
    adapter = adapter_state(model)

    resumed = ShardedTraining(_load_sharded(settings, device), _data(settings), settings, 0, out / "resumed")
    resumed.resume(out / "checkpoints" / "checkpoint-2")
    resumed_history = resumed.train()
    torch.save({"used": used, "stats": stats.to_dict(), "frozen_bytes": frozen, "history": history, "adapter": adapter,
                "resumed_history": resumed_history, "resumed_adapter": adapter_state(resumed.model)},
               out / f"rank{rank}.pt")


# --- the reference: one process, bitsandbytes' own layers, no FSDP ---------------------------


def _reference(model_dir: Path, out: Path, device: str) -> dict[str, Any]:
    import bitsandbytes as bnb

    from kbitprep.app.training.order import global_order
    from kbitprep.app.training.sharded_loop import MAX_GRAD_NORM

    settings = _settings(model_dir, out, GLOBAL_BATCH)
    model = _build(settings)(load_quantized_model(settings.model, "nf4")).to(device)
    packed = {name: module.weight.data.view(torch.uint8).reshape(-1).cpu().numpy().tobytes()
              + module.weight.quant_state.absmax.reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
              for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    data, collate = _data(settings), CausalLMCollator(0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (STEPS - step) / STEPS)
    order, losses = global_order(len(data), settings.seed, 0), []
    model.train()
    for step in range(STEPS):
        batch = collate([data[i] for i in order[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]])
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    adapter = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    return {"packed": packed, "losses": losses, "adapter": adapter}


def _check_against_reference(tiny_llama: Path, out: Path, device: str, tolerance: float) -> None:
    _spawn(_train_two_ways, tiny_llama, out, device)
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    reference = _reference(tiny_llama, out, device)

    planned = plan_sharding(load_quantized_model(tiny_llama, "nf4"), WORLD, upcast="norms")
    for rank, result in enumerate(ranks):  # the 4-bit bytes each process computed with, gathered by FSDP
        assert sorted(result["used"]) == sorted(reference["packed"]) and len(result["used"]) == 14
        assert all(result["used"][name] == reference["packed"][name] for name in reference["packed"])
        assert 0.45 <= result["stats"]["fraction"] <= 0.55
        # What `kbitprep inspect --devices 2` predicts is what each process holds of the base.
        assert result["frozen_bytes"] == planned.per_process[rank]
        assert result["stats"]["buffer_bytes"] == planned.replicated_bytes

    losses = [entry["loss"] for entry in ranks[0]["history"]]
    assert losses == pytest.approx(reference["losses"], rel=tolerance, abs=0)
    assert losses[-1] < losses[0]  # the adapters train
    assert sorted(ranks[0]["adapter"]) == sorted(reference["adapter"])
    for name, tensor in reference["adapter"].items():
        assert torch.allclose(ranks[0]["adapter"][name], tensor, rtol=0, atol=tolerance), name
    assert all(torch.equal(ranks[0]["adapter"][name], ranks[1]["adapter"][name])
               for name in reference["adapter"])  # every rank gathers the same whole adapter

    # Resumed at step 2, the run is the uninterrupted one, bit for bit.
    assert ranks[0]["resumed_history"] == ranks[0]["history"]
    assert all(torch.equal(ranks[0]["resumed_adapter"][n], ranks[0]["adapter"][n]) for n in reference["adapter"])


def test_two_processes_match_one_and_compute_with_the_unsharded_bytes(tiny_llama: Path, tmp_path: Path) -> None:
    _check_against_reference(tiny_llama, tmp_path, "cpu", TOLERANCE["cpu"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_cuda_processes_match_one(tiny_llama: Path, tmp_path: Path) -> None:
    _check_against_reference(tiny_llama, tmp_path, "cuda", TOLERANCE["cuda"])


# --- the command --------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_fsdp_under_torchrun_saves_one_whole_adapter_that_loads_unsharded(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m kbitprep finetune ... --fsdp` on the demo's bf16 tiny Llama."""
    import subprocess
    import sys

    from peft import PeftModel

    from kbitprep import prepare_model_for_kbit_training
    from kbitprep.app.demo import build_tiny_model
    from kbitprep.app.training.sampling import batch_loss, first_batch

    model_dir, run = build_tiny_model(tmp_path / "tiny"), tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "kbitprep", "finetune", str(model_dir), str(DEMO_DATA), "--output", str(run), "--fsdp",
               "--max-steps", "4", "--save-steps", "2", "--batch-size", "2", "--seq-len", "48", "--upcast", "norms"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((run / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 4 and report["settings"]["fsdp"] is True
    assert 0.45 <= report["model"]["sharding"]["fraction"] <= 0.55
    assert sorted(p.name for p in run.iterdir()) == [".kbitprep-manifest.json", "adapter", "loss.png", "report.json",
                                                     "run.yaml"]
    assert result.stdout.count("fine-tuning finished") == 1

    # The adapter, saved once and whole, on an unsharded base prepared as the run prepared it.
    base = prepare_model_for_kbit_training(load_quantized_model(model_dir, "nf4"), upcast="norms")
    with warnings.catch_warnings():  # peft reads a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(base, run / "adapter")
    tokenizer = load_tokenizer(model_dir)
    data = tokenize_rows(read_jsonl(DEMO_DATA), tokenizer, 48)
    loss = batch_loss(model, first_batch(data, 2, tokenizer.pad_token_id))
    assert loss == pytest.approx(report["batch_loss_after"], rel=1e-4)


@pytest.mark.slow
def test_finetune_fsdp_logs_each_step_to_tensorboard_with_the_trainers_schedule(tmp_path: Path) -> None:
    """`--fsdp --report-to tensorboard --lr-scheduler cosine --warmup-steps 1` under torchrun: the sharded loop's
    learning rates are the schedule the Trainer uses (tests/test_schedule.py), and rank 0 alone logs each step."""
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kbitprep.app.demo import build_tiny_model
    from kbitprep.app.config.schedule import schedule

    model_dir, run = build_tiny_model(tmp_path / "tiny"), tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "kbitprep", "finetune", str(model_dir), str(DEMO_DATA), "--output", str(run), "--fsdp",
               "--max-steps", "4", "--batch-size", "2", "--seq-len", "48", "--report-to", "tensorboard",
               "--lr-scheduler", "cosine", "--warmup-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((run / "report.json").read_text())

    settings = FinetuneSettings("m", "d", "o", max_steps=4, lr_scheduler="cosine", warmup_steps=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    scheduler, expected = schedule(optimizer, settings, 4), []
    for _ in range(4):
        expected.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    history = report["loss_history"]
    assert [entry["learning_rate"] for entry in history] == pytest.approx(expected, abs=1e-12)
    assert expected[0] == 0.0 and expected[1] == pytest.approx(settings.lr)

    assert len(list((run / "tensorboard").iterdir())) == 1  # one events file: rank 1 wrote none
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) >= {"train/loss", "train/learning_rate", "train/grad_norm", "memory/peak_bytes"}
    for tag, key in (("train/loss", "loss"), ("train/learning_rate", "learning_rate"), ("train/grad_norm", "grad_norm")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3, 4]
        assert [e.value for e in logged] == pytest.approx([entry[key] for entry in history], rel=1e-6, abs=1e-12)


# --- every feature, one process and two ----------------------------------------------------


def _run_command(arguments: list[str], *, processes: int) -> Any:
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([*launcher, "-m", "kbitprep", "finetune", *arguments], capture_output=True, text=True,
                          env=env, timeout=400)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.slow
def test_two_sharded_processes_train_as_one_process_with_packing_evaluation_schedule_and_tensorboard(
        tmp_path: Path) -> None:
    """One process with batch 2 (the Trainer) and `--fsdp` on two with batch 1 (the sharded loop): the same
    chunked loss, packed rows, held-out evaluation, cosine schedule and TensorBoard log, step for step."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kbitprep.app.demo import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny")
    common = [str(model_dir), str(DEMO_DATA), "--max-steps", "4", "--save-steps", "2", "--seq-len", "48",
              "--lora-dropout", "0", "--lr", "5e-3", "--pack", "--eval-fraction", "0.1", "--eval-steps", "2",
              "--lr-scheduler", "cosine", "--warmup-steps", "1", "--report-to", "tensorboard"]
    runs = {"one": tmp_path / "one", "two": tmp_path / "two"}
    one = _run_command([*common, "--output", str(runs["one"]), "--batch-size", "2"], processes=1)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-4000:]
    two = _run_command([*common, "--output", str(runs["two"]), "--batch-size", "1", "--fsdp"], processes=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    reports = {name: json.loads((path / "report.json").read_text()) for name, path in runs.items()}

    assert reports["two"]["world_size"] == 2 and reports["two"]["settings"]["fsdp"] is True
    for report in reports.values():  # the same loss, computed the same way, on the same packed rows
        assert report["loss"]["loss"] == "chunked" and report["loss"]["reason"] is None
        assert report["data"]["packing"]["packs"] > 0
    assert reports["one"]["loss"]["compute_dtype"] == reports["two"]["loss"]["compute_dtype"]
    steps = {name: report["loss_history"] for name, report in reports.items()}
    assert [e["step"] for e in steps["two"]] == [e["step"] for e in steps["one"]] == [1, 2, 3, 4]
    assert [e["loss"] for e in steps["two"]] == pytest.approx([e["loss"] for e in steps["one"]], rel=2e-3)
    assert [e["learning_rate"] for e in steps["two"]] == pytest.approx(
        [e["learning_rate"] for e in steps["one"]], abs=1e-12)
    evaluations = {name: report["eval_history"] for name, report in reports.items()}
    assert [e["step"] for e in evaluations["two"]] == [e["step"] for e in evaluations["one"]] == [2, 4]
    assert [e["loss"] for e in evaluations["two"]] == pytest.approx(
        [e["loss"] for e in evaluations["one"]], rel=2e-3)
    assert steps["one"][-1]["loss"] < steps["one"][0]["loss"]  # it trains

    adapters = {name: load_file(path / "adapter" / "adapter_model.safetensors") for name, path in runs.items()}
    assert sorted(adapters["two"]) == sorted(adapters["one"])
    assert max(_relative(adapters["two"][key], adapters["one"][key]) for key in adapters["one"]) < 2e-2

    for path in runs.values():  # the TensorBoard hook on both loops: every step, and each evaluation
        assert len(list((path / "tensorboard").iterdir())) == 1  # rank 1 wrote none
        events = EventAccumulator(str(path / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
        assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]


@pytest.mark.slow
def test_a_diverging_sharded_run_stops_on_every_process_before_its_checkpoint(tmp_path: Path) -> None:
    """The divergence guard is a step hook: `--fsdp` stops at the first non-finite step as one process does."""
    from kbitprep.app.demo import build_tiny_model

    model_dir, run = build_tiny_model(tmp_path / "tiny"), tmp_path / "run"
    result = _run_command([str(model_dir), str(DEMO_DATA), "--output", str(run), "--fsdp", "--max-steps", "3",
                           "--save-steps", "1", "--batch-size", "1", "--seq-len", "48", "--lr", "1e30"], processes=2)
    shown = result.stdout + result.stderr
    assert result.returncode != 0, shown[-3000:]
    assert "training diverged at step 2" in shown and "lower --lr (now 1e+30) or --lora-alpha" in shown
    assert not (run / "report.json").exists() and not (run / "adapter").exists()
    # Step 1 was finite and its checkpoint complete; step 2's was never written.
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-1"]
