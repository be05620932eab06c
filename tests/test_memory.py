"""The memory model: its prediction against live tensor bytes measured on real steps, its parts,
its depth extrapolation, the fit search and the budget option."""

from __future__ import annotations

import dataclasses
import json
import types
import warnings
from pathlib import Path

import pytest
import torch

import kbitprep
from kbitprep.app.config.optimizer import make_optimizer
from kbitprep.app.memory import step as step_simulation
from kbitprep.app.memory.live_bytes import LiveBytes, PeakMeter
from kbitprep.app.model.loading import load_quantized_model
from kbitprep.app.model.lora import attach_lora
from kbitprep.app.memory.step import SimulationError
from kbitprep.app.memory.estimate import (MemoryModelError, MemorySettings, TrainingSkeleton, estimate_memory, fit_memory,
                                 parse_memory_size)
from kbitprep.apply import apply_plan
from kbitprep.cli import main
from kbitprep.plan import plan_preparation

from conftest import save_tiny_model

_SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, torch_dtype="bfloat16")
CONFIGS = {
    "llama-5L": {"model_type": "llama", **_SMALL, "num_hidden_layers": 5, "vocab_size": 1000},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512, "vocab_size": 3000,
             "torch_dtype": "bfloat16"},
    # A family named nowhere in kbitprep (test_an_unlisted_family_is_sized_from_its_config checks that).
    "starcoder2": {"model_type": "starcoder2", **_SMALL, "num_hidden_layers": 2, "vocab_size": 2000},
}
SETTINGS = MemorySettings(upcast="norms", lora_r=8, batch_size=2, seq_len=64, loss="full", device="cpu")


def _save(config: dict, folder: Path) -> Path:
    from transformers import AutoConfig

    return save_tiny_model(folder, AutoConfig.for_model(**config), dtype=torch.bfloat16)


def _measured_peak(folder: Path, settings: MemorySettings, steps: int = 2) -> int:
    """Load, prepare, adapt and train as finetune does (its --optim, zero_grad to None); the live peak."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized_model(folder, settings.quantize)
        meter = PeakMeter(model).start()
        try:
            apply_plan(model, plan_preparation(model, upcast=settings.upcast,
                                               use_gradient_checkpointing=settings.gradient_checkpointing))
            model = attach_lora(model, settings)  # MemorySettings carries the LoRA settings finetune's do
            model.train()
            optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                                       types.SimpleNamespace(optim=settings.optim, lr=2e-4))  # as finetune builds it
            rows = settings.batch_size * (1 if settings.method == "sft" else 2)  # a pair is two rows
            ids = torch.randint(0, 100, (rows, settings.seq_len))
            for _ in range(steps):
                batch = {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
                _loss(model, batch, settings.loss, settings.method).backward()
                optimizer.step()
                model.zero_grad()
        finally:
            peak = meter.stop()
    return peak


def _loss(model: torch.nn.Module, batch: dict, loss: str, method: str = "sft") -> torch.Tensor:
    """The loss as the Trainer (full) or kbitprep's chunked loss computes it; a preference method's as its
    trainer does (`preference_loss` on the chosen-then-rejected rows)."""
    if method != "sft":
        from kbitprep.loss import preference_loss

        return preference_loss(model, batch, method, 0.1, loss=loss).loss
    if loss == "full":
        return model(**batch).loss
    from kbitprep.loss import causal_lm_loss

    return causal_lm_loss(model, batch, num_items_in_batch=batch["labels"][:, 1:].numel(), loss=loss)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prediction_is_within_ten_percent_of_the_measured_peak(name: str, tmp_path: Path, single_thread) -> None:
    folder = _save(CONFIGS[name], tmp_path / name)
    predicted = estimate_memory(folder, SETTINGS).total
    measured = _measured_peak(folder, SETTINGS)
    assert abs(predicted - measured) / measured <= 0.10, (predicted, measured)


@pytest.mark.parametrize(("name", "upcast"), [("llama-5L", "norms"), ("gpt2", "all")])
def test_chunked_loss_prediction_is_within_ten_percent_of_the_measured_peak(name: str, upcast: str, tmp_path: Path,
                                                                           single_thread) -> None:
    settings = dataclasses.replace(SETTINGS, loss="chunked", upcast=upcast, seq_len=128)
    folder = _save(CONFIGS[name], tmp_path / name)
    estimate = estimate_memory(folder, settings)
    measured = _measured_peak(folder, settings)
    assert abs(estimate.total - measured) / measured <= 0.10, (estimate.total, measured)
    full = estimate_memory(folder, dataclasses.replace(settings, loss="full"))
    assert estimate.total < full.total  # no (tokens x vocabulary) logits


@pytest.mark.parametrize(("method", "loss", "name"), [("dpo", "chunked", "llama-5L"), ("orpo", "chunked", "llama-5L"),
                                                     ("dpo", "full", "llama-5L"), ("dpo", "chunked", "gpt2")])
def test_preference_step_prediction_is_within_ten_percent_of_the_measured_peak(method: str, loss: str, name: str,
                                                                              tmp_path: Path, single_thread) -> None:
    settings = dataclasses.replace(SETTINGS, loss=loss, method=method, seq_len=128)
    folder = _save(CONFIGS[name], tmp_path / name)
    estimate = estimate_memory(folder, settings)
    measured = _measured_peak(folder, settings)
    assert abs(estimate.total - measured) / measured <= 0.10, (estimate.total, measured)
    # a pair is two rows: the step holds more than a supervised step of the same batch size
    assert estimate.total > estimate_memory(folder, dataclasses.replace(settings, method="sft")).total


def test_without_checkpointing_the_prediction_holds_and_every_layer_keeps_more(tmp_path: Path, single_thread) -> None:
    settings = dataclasses.replace(SETTINGS, gradient_checkpointing=False)
    folder = _save(CONFIGS["llama-5L"], tmp_path / "llama")
    estimate = estimate_memory(folder, settings)
    measured = _measured_peak(folder, settings)
    assert abs(estimate.total - measured) / measured <= 0.10, (estimate.total, measured)
    checkpointed = estimate_memory(folder, SETTINGS)
    assert estimate.component("activations kept") > checkpointed.component("activations kept")


def test_an_unlisted_family_is_sized_from_its_config() -> None:
    package = Path(kbitprep.__file__).parent
    sizing = [*(package / "app" / "memory").rglob("*.py"), package / "sizing.py",
              package / "app" / "model" / "inspection.py"]
    source = "".join(path.read_text() for path in sizing)
    assert "starcoder2" not in source.lower()  # nothing in the memory model knows this family by name
    estimate = estimate_memory(CONFIGS["starcoder2"], SETTINGS)
    assert estimate.component("quantized weights") > 0 and estimate.component("LoRA parameters") > 0
    assert estimate.component("activations kept") > 0


def test_components_sum_to_the_total_and_the_json_carries_them() -> None:
    estimate = estimate_memory(CONFIGS["gpt2"], SETTINGS)
    names = [part.name for part in estimate.components]
    assert names == ["quantized weights", "quantization state", "frozen weights", "fp32 casts", "LoRA parameters",
                     "optimizer state", "gradients", "activations kept", "batch", "transient"]
    assert sum(part.bytes for part in estimate.components) == estimate.total
    data = estimate.to_dict()
    assert data["total_bytes"] == sum(part["bytes"] for part in data["components"]) == estimate.total
    assert max(data["phase_peaks"].values()) == estimate.total
    # AdamW keeps two fp32 moments of every LoRA value, and one step counter per tensor
    lora = estimate.component("LoRA parameters")
    assert 2 * lora < estimate.component("optimizer state") < 2 * lora + 4096


def test_the_depth_extrapolation_equals_the_full_simulation() -> None:
    skeleton = TrainingSkeleton(CONFIGS["llama-5L"], SETTINGS)
    blocks = step_simulation.checkpointed_blocks(skeleton.model)
    batch, loss = skeleton._batch(2, 64), lambda model, inputs: model(**inputs).loss
    extrapolated = step_simulation.simulate_step(skeleton.model, batch, loss)
    full = step_simulation._run(skeleton.model, blocks, batch, loss)  # all five layers
    assert len(blocks) == 5
    ends = {name: moment for name, moment in full.moments.items() if "middle" not in name}
    assert set(extrapolated.moments) == set(ends)
    for name, moment in ends.items():
        assert extrapolated.moments[name].total == pytest.approx(moment.total, rel=1e-3), name
    # a middle layer never peaks above the first and last ones, which is why they are all it takes
    assert full.peak.total == pytest.approx(extrapolated.peak.total, rel=1e-3)
    assert extrapolated.gradient_bytes == full.gradient_bytes


def test_the_fit_search_is_monotone_and_exact_at_the_boundary() -> None:
    skeleton = TrainingSkeleton(CONFIGS["gpt2"], SETTINGS)
    by_batch = [skeleton.estimate(batch, 64).total for batch in range(1, 7)]
    by_seq = [skeleton.estimate(2, seq).total for seq in (16, 32, 48, 64, 80)]
    assert by_batch == sorted(by_batch) and by_seq == sorted(by_seq)
    budget = skeleton.estimate(3, 64).total
    fit = fit_memory(None, SETTINGS, budget, skeleton=skeleton)
    assert fit.largest_batch_size == 3 and fit.fits  # the run asks for batch 2
    longest = fit.largest_seq_len
    assert skeleton.estimate(2, longest).total <= budget < skeleton.estimate(2, longest + 1).total
    tight = fit_memory(None, SETTINGS, budget - 1, skeleton=skeleton)
    assert tight.largest_batch_size == 2
    nothing = fit_memory(None, SETTINGS, 1000, skeleton=skeleton)
    assert (nothing.fits, nothing.largest_batch_size, nothing.largest_seq_len) == (False, 0, 0)


@pytest.mark.parametrize(("text", "expected"), [
    ("24GiB", 24 * 2**30), ("24 GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("16G", 16 * 2**30),
    ("1.5TiB", int(1.5 * 2**40)), ("512MiB", 512 * 2**20), ("1048576", 2**20), ("2kb", 2000),
])
def test_memory_sizes_parse(text: str, expected: int) -> None:
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "24XB", "-5GiB", "0", "0.1", "GiB", "24 Gi B", "1e9"])
def test_bad_memory_sizes_say_what_to_write(text: str) -> None:
    with pytest.raises(MemoryModelError, match="such as 24GiB"):
        parse_memory_size(text)


def test_cli_bad_memory_budget_is_one_line_and_names_the_fix(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIGS["gpt2"]))
    assert main(["inspect", str(folder), "--memory", "24XB"]) == 1
    err = capsys.readouterr().err
    assert "--memory '24XB': not a memory size" in err and "such as 24GiB" in err and "Traceback" not in err


def test_cli_json_carries_the_breakdown_and_the_fit(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIGS["gpt2"]))
    assert main(["inspect", str(folder), "--json", "--seq-len", "64", "--batch-size", "2", "--lora-r", "8",
                 "--loss", "full", "--device", "cpu", "--memory", "1GiB"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["settings"]["seq_len"] == 64 and memory["settings"]["lora_r"] == 8
    assert memory["total_bytes"] == sum(part["bytes"] for part in memory["components"])
    assert memory["fit"]["fits"] is True and memory["fit"]["largest_batch_size"] > 2


def test_cli_sizes_a_preference_step_with_method(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIGS["gpt2"]))
    totals = {}
    for method in ("sft", "dpo", "orpo"):
        assert main(["inspect", str(folder), "--json", "--seq-len", "64", "--batch-size", "2", "--loss", "full",
                     "--device", "cpu", "--method", method]) == 0
        memory = json.loads(capsys.readouterr().out)["memory"]
        assert memory["settings"]["method"] == method
        totals[method] = memory["total_bytes"]
    assert totals["sft"] < totals["orpo"] <= totals["dpo"]  # two rows a pair; DPO adds the reference's forward
    assert main(["inspect", str(folder), "--method", "dpo", "--batch-size", "2", "--device", "cpu"]) == 0
    assert "batch 2 pairs (4 rows, dpo)" in capsys.readouterr().out


def test_live_bytes_counts_allocations_and_frees() -> None:
    with LiveBytes() as counter:
        a = torch.empty(1000, dtype=torch.float32)
        b = a.view(10, 100)  # a view shares the storage: nothing more
        c = torch.empty(250, dtype=torch.float64)
        assert counter.live == 4000 + 2000
        del a, b
        assert counter.live == 2000
        del c
    assert (counter.live, counter.peak) == (0, 6000)


MIXTRAL = {"model_type": "mixtral", **_SMALL, "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
           "vocab_size": 1000}


@pytest.mark.parametrize("upcast", ["norms", "all"])
def test_a_mixture_of_experts_is_sized_within_ten_percent_and_its_experts_counted_apart(upcast: str, tmp_path: Path,
                                                                                      single_thread) -> None:
    """The experts' grouped matmul: its meta function takes only bf16, and "all" upcasts the experts to fp32."""
    settings = dataclasses.replace(SETTINGS, loss="chunked", upcast=upcast, seq_len=128)
    folder = _save(MIXTRAL, tmp_path / "mixtral")
    estimate = estimate_memory(folder, settings)
    measured = _measured_peak(folder, settings)
    assert abs(estimate.total - measured) / measured <= 0.10, (estimate.total, measured)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized_model(folder, settings.quantize)
    experts = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".mlp.experts." in name
                  or ".mlp.gate." in name)
    names = [part.name for part in estimate.components]
    if upcast == "norms":  # as loaded (bf16): a row of their own
        assert estimate.component("unquantized weights") == experts
    else:  # cast to fp32: counted with the casts
        assert "unquantized weights" not in names and estimate.component("fp32 casts") >= 2 * experts


# DeepSeek-V3's attention (MLA): queries and keys of 48 values a head, values of 16.
DEEPSEEK_V3 = {"model_type": "deepseek_v3", **_SMALL, "hidden_size": 64, "intermediate_size": 128,
               "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_key_value_heads": 4, "n_routed_experts": 4,
               "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "q_lora_rank": 16,
               "kv_lora_rank": 16, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 16, "vocab_size": 1000}


def test_attention_with_values_narrower_than_its_keys_is_sized_within_ten_percent(tmp_path: Path,
                                                                                 single_thread) -> None:
    settings = dataclasses.replace(SETTINGS, loss="chunked", seq_len=128)
    folder = _save(DEEPSEEK_V3, tmp_path / "deepseek")
    estimate = estimate_memory(folder, settings)
    measured = _measured_peak(folder, settings)
    assert abs(estimate.total - measured) / measured <= 0.10, (estimate.total, measured)


def test_a_step_that_cannot_run_on_meta_says_so_and_inspect_still_shows_the_plans(tmp_path: Path, capsys) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model("git")  # its forward pass writes into a weight in place
    with pytest.raises(SimulationError, match="measure this model with real weights"):
        estimate_memory(config, SETTINGS)
    folder = tmp_path / "git"
    config.save_pretrained(folder)
    assert main(["inspect", str(folder), "--upcast", "all"]) == 0
    assert "training step memory: not estimated" in capsys.readouterr().out
    assert main(["inspect", str(folder), "--upcast", "all", "--memory", "1GiB"]) == 1  # the budget got no answer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prediction_against_cuda_max_memory_allocated(tmp_path: Path) -> None:
    folder = _save(CONFIGS["llama-5L"], tmp_path / "model")
    settings = MemorySettings(upcast="norms", lora_r=16, batch_size=4, seq_len=256, loss="full", device="cuda")
    predicted = estimate_memory(folder, settings).total
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized_model(folder, settings.quantize, device_index=0)
    torch.cuda.synchronize()
    meter = PeakMeter(model).start()
    apply_plan(model, plan_preparation(model, upcast=settings.upcast))
    model = attach_lora(model, settings)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    ids = torch.randint(0, 100, (settings.batch_size, settings.seq_len), device="cuda")
    for _ in range(2):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        optimizer.step()
        model.zero_grad()
    measured = meter.stop()
    assert meter.method == "torch.cuda.max_memory_allocated"
    assert abs(predicted - measured) / measured <= 0.10, (predicted, measured)
