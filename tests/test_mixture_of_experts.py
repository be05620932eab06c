"""Mixture-of-experts models as transformers 5 stores them: each projection of the experts one 3-D parameter.

bitsandbytes quantizes linear layers only, so those experts stay as loaded: the plan says so
(`weights-not-quantized`) and preparation still equals peft's; finetune says it before the
weights load. The default LoRA targets leave out the names peft reads as the fused experts
on such a model, which it would train only without dropout.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from conftest import run_reference, save_tiny_model, tiny_llama_config
from kbitprep import plan_preparation, prepare_model_for_kbit_training
from kbitprep.app.model.lora import attach_lora
from kbitprep.errors import KbitPrepWarning
from kbitprep.report import format_bytes

MIXTRAL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
# DeepSeek-V3: one dense layer, then routed experts (3-D) beside shared experts (linear layers).
DEEPSEEK_V3 = dict(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                   first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def _load_4bit(folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' CPU backend: torch.jit deprecations
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("mixtral"), AutoConfig.for_model("mixtral", **MIXTRAL),
                           dtype=torch.bfloat16, tokenizer=True)


def _outside_linear_layers(model: torch.nn.Module) -> dict[str, int]:
    """name -> bytes of every 2-D-or-more float parameter whose module is no linear layer or embedding."""
    owners = {name: module for name, module in model.named_modules()}
    found = {}
    for name, param in model.named_parameters():
        owner = owners[name.rpartition(".")[0]]
        if param.dim() >= 2 and not isinstance(owner, (torch.nn.Linear, torch.nn.Embedding)):
            found[name] = param.numel() * param.element_size()
    return found


def test_the_plan_names_the_experts_the_backend_left_unquantized(mixtral: Path) -> None:
    model = _load_4bit(mixtral)
    loose = _outside_linear_layers(model)
    assert any(".experts.gate_up_proj" in name for name in loose)  # the fixture is what the test is about
    plan = plan_preparation(model, upcast="norms")
    assert set(plan.unquantized_weights) == set(loose) and plan.to_dict()["unquantized_weights"]
    message = next(d.message for d in plan.diagnostics if d.code == "weights-not-quantized")
    assert "MixtralExperts" in message and format_bytes(sum(loose.values())) in message
    assert "3-D parameters" in message and "transformers release before 5.0" in message

    llama = plan_preparation(_load_4bit(save_tiny_model(mixtral.parent / "llama", tiny_llama_config())))
    assert llama.unquantized_weights == () and "weights-not-quantized" not in llama.codes


def test_preparing_a_mixture_of_experts_still_equals_peft_and_says_why_it_stays_large(mixtral: Path) -> None:
    ours, theirs = _load_4bit(mixtral), _load_4bit(mixtral)
    with pytest.warns(KbitPrepWarning, match="outside linear layers") as caught:
        prepare_model_for_kbit_training(ours)
    assert [w.message.code for w in caught if issubclass(w.category, KbitPrepWarning)] == ["weights-not-quantized"]
    run_reference(theirs)
    states = {name: (p.dtype, p.requires_grad) for name, p in ours.named_parameters()}
    assert states == {name: (p.dtype, p.requires_grad) for name, p in theirs.named_parameters()}
    assert states["model.layers.0.mlp.experts.gate_up_proj"] == (torch.float32, False)  # "all" casts them, as peft does
    assert ours.is_activation_checkpointing and theirs.is_activation_checkpointing


def test_finetune_says_it_before_loading_and_once(mixtral: Path, tmp_path: Path, monkeypatch) -> None:
    from kbitprep.app.demo import demo_settings
    from kbitprep.app.training.executor import Executor
    from kbitprep.app.training.run import finetune

    seen_at_load: list[int] = []
    load = Executor.load

    def counting_load(self, *args, **kwargs):
        seen_at_load.append(sum("outside linear layers" in str(w.message) for w in caught))
        return load(self, *args, **kwargs)

    monkeypatch.setattr(Executor, "load", counting_load)
    settings = dataclasses.replace(demo_settings(tmp_path / "run", max_steps=1), model=str(mixtral), samples=(),
                                   seq_len=16, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(settings)
    assert seen_at_load == [1]  # shown before the weights loaded
    assert sum("outside linear layers" in str(w.message) for w in caught) == 1  # and not again at preparation
    predicted = json.loads((tmp_path / "run" / "report.json").read_text())["memory"]["predicted"]
    parts = {part["name"]: part["bytes"] for part in predicted["components"]}
    assert parts["unquantized weights"] > parts["quantized weights"]


def test_default_targets_leave_out_the_names_peft_reads_as_fused_experts(tmp_path: Path) -> None:
    """On DeepSeek-V3, peft maps gate_proj/up_proj/down_proj onto the routed experts' 3-D parameters
    (as adapters trained under transformers 4 named them), and refuses those with dropout: the
    defaults adapt the attention's linear layers and train with dropout on."""
    from kbitprep.app.config.settings import FinetuneSettings

    folder = save_tiny_model(tmp_path / "deepseek", AutoConfig.for_model("deepseek_v3", **DEEPSEEK_V3),
                             dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(_load_4bit(folder), upcast="norms")
    settings = FinetuneSettings(model=str(folder), data="unused.jsonl", output=str(tmp_path / "run"), lora_dropout=0.1)
    adapted = attach_lora(model, settings)
    names = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in adapted.named_parameters() if ".lora_A" in name}
    assert names == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    adapted(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)


def test_naming_the_experts_with_dropout_says_what_to_change(tmp_path: Path) -> None:
    from kbitprep.app.config.settings import FinetuneSettings
    from kbitprep.app.model.lora import LoraTargetError

    folder = save_tiny_model(tmp_path / "deepseek", AutoConfig.for_model("deepseek_v3", **DEEPSEEK_V3),
                             dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(_load_4bit(folder), upcast="norms")
    settings = FinetuneSettings(model=str(folder), data="unused.jsonl", output=str(tmp_path / "run"),
                                target_modules=("down_proj",))
    with pytest.raises(LoraTargetError, match="only with --lora-dropout 0"):
        attach_lora(model, settings)


def test_a_router_that_subclasses_linear_is_not_a_default_target(tmp_path: Path) -> None:
    """Phi-3.5-MoE's router is an nn.Linear whose forward returns (logits, scores, experts): LoRA on it
    would fail in the forward pass."""
    from kbitprep.app.config.settings import FinetuneSettings

    config = AutoConfig.for_model("phimoe", **{**MIXTRAL, "hidden_size": 64, "intermediate_size": 128})
    folder = save_tiny_model(tmp_path / "phimoe", config, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(_load_4bit(folder), upcast="norms")
    routers = [name for name, module in model.named_modules() if type(module).__name__ == "PhimoeTopKRouter"]
    assert routers and all(isinstance(dict(model.named_modules())[name], torch.nn.Linear) for name in routers)
    adapted = attach_lora(model, FinetuneSettings(model=str(folder), data="unused.jsonl", output=str(tmp_path / "run")))
    assert not any(".lora_A" in name for name, _ in adapted.named_parameters() if ".router." in name)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    adapted(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)
