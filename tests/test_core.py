"""The engine beyond the differential suite: plans, idempotence, quanto, quiet training,
intended differences from the reference, the gradient check, the checkpointing options
and the bitsandbytes CPU layout. Bad inputs (arguments, models, warnings) are in
test_bad_inputs.py."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from bitsandbytes.nn.modules import has_avx512bf16
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import kbitprep.apply
import kbitprep.checkpointing
from conftest import attach_lora, model_state, run_reference, save_tiny_model, tiny_llama_config
from kbitprep import (
    GradientFlowError,
    KbitPrepWarning,
    model_bytes,
    plan_preparation,
    prepare_model_for_kbit_training,
    verify_gradient_flow,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------- plans


PLAN_ARGUMENTS = {
    "default": {},
    "norms": {"upcast": "norms"},
    "none": {"upcast": "none"},
    "non-reentrant": {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
    "no-checkpointing": {"use_gradient_checkpointing": False},
    "every-2-offload": {"every_n_layers": 2, "offload": True},
}


@pytest.mark.parametrize(("arch", "mode"), [("llama", "nf4-dq"), ("gpt2", "int8"), ("t5", "fp16"), ("minilm", "fp4")])
def test_plan_changes_nothing(zoo, arch: str, mode: str) -> None:
    model = zoo.load(arch, mode)
    before = model_state(model)
    for kwargs in PLAN_ARGUMENTS.values():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # planning only describes warnings; it never emits them
            plan = plan_preparation(model, **kwargs)
        assert model_state(model) == before, kwargs
        json.dumps(plan.to_dict())
    # ... and preparing does change it, so the comparison above can fail.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotQuantizedWarning for the fp16 T5
        prepare_model_for_kbit_training(model, **PLAN_ARGUMENTS["norms"])
    assert model_state(model) != before


def test_plan_dict_is_json_and_consistent(zoo) -> None:
    model = zoo.load("qwen2", "nf4-dq")
    for name, kwargs in PLAN_ARGUMENTS.items():
        data = json.loads(json.dumps(plan_preparation(model, **kwargs).to_dict()))
        assert {"quantization", "bytes_before", "bytes_after", "casts", "checkpointing", "warnings"} <= data.keys()
        assert data["quantization"] == "bitsandbytes-4bit"
        assert data["bytes_before"] == model_bytes(model)
        assert data["bytes_after"] == data["bytes_before"] + sum(cast["bytes_added"] for cast in data["casts"])
        for cast in data["casts"]:
            assert {"name", "from", "to", "bytes_added"} <= cast.keys()
            assert cast["from"] == "bfloat16" and cast["to"] == "float32", cast
        assert {"enabled", "kwargs", "input_grad_hook"} <= data["checkpointing"].keys()
        assert data["checkpointing"]["enabled"] is (name != "no-checkpointing")
        assert all(isinstance(message, str) for message in data["warnings"])
    # "all" casts more than "norms", which casts more than "none" (nothing).
    sizes = [plan_preparation(model, upcast=policy).bytes_after for policy in ("all", "norms", "none")]
    assert sizes[0] > sizes[1] > sizes[2] == model_bytes(model)


def test_plan_golden_tiny_llama_4bit(zoo) -> None:
    """The whole plan of a 1-layer Llama (vocab 32, hidden 16, 2 heads, 1 KV head, MLP 32) in fp16 + NF4.

    Bytes by hand: embed 32x16 and lm_head 32x16 fp16 = 1024 each; three RMSNorm weights of
    16 fp16 = 32 each; packed 4-bit q 16x16 (128 B), k and v 8x16 (64 B each), o 16x16
    (128 B), gate/up/down 32x16 (256 B each) = 1152; rotary inv_freq and original_inv_freq,
    4 fp32 each = 32. Before: 1024*2 + 96 + 1152 + 32 = 3328. Every fp16 parameter doubles:
    +1024*2 + 32*3 = +2144, so after: 5472. Logical counts: quantized 256+128+128+256+3*512
    = 2304; float 512*2 + 16*3 = 1072.
    """
    from transformers import BitsAndBytesConfig

    model = zoo.load("llama-golden", "fp16",
                     quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16))

    def cast(name: str, numel: int) -> dict:
        return {"name": name, "from": "float16", "to": "float32", "numel": numel, "bytes_added": 2 * numel}

    plain = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"]
    assert plan_preparation(model).to_dict() == {
        "quantization": "bitsandbytes-4bit",
        "evidence": "model.is_loaded_in_4bit",
        "upcast": "all",
        "cast_reason": "upcast='all': every float16/bfloat16 parameter -> float32",
        "bytes_before": 3328,
        "bytes_after": 5472,
        "parameter_counts": {"quantized": 2304, "float": 1072, "other": 0},
        "frozen": plain,  # what transformers leaves trainable after loading; Params4bit never is
        "kept_trainable": [],
        "casts": [cast("model.embed_tokens.weight", 512), cast("model.layers.0.input_layernorm.weight", 16),
                  cast("model.layers.0.post_attention_layernorm.weight", 16), cast("model.norm.weight", 16),
                  cast("lm_head.weight", 512)],
        "norm_layers_in_fp32": [],
        "checkpointing": {"enabled": True, "reason": "the model is quantized",
                          "method": "activation_checkpointing_enable", "kwargs": {"use_reentrant": True},
                          "input_grad_hook": True, "every_n_layers": 1, "offload": False,
                          "disables_use_cache": True},
        "warnings": [],
        "errors": [],
        "diagnostics": [],
        # bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16.
        "training_layout": [f"model.layers.0.{layer}" for layer in
                            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] if has_avx512bf16() else [],
        "unquantized_weights": [],  # every weight matrix is in a linear layer or the embeddings
    }
    norms = plan_preparation(model, upcast="norms")
    assert norms.bytes_after == 3328 + 3 * 32
    assert norms.to_dict()["norm_layers_in_fp32"] == ["model.layers.0.input_layernorm",
                                                      "model.layers.0.post_attention_layernorm", "model.norm"]
    table = str(norms)
    assert "bitsandbytes-4bit" in table and "model.norm.weight" in table


# ---------------------------------------------------------------- idempotence


IDEMPOTENCE_CASES = {
    "llama-nf4": ("llama", "nf4-dq", {}),
    "llama-nf4-norms": ("llama", "nf4-dq", {"upcast": "norms"}),
    "gpt2-fp4-norms-non-reentrant": ("gpt2", "fp4", {"upcast": "norms",
                                                     "gradient_checkpointing_kwargs": {"use_reentrant": False}}),
    "t5-int8": ("t5", "int8", {}),
    "minilm-nf4-norms": ("minilm", "nf4-dq", {"upcast": "norms"}),
}


@pytest.mark.parametrize(("arch", "mode", "kwargs"), IDEMPOTENCE_CASES.values(), ids=IDEMPOTENCE_CASES)
def test_prepare_twice_is_prepare_once(zoo, arch: str, mode: str, kwargs: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and both calls are quiet
        twice = prepare_model_for_kbit_training(zoo.load(arch, mode), **kwargs)
        first = model_state(twice)
        prepare_model_for_kbit_training(twice, **kwargs)
    assert model_state(twice) == first
    assert plan_preparation(twice, **kwargs).casts == ()
    assert len(twice.get_input_embeddings()._forward_hooks) == 1
    assert twice.is_activation_checkpointing
    if kwargs.get("upcast") == "norms":
        hooked = [m for m in twice.modules() if any(p.dtype == torch.float32 for p in m.parameters(recurse=False))
                  and "norm" in type(m).__name__.lower()]
        assert hooked and all(len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1 for m in hooked)

    once = prepare_model_for_kbit_training(zoo.load(arch, mode), **kwargs)
    loss_twice, grads_twice = zoo.train_step(arch, attach_lora(twice))
    loss_once, grads_once = zoo.train_step(arch, attach_lora(once))
    torch.testing.assert_close(loss_twice, loss_once)
    torch.testing.assert_close(grads_twice, grads_once)


def test_reference_stacks_hooks_on_a_second_call(zoo) -> None:
    """Intended difference: the reference adds input-grad hooks on every call; kbitprep keeps one."""
    theirs = zoo.load("llama", "nf4-dq")
    run_reference(theirs)
    after_one = len(theirs.get_input_embeddings()._forward_hooks)
    run_reference(theirs)
    assert len(theirs.get_input_embeddings()._forward_hooks) > after_one >= 1


def test_peft_model_prepared_twice_keeps_one_hook(zoo) -> None:
    model = attach_lora(zoo.load("llama", "nf4-dq"))
    with pytest.warns(KbitPrepWarning) as first:
        prepare_model_for_kbit_training(model)
    state = model_state(model)
    with pytest.warns(KbitPrepWarning) as second:
        prepare_model_for_kbit_training(model)
    assert [w.message.code for w in [*first, *second]] == ["peft-model", "peft-model"]
    assert model_state(model) == state
    embeddings = model.get_input_embeddings()
    assert len(embeddings._forward_hooks) == 1
    # The handles transformers keeps are those of the live hook, so it can still remove it.
    model.disable_input_require_grads()
    assert len(embeddings._forward_hooks) == 0


# ---------------------------------------------------------------- backends kbitprep handles where the reference fails


def test_quanto_int8_prepares_and_trains(zoo) -> None:
    from transformers import QuantoConfig

    theirs = zoo.load("llama", "fp16", quantization_config=QuantoConfig(weights="int8"))
    # Intended difference: the reference casts quanto's weight tensors and crashes.
    with pytest.raises(ValueError, match="The dtype of a weights Tensor cannot be changed"):
        run_reference(theirs)

    ours = zoo.load("llama", "fp16", quantization_config=QuantoConfig(weights="int8"))
    quantized = {name: (type(p), p.dtype) for name, p in ours.named_parameters() if type(p) is not nn.Parameter}
    assert quantized and all(cls.__module__.startswith("optimum.quanto") for cls, _ in quantized.values())
    plan = plan_preparation(ours)
    assert plan.quantization == "quanto"
    assert plan.casts == ()  # quanto keeps its own precision, like the seed's gptq/hqq/... rule
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_model_for_kbit_training(ours)
    assert {name: (type(p), p.dtype) for name, p in ours.named_parameters() if name in quantized} == quantized
    assert model_bytes(ours) == plan.bytes_after == plan.bytes_before
    assert ours.is_activation_checkpointing

    model = attach_lora(ours)
    loss, grads = zoo.train_step("llama", model)
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert verify_gradient_flow(model).ok


# ---------------------------------------------------------------- quiet


QUIET_CASES = {
    "default": {},
    "reentrant-given": {"gradient_checkpointing_kwargs": {"use_reentrant": True}},
    "non-reentrant-given": {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
    "norms": {"upcast": "norms"},
}


@pytest.mark.parametrize("case", QUIET_CASES)
def test_prepare_and_train_step_emit_no_warning(zoo, case: str, caplog: pytest.LogCaptureFixture) -> None:
    model = zoo.load("llama", "nf4-dq")  # loading is transformers' and bitsandbytes' business
    transformers_logger = logging.getLogger("transformers")  # it does not propagate to the root logger
    transformers_logger.addHandler(caplog.handler)
    logging.Logger.warning_once.cache_clear()  # transformers logs some things once per process
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            prepare_model_for_kbit_training(model, **QUIET_CASES[case])
            # attach_lora filters exactly one message around get_peft_model: peft reads
            # transformers' deprecated `is_gradient_checkpointing` (peft's bug, not ours).
            model = attach_lora(model)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            loss, _ = zoo.train_step("llama", model)
            optimizer.step()
            optimizer.zero_grad()
            zoo.train_step("llama", model)
    finally:
        transformers_logger.removeHandler(caplog.handler)
    assert torch.isfinite(loss)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]


def test_reference_logs_use_cache_noise_kbitprep_does_not(zoo, caplog: pytest.LogCaptureFixture) -> None:
    """Intended difference (and the control that shows the capture above works)."""
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(caplog.handler)
    try:
        for prepare, expect_noise in ((run_reference, True), (prepare_model_for_kbit_training, False)):
            logging.Logger.warning_once.cache_clear()
            caplog.clear()
            model = zoo.load("llama", "nf4-dq")
            prepare(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zoo.train_step("llama", attach_lora(model))
            noise = [r.getMessage() for r in caplog.records if "use_cache" in r.getMessage()]
            assert bool(noise) is expect_noise, (prepare, noise)
    finally:
        transformers_logger.removeHandler(caplog.handler)


def test_accelerator_cache_is_cleared_only_after_casts(zoo, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[None] = []
    monkeypatch.setattr(kbitprep.apply, "empty_accelerator_cache", lambda: calls.append(None))
    for kwargs, expected in (({}, 1), ({"auto_clear_cache": False}, 0), ({"upcast": "none"}, 0)):
        calls.clear()
        prepare_model_for_kbit_training(zoo.load("gpt2", "nf4-dq"), **kwargs)
        assert len(calls) == expected, kwargs


# ---------------------------------------------------------------- intended differences


def test_reference_freezes_a_peft_models_adapters(zoo) -> None:
    """Intended difference: the reference freezes a PeftModel's adapters (kbitprep keeps them
    trainable: test_bad_inputs.py::test_peft_model_warns_and_keeps_adapters_trainable), and the
    gradient check says so."""
    theirs = attach_lora(zoo.load("llama", "nf4-dq"))
    assert any(p.requires_grad for p in theirs.parameters())
    run_reference(theirs)
    assert not any(p.requires_grad for p in theirs.parameters())
    with pytest.raises(GradientFlowError, match="no parameter is trainable"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verify_gradient_flow(theirs)


# ---------------------------------------------------------------- verify_gradient_flow


def test_verify_names_adapters_cut_off_by_reentrant_checkpointing(zoo) -> None:
    model = prepare_model_for_kbit_training(zoo.load("llama", "nf4-dq"))
    model.disable_input_require_grads()  # the classic QLoRA bug: frozen embeddings below reentrant checkpoints
    model = attach_lora(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True"
        report = verify_gradient_flow(model, raise_on_failure=False)
        assert not report.ok
        assert any("layers.0." in name and "lora_A" in name for name in report.missing)
        with pytest.raises(GradientFlowError, match="no gradient: .*lora_"):
            verify_gradient_flow(model)


def test_verify_names_a_trainable_parameter_outside_the_graph(zoo) -> None:
    model = attach_lora(prepare_model_for_kbit_training(zoo.load("llama", "nf4-dq")))
    model.get_base_model().model.unused_scale = nn.Parameter(torch.ones(4))
    report = verify_gradient_flow(model, raise_on_failure=False)
    assert [name for name in report.missing] == ["base_model.model.model.unused_scale"]
    assert report.with_grad and not report.ok
    with pytest.raises(GradientFlowError, match="unused_scale"):
        verify_gradient_flow(model)


def test_verify_names_non_finite_gradients_and_restores_state() -> None:
    class Sqrt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.root = nn.Parameter(torch.zeros(2))  # d/dx sqrt(x) at 0 is inf
            self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.scale.sum() * self.frozen.sum() + torch.sqrt(self.root).sum() + 0 * input_ids.sum()

    model = Sqrt().eval()
    model.scale.grad = torch.full((3,), 7.0)
    report = verify_gradient_flow(model, raise_on_failure=False)
    assert report.non_finite == ("root",) and report.with_grad == ("scale",) and not report.leaked
    assert not model.training and torch.equal(model.scale.grad, torch.full((3,), 7.0))
    with pytest.raises(GradientFlowError, match="root"):
        verify_gradient_flow(model)


# ---------------------------------------------------------------- checkpointing options


def test_every_n_layers_is_passed_through(zoo) -> None:
    model = zoo.load("llama-4layers", "nf4-dq")
    plan = plan_preparation(model, every_n_layers=2)
    assert plan.checkpointing.every_n_layers == 2
    prepare_model_for_kbit_training(model, every_n_layers=2)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, True, False]
    model = attach_lora(model)
    assert verify_gradient_flow(model).ok


def test_offload_is_passed_through_where_an_accelerator_exists(zoo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kbitprep.checkpointing, "has_accelerator", lambda: True)
    model = zoo.load("llama-4layers", "nf4-dq")
    plan = plan_preparation(model, offload=True, every_n_layers=3)
    assert plan.checkpointing.offload is True and plan.checkpointing.every_n_layers == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_model_for_kbit_training(model, offload=True, every_n_layers=3)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, False, True]
    # transformers wraps torch's checkpoint in a host-offloading function when offload=True.
    func = model.model.layers[0]._gradient_checkpointing_func
    assert func.func is not torch.utils.checkpoint.checkpoint
    assert func.keywords == {"use_reentrant": True}


@pytest.mark.gpu
def test_offload_is_kept_and_trains_on_an_accelerator(zoo) -> None:
    model = zoo.load("llama-4layers", "nf4-dq", device_map={"": 0})
    assert plan_preparation(model, offload=True).checkpointing.offload is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_model_for_kbit_training(model, offload=True)
    assert verify_gradient_flow(attach_lora(model)).ok


# ---------------------------------------------------------------- bitsandbytes CPU layout
#
# On a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit weight for inference on the
# first eval-mode forward and from then on computes with a kernel that has no autograd
# (measured without the fix: adapter gradients 26% off in norm). Preparation switches the
# repacking off, and unpacks weights repacked before it. On a CPU without that instruction
# set nothing is repacked, and every run must agree all the same.


@pytest.fixture(scope="module")
def repacking_llama(tmp_path_factory: pytest.TempPathFactory):
    """A bf16 Llama whose layer widths (multiples of 32) bitsandbytes repacks; the zoo's are smaller."""
    path = save_tiny_model(tmp_path_factory.mktemp("repacking-llama"),
                           tiny_llama_config(hidden_size=64, intermediate_size=128), dtype=torch.bfloat16)

    def load() -> nn.Module:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes' CPU backend: torch.jit deprecations
            return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb).train()

    return load


def _sample(zoo, model: nn.Module) -> None:
    """What generating a sample does to the weights: a forward pass in eval mode."""
    model.eval()
    with torch.no_grad():
        model(**zoo.batch("llama"))
    model.train()


def _adapter_gradients(zoo, model: nn.Module, *, sample_before: bool = False,
                       sample_during: bool = False) -> torch.Tensor:
    """Prepare, attach LoRA, take one training step; sample before preparing and/or before the step."""
    if sample_before:
        _sample(zoo, model)
    model = attach_lora(prepare_model_for_kbit_training(model))
    if sample_during:
        _sample(zoo, model)  # an evaluation between training steps
    _, grads = zoo.train_step("llama", model)
    return torch.cat([grad.flatten() for grad in grads.values()])


@pytest.fixture(scope="module")
def never_sampled_gradients(zoo, repacking_llama) -> torch.Tensor:
    """The reference: no forward in eval mode ever, so nothing is repacked whatever the CPU."""
    return _adapter_gradients(zoo, repacking_llama())


def test_sampling_during_training_leaves_gradients_exact(zoo, repacking_llama, never_sampled_gradients) -> None:
    model = repacking_llama()
    assert bool(plan_preparation(model).training_layout) is bool(has_avx512bf16())
    gradients = _adapter_gradients(zoo, model, sample_during=True)
    torch.testing.assert_close(gradients, never_sampled_gradients, rtol=0, atol=0)


def test_sampling_before_preparation_is_undone(zoo, repacking_llama, never_sampled_gradients) -> None:
    """Unpacking re-quantizes the block scales (bitsandbytes rounded them to bfloat16 when it
    repacked), so the gradients move in the last bits only."""
    gradients = _adapter_gradients(zoo, repacking_llama(), sample_before=True)
    relative = (gradients - never_sampled_gradients).norm() / never_sampled_gradients.norm()
    assert relative < 0.01, f"adapter gradients off by {relative:.1%}"


def test_peft_022s_name_for_the_checkpointing_options_is_taken_too(zoo) -> None:
    """peft 0.22 renamed gradient_checkpointing_kwargs to activation_checkpointing_kwargs: calls written
    for either release prepare the same way; naming both is refused before anything changes."""
    options = {"use_reentrant": False}
    renamed = plan_preparation(zoo.load("qwen2", "nf4-dq"), activation_checkpointing_kwargs=options)
    assert renamed.to_dict() == plan_preparation(zoo.load("qwen2", "nf4-dq"),
                                                 gradient_checkpointing_kwargs=options).to_dict()
    assert renamed.checkpointing.kwargs["use_reentrant"] is False
    model = zoo.load("qwen2", "nf4-dq")
    prepare_model_for_kbit_training(model, activation_checkpointing_kwargs=options)
    assert model.is_activation_checkpointing
    with pytest.raises(ValueError, match="not both"):
        prepare_model_for_kbit_training(zoo.load("qwen2", "nf4-dq"), gradient_checkpointing_kwargs=options,
                                        activation_checkpointing_kwargs=options)
