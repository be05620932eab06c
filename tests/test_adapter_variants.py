"""The adapter variants peft provides, as a run uses them: DoRA, rsLoRA, LoRA+ and the initialisations.

- Each is a setting: recorded in report.json's settings, kept on `--resume`, and refused by
  `--fsdp` where the sharded run cannot train with it (`SHARDED_LIMITS`).
- `attach_lora` passes each to peft's own LoraConfig; peft's refusals on a 4-bit base
  (PiSSA; LoftQ without CUDA) come back as one `LoraInitError` with peft's reason.
- merge equals the run's own model for each variant: the weights against peft's
  `merge_and_unload` onto transformers' dequantization (DoRA's magnitude and weight norm,
  rsLoRA's alpha / sqrt(r)), and the logits against the run's 4-bit model with the adapter
  loaded by peft (OLoRA and PiSSA, whose initialisation rewrites the base).
- LoRA+ is peft's `create_loraplus_optimizer` on both paths (the Trainer's and the sharded loop's).
- The memory model sizes DoRA within the tolerance of a measured step.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from pathlib import Path

import pytest
import torch

from kbitprep.app.config.settings import FinetuneError, FinetuneSettings
from kbitprep.app.export.merge import dequantize_layers, merge_adapter, rewritten_base
from kbitprep.app.model.loading import load_quantized_model
from kbitprep.app.model.lora import LoraInitError, attach_lora

# The fields attach_lora reads, as a run's settings hold them.
_LORA = {"lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "target_modules": None, "lora_variant": "lora",
         "rslora": False, "init_lora_weights": "default"}


def _settings(**changes) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{**_LORA, **changes})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kbitprep.app.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("variants") / "model")


def _load(folder: Path, quantize: str = "nf4") -> torch.nn.Module:
    """The tiny model as a run with `--compute-dtype float32` loads it: its 4-bit layers dequantize to float32,
    so that a merge and the run's model can be compared at float32 precision, not bfloat16's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' CPU backend's deprecation notices
        return load_quantized_model(folder, quantize, compute="float32")


def _trained(model: torch.nn.Module) -> torch.nn.Module:
    """The adapter moved away from its initialisation, as training would (seeded)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


_IDS = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))


def _run_model_logits(folder: Path, quantize: str, adapter: Path) -> torch.Tensor:
    """The run's model as peft loads it (the base loaded as the run loaded it, the adapter on it; an
    initialisation that rewrites the base is run again), its float weights in float32 as the merge's are."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_load(folder, quantize), adapter)
    for param in model.parameters():  # the 4-bit weights stay packed; every float weight goes to float32 as it is
        if param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return _logits(model, _IDS)


# --- settings --------------------------------------------------------------------------------------


def test_each_variant_is_recorded_kept_on_resume_and_refused_by_fsdp_where_it_cannot_shard() -> None:
    run = FinetuneSettings(model="m", data="d", output="o", lora_variant="dora", rslora=True,
                           init_lora_weights="olora", loraplus_lr_ratio=16.0)
    recorded = run.to_dict()
    assert {k: recorded[k] for k in ("lora_variant", "rslora", "init_lora_weights", "loraplus_lr_ratio")} == \
        {"lora_variant": "dora", "rslora": True, "init_lora_weights": "olora", "loraplus_lr_ratio": 16.0}
    plain = dataclasses.replace(run, lora_variant="lora", rslora=False, init_lora_weights="default",
                                loraplus_lr_ratio=None)
    assert [d.split(" ")[0] for d in plain.resume_differences(recorded)] == \
        ["lora_variant", "rslora", "init_lora_weights", "loraplus_lr_ratio"]
    plain.check_sharded()  # plain LoRA, rsLoRA and LoRA+ shard
    dataclasses.replace(plain, rslora=True, loraplus_lr_ratio=4.0).check_sharded()
    with pytest.raises(FinetuneError, match=r"--fsdp cannot train --lora-variant dora .*pass --lora-variant lora"):
        dataclasses.replace(plain, lora_variant="dora").check_sharded()
    for init in ("pissa", "olora", "loftq"):
        with pytest.raises(FinetuneError, match=rf"--init-lora-weights {init} .*pass --init-lora-weights default"):
            dataclasses.replace(plain, init_lora_weights=init).check_sharded()
    with pytest.raises(FinetuneError, match="--loraplus-lr-ratio must be positive"):
        dataclasses.replace(plain, loraplus_lr_ratio=0.0).check()


# --- attaching -------------------------------------------------------------------------------------


def test_peft_gets_each_variant(tiny: Path) -> None:
    from peft.tuners.lora import LoraLayer

    dora = attach_lora(_load(tiny), _settings(lora_variant="dora", rslora=True))
    layers = [m for m in dora.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.use_dora["default"] and m.scaling["default"] == 8.0 / 2.0 for m in layers)
    magnitudes = {n for n, p in dora.named_parameters() if p.requires_grad and "lora_magnitude_vector" in n}
    assert len(magnitudes) == len(layers)

    fresh = _load(tiny)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    olora = attach_lora(fresh, _settings(init_lora_weights="olora"))
    rewritten = [n for n, p in olora.base_model.model.named_parameters()
                 if n.replace(".base_layer", "") in before and not torch.equal(p, before[n.replace(".base_layer", "")])]
    assert len(rewritten) == len(layers)  # each adapted base weight, and nothing else


@pytest.mark.parametrize(("init", "reason"), [
    ("pissa", "Please initialize PiSSA under float32"),
    pytest.param("loftq", "CUDA", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                           reason="peft computes LoftQ where CUDA is")),
])
def test_peft_refusing_an_initialisation_on_a_4bit_base_is_one_error_with_its_reason(tiny: Path, init: str,
                                                                                    reason: str) -> None:
    with pytest.raises(LoraInitError) as caught:
        attach_lora(_load(tiny), _settings(init_lora_weights=init))
    message = str(caught.value)
    assert message.startswith(f"--init-lora-weights {init}: peft cannot initialise") and reason in message
    assert "pass --init-lora-weights default" in message


# --- merging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [{"lora_variant": "dora"}, {"rslora": True},
                                     {"lora_variant": "dora", "rslora": True}], ids=["dora", "rslora", "dora-rslora"])
def test_merge_equals_peft_merge_onto_transformers_dequantization(tiny: Path, changes: dict, tmp_path: Path,
                                                                  single_thread) -> None:
    from peft import PeftModel

    torch.manual_seed(0)
    _trained(attach_lora(_load(tiny), _settings(**changes))).save_pretrained(tmp_path / "adapter")
    ours = _load(tiny)
    dequantize_layers(ours)
    assert merge_adapter(ours, tmp_path / "adapter", torch.float32) == 14
    reference = _load(tiny)
    reference.dequantize(dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(reference.float(), tmp_path / "adapter").merge_and_unload()
    expected, actual = reference.state_dict(), ours.float().state_dict()
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor.float(), rtol=1e-5, atol=1e-6, msg=name)


def test_dora_merge_is_the_magnitude_times_the_row_normalised_sum(tiny: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    torch.manual_seed(0)
    _trained(attach_lora(_load(tiny), _settings(lora_variant="dora", rslora=True))).save_pretrained(tmp_path / "a")
    base = _load(tiny)
    layer = base.model.layers[1].mlp.down_proj
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    m = tensors[f"{prefix}.lora_magnitude_vector"]
    v = w + 8.0 / 4 ** 0.5 * b @ a  # rsLoRA: alpha / sqrt(r)
    dequantize_layers(base)
    merge_adapter(base, tmp_path / "a", torch.float32)
    torch.testing.assert_close(base.model.layers[1].mlp.down_proj.weight, m[:, None] * v / v.norm(dim=1, keepdim=True))


@pytest.mark.parametrize(("init", "quantize"), [("olora", "nf4"), ("pissa", "none"), ("default", "nf4")])
def test_merge_computes_what_the_run_trained_when_the_initialisation_rewrites_the_base(
        tiny: Path, init: str, quantize: str, tmp_path: Path, single_thread) -> None:
    """The reference: the run's model as peft loads it."""
    torch.manual_seed(0)
    _trained(attach_lora(_load(tiny, quantize), _settings(init_lora_weights=init))).save_pretrained(tmp_path / "a")
    reference = _run_model_logits(tiny, quantize, tmp_path / "a")
    merged = rewritten_base(_load(tiny, quantize), tmp_path / "a")
    dequantize_layers(merged)
    merge_adapter(merged, tmp_path / "a", torch.float32)
    got = _logits(merged.float(), _IDS)
    naive = _load(tiny, quantize)  # the same adapter merged onto the base as loaded, not the rewritten one
    dequantize_layers(naive)
    merge_adapter(naive, tmp_path / "a", torch.float32)
    off = (_logits(naive.float(), _IDS) - reference).abs().max().item()
    ours = (got - reference).abs().max().item()
    # bitsandbytes computes a layer quantized from bfloat16 weights in bfloat16 whatever the compute dtype
    # (the bound of test_merge.py); OLoRA's requantized layers and the float base compute in float32.
    tolerance = 1e-5 if init != "default" else 0.02
    assert ours <= tolerance * reference.abs().max().item(), ours
    if init == "default":
        assert off == ours  # nothing rewritten: the two are one merge
    else:
        assert off >= 0.1 * reference.abs().max().item(), (ours, off)


# --- LoRA+ ------------------------------------------------------------------------------------------


def test_loraplus_puts_b_at_the_ratio_on_both_paths(tiny: Path, tmp_path: Path) -> None:
    from transformers import TrainingArguments

    from kbitprep.app.config.optimizer import make_optimizer
    from kbitprep.app.training.trainer import FinetuneTrainer

    model = attach_lora(_load(tiny), _settings(lora_variant="dora"))
    names = {id(p): n for n, p in model.named_parameters()}
    settings = types.SimpleNamespace(optim="adamw_torch", lr=1e-4, loraplus_lr_ratio=16.0)
    sharded = make_optimizer([p for p in model.parameters() if p.requires_grad], settings, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FinetuneTrainer(model=model, args=TrainingArguments(str(tmp_path), learning_rate=1e-4,
                                                                      use_cpu=True, report_to="none"),
                                  loraplus_lr_ratio=16.0)
    for optimizer in (sharded, trainer.create_optimizer()):
        rates = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
        assert set(rates) == {n for n, p in model.named_parameters() if p.requires_grad}
        assert {rates[n] for n in rates if ".lora_A." in n} == {1e-4}
        assert {rates[n] for n in rates if ".lora_B." in n or "magnitude" in n} == {1.6e-3}
        assert type(optimizer).__name__ == "AdamW"
    with pytest.raises(TypeError, match="pass model="):
        make_optimizer(list(model.parameters()), settings)


# --- memory -----------------------------------------------------------------------------------------


def test_the_memory_model_sizes_dora_within_the_tolerance_of_a_measured_step(tmp_path: Path, single_thread) -> None:
    from kbitprep.app.memory.estimate import estimate_memory
    from test_memory import CONFIGS, SETTINGS, _measured_peak, _save

    folder = _save(CONFIGS["llama-5L"], tmp_path / "llama")
    dora = dataclasses.replace(SETTINGS, lora_variant="dora")
    predicted = estimate_memory(folder, dora)
    measured = _measured_peak(folder, dora)
    assert abs(predicted.total - measured) / measured <= 0.10, (predicted.total, measured)
    plain = estimate_memory(folder, SETTINGS)
    # One float32 magnitude per output row of each adapted layer: 5 layers x (q, k, v, o, gate, up, down).
    rows = 5 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    assert predicted.component("LoRA parameters") - plain.component("LoRA parameters") == 4 * rows
    # AdamW: two float32 moments per value, and a float32 step count per tensor (35 magnitude vectors).
    assert predicted.component("optimizer state") - plain.component("optimizer state") == 8 * rows + 4 * 35


def test_inspect_memory_takes_the_variant(tmp_path: Path, capsys) -> None:
    import json

    from kbitprep.cli import main
    from test_memory import CONFIGS, _save

    folder = _save(CONFIGS["llama-5L"], tmp_path / "llama")
    totals = {}
    for variant in ("lora", "dora"):
        assert main(["inspect", str(folder), "--meta", "--json", "--lora-variant", variant, "--seq-len", "32",
                     "--device", "cpu"]) == 0
        totals[variant] = json.loads(capsys.readouterr().out)
    assert totals["dora"]["memory"]["settings"]["lora_variant"] == "dora"
    assert totals["dora"]["memory"]["total_bytes"] > totals["lora"]["memory"]["total_bytes"]


# --- a run, end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_records_the_variants_and_its_merge_computes_what_it_trained(tiny: Path, tmp_path: Path,
                                                                          single_thread) -> None:
    """All four at once (each is tested alone above): DoRA on an OLoRA-rewritten 4-bit base, rsLoRA, LoRA+."""
    import json

    from transformers import AutoModelForCausalLM

    from kbitprep.app.demo import demo_settings
    from kbitprep.app.export.merge import merge_run
    from kbitprep.app.training.run import finetune

    changes = {"lora_variant": "dora", "rslora": True, "loraplus_lr_ratio": 4.0, "init_lora_weights": "olora"}
    settings = dataclasses.replace(demo_settings(tmp_path / "run", max_steps=2), model=str(tiny), samples=(),
                                   batch_size=2, seq_len=32, compute_dtype="float32", **changes)
    finetune(settings)
    recorded = json.loads((tmp_path / "run" / "report.json").read_text())["settings"]
    assert {key: recorded[key] for key in changes} == changes
    merge_run(tmp_path / "run", tmp_path / "merged", dtype="fp32")
    reference = _run_model_logits(tiny, "nf4", tmp_path / "run" / "adapter")
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), _IDS)
    # Every adapted layer was requantized by OLoRA from float32: the run's model computes in float32 throughout.
    assert (merged - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


def test_finetune_refuses_an_initialisation_peft_refuses_in_one_line_and_writes_nothing(tiny: Path, tmp_path: Path,
                                                                                         capsys) -> None:
    from kbitprep.app.demo import DEMO_DATA
    from kbitprep.cli import main

    code = main(["finetune", str(tiny), str(DEMO_DATA), "--output", str(tmp_path / "run"), "--init-lora-weights",
                 "pissa", "--max-steps", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and lines[-1].startswith("kbitprep: error: --init-lora-weights pissa: peft cannot initialise")
    assert "Traceback" not in "\n".join(lines) and not (tmp_path / "run").exists()
