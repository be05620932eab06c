"""Bad inputs to the Python API: each gives an error or warning that names the problem and the fix.

Every row of the tables below is one entry of docs/bad-inputs.md. An error must be one of
kbitprep's own (raised from kbitprep code, not from deep inside torch or transformers),
and must leave the model exactly as it was: dtypes, requires_grad, storage, hooks and
checkpointing switches. A warning must point at the caller's line, and the preparation
it accompanies must still do the right thing.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    LlamaForCausalLM,
)

import kbitprep
import kbitprep.checkpointing
from conftest import attach_lora, tiny_llama_config
from kbitprep import (
    KbitPrepWarning,
    NotQuantizedWarning,
    PreparationError,
    plan_preparation,
    prepare_model_for_kbit_training,
)
from kbitprep.errors import ArgumentTypeError, InvalidArgumentError
from kbitprep.sizing import build_meta_model

KBITPREP_DIR = pathlib.Path(kbitprep.__file__).parent


@pytest.fixture(scope="module")
def llama_dir(zoo) -> pathlib.Path:
    return zoo.path("llama")


def load_4bit(path: pathlib.Path, **bnb_options: Any) -> nn.Module:
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, **bnb_options)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float16)


class TagTensor(torch.Tensor):
    """A tensor subclass no backend claims, standing in for a quantized format kbitprep has never seen."""


class HoldsLinear4bit(nn.Module):
    """A hand-built quantized module: bitsandbytes 4-bit layers, no transformers checkpointing API."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32).half()
        self.proj = bnb.nn.Linear4bit(32, 32, bias=False, compute_dtype=torch.float16).to("cpu")  # .to quantizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class NoInputEmbeddings(HoldsLinear4bit):
    """Can checkpoint, but exposes no input embeddings for the reentrant input-grad hook."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.checkpoint_kwargs = gradient_checkpointing_kwargs

    def get_input_embeddings(self) -> nn.Module:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Observing that nothing changed


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything preparation may touch, as comparable values (tensor identity by object and storage)."""
    params = {name: (id(p), type(p), p.dtype, p.requires_grad, p.data_ptr(), p.device.type)
              for name, p in model.named_parameters(remove_duplicate=False)}
    buffers = {name: (id(b), b.dtype, b.data_ptr()) for name, b in model.named_buffers()}
    hooks = {name: tuple(tuple(getattr(module, attr)) for attr in
                         ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
             for name, module in model.named_modules()}
    switches = {name: getattr(module, "gradient_checkpointing", None) for name, module in model.named_modules()}
    config = getattr(model, "config", None)
    return {"params": params, "buffers": buffers, "hooks": hooks, "switches": switches,
            "use_cache": getattr(config, "use_cache", None),
            "require_grads_hooks": bool(getattr(model, "_require_grads_hooks", None))}


def assert_message(message: str, problem: tuple[str, ...], fix: tuple[str, ...]) -> None:
    for part in problem:
        assert part in message, f"message does not name the problem ({part!r}): {message}"
    for part in fix:
        assert part in message, f"message does not say what to do ({part!r}): {message}"


# ---------------------------------------------------------------------------------------------
# Errors: the call raises, names the problem and the fix, and changes nothing


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    id: str
    model: Callable[[pathlib.Path], Any]  # builds the (bad) model from the saved tiny Llama's folder
    kwargs: dict[str, Any]
    error: type[Exception]
    problem: tuple[str, ...]
    fix: tuple[str, ...]
    code: str | None = None  # argument errors: plan_preparation raises too; else the code the plan reports


def meta_llama(_: pathlib.Path) -> nn.Module:
    with torch.device("meta"):
        return LlamaForCausalLM(tiny_llama_config())


def no_checkpointing_llama(path: pathlib.Path) -> nn.Module:
    model = load_4bit(path)
    model.supports_gradient_checkpointing = False
    return model


ERROR_CASES = [
    ErrorCase("none", lambda p: None, {}, ArgumentTypeError, ("not NoneType",), ("from_pretrained",)),
    ErrorCase("string-path", lambda p: str(p), {}, ArgumentTypeError, ("not str",),
              ("load the model first", "from_pretrained(path")),
    ErrorCase("pathlib-path", lambda p: p, {}, ArgumentTypeError, ("Path",), ("load the model first",)),
    ErrorCase("int", lambda p: 7, {}, ArgumentTypeError, ("not int",), ("pass the loaded model",)),
    ErrorCase("state-dict", lambda p: load_4bit(p).state_dict(), {}, ArgumentTypeError, ("not OrderedDict", "a state dict"),
              ("model.load_state_dict",)),
    ErrorCase("plain-dict", lambda p: {"weight": torch.zeros(1)}, {}, ArgumentTypeError, ("not dict", "a state dict"),
              ("model.load_state_dict",)),
    ErrorCase("model-class", lambda p: LlamaForCausalLM, {}, ArgumentTypeError, ("not type", "a model class, not a model"),
              ("LlamaForCausalLM.from_pretrained(path)",)),
    ErrorCase("model-tokenizer-pair", lambda p: (LlamaForCausalLM(tiny_llama_config()), None), {}, ArgumentTypeError,
              ("not tuple", "(model, tokenizer)"), ("unpack it and pass the model",)),
    ErrorCase("no-parameters", lambda p: nn.Sequential(nn.ReLU()), {}, PreparationError,
              ("Sequential has no parameters", "nothing was changed"), ("Pass the model that holds the weights",),
              code="no-parameters"),
    ErrorCase("buffers-only", lambda p: nn.BatchNorm1d(4, affine=False), {}, PreparationError,
              ("BatchNorm1d has no parameters",), ("Pass the model that holds the weights",), code="no-parameters"),
    ErrorCase("meta-device", meta_llama, {}, PreparationError,
              ("meta device", "model.embed_tokens.weight", "never loaded"), ("Load the model with its weights",),
              code="meta-device"),
    ErrorCase("meta-device-4bit-skeleton", lambda p: build_meta_model(tiny_llama_config(), quantize="nf4"), {},
              PreparationError, ("meta device", "never loaded"), ("Load the model with its weights",),
              code="meta-device"),
    ErrorCase("kwargs-not-dict-list", load_4bit, {"gradient_checkpointing_kwargs": [("use_reentrant", False)]},
              ArgumentTypeError, ("gradient_checkpointing_kwargs must be a dict", "not list"), ("{'use_reentrant': False}",)),
    ErrorCase("kwargs-not-dict-str", load_4bit, {"gradient_checkpointing_kwargs": "use_reentrant=False"},
              ArgumentTypeError, ("not str",), ("{'use_reentrant': False}",)),
    ErrorCase("kwargs-unknown-key", load_4bit, {"gradient_checkpointing_kwargs": {"use_reentrent": False}},
              InvalidArgumentError, ("unknown option(s) ['use_reentrent']",), ("accepts", "'use_reentrant'")),
    ErrorCase("kwargs-non-string-key", load_4bit, {"gradient_checkpointing_kwargs": {1: True}},
              InvalidArgumentError, ("unknown option(s) ['1']",), ("'use_reentrant'",)),
    ErrorCase("kwargs-use-reentrant-string", load_4bit, {"gradient_checkpointing_kwargs": {"use_reentrant": "False"}},
              ArgumentTypeError, ("{'use_reentrant': 'False'}",), ("must be True or False",)),
    ErrorCase("use-gc-not-bool", load_4bit, {"use_gradient_checkpointing": "yes"}, ArgumentTypeError,
              ("use_gradient_checkpointing", "'yes'"), ("True or False",)),
    ErrorCase("use-gc-none", load_4bit, {"use_gradient_checkpointing": None}, ArgumentTypeError,
              ("use_gradient_checkpointing", "None"), ("True or False",)),
    ErrorCase("auto-clear-cache-int", load_4bit, {"auto_clear_cache": 1}, ArgumentTypeError,
              ("auto_clear_cache",), ("True or False",)),
    ErrorCase("offload-not-bool", load_4bit, {"offload": "cpu"}, ArgumentTypeError, ("offload", "'cpu'"), ("True or False",)),
    ErrorCase("upcast-unknown", load_4bit, {"upcast": "fp32"}, InvalidArgumentError, ("'fp32'",), ("'all'", "'norms'", "'none'")),
    ErrorCase("upcast-wrong-case", load_4bit, {"upcast": "ALL"}, InvalidArgumentError, ("'ALL'",), ("'all'",)),
    ErrorCase("upcast-none-object", load_4bit, {"upcast": None}, InvalidArgumentError, ("None",), ("'none'",)),
    ErrorCase("every-n-layers-zero", load_4bit, {"every_n_layers": 0}, InvalidArgumentError, ("every_n_layers", "0"), (">= 1",)),
    ErrorCase("every-n-layers-negative", load_4bit, {"every_n_layers": -2}, InvalidArgumentError, ("-2",), (">= 1",)),
    ErrorCase("every-n-layers-float", load_4bit, {"every_n_layers": 1.5}, InvalidArgumentError, ("1.5",), ("whole number",)),
    ErrorCase("every-n-layers-str", load_4bit, {"every_n_layers": "2"}, InvalidArgumentError, ("'2'",), ("whole number",)),
    ErrorCase("every-n-layers-bool", load_4bit, {"every_n_layers": True}, InvalidArgumentError, ("True",), ("whole number",)),
    ErrorCase("cannot-checkpoint-plain-module", lambda p: HoldsLinear4bit(), {}, PreparationError,
              ("HoldsLinear4bit has no gradient checkpointing method",), ("use_gradient_checkpointing=False",),
              code="cannot-checkpoint"),
    ErrorCase("supports-gradient-checkpointing-false", no_checkpointing_llama, {}, PreparationError,
              ("does not support gradient checkpointing",), ("use_gradient_checkpointing=False",),
              code="cannot-checkpoint"),
    ErrorCase("no-input-embeddings-reentrant", lambda p: NoInputEmbeddings(), {}, PreparationError,
              ("exposes no input embeddings",), ("{'use_reentrant': False}",), code="no-input-embeddings"),
]


def raised_in_kbitprep(excinfo: pytest.ExceptionInfo) -> bool:
    return KBITPREP_DIR in pathlib.Path(str(excinfo.traceback[-1].path)).parents


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda case: case.id)
def test_bad_input_raises_clear_error_and_changes_nothing(case: ErrorCase, llama_dir: pathlib.Path) -> None:
    model = case.model(llama_dir)
    before = model_state(model) if isinstance(model, nn.Module) else None

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(case.error) as excinfo:
            prepare_model_for_kbit_training(model, **case.kwargs)

    assert type(excinfo.value) is case.error
    assert_message(str(excinfo.value), case.problem, case.fix)
    assert raised_in_kbitprep(excinfo), f"raised from {excinfo.traceback[-1].path}, not from kbitprep"
    assert not [w for w in caught if issubclass(w.category, KbitPrepWarning)], "warned although nothing was done"
    if before is not None:
        assert model_state(model) == before

    if case.code is None:
        with pytest.raises(case.error, match="."):
            plan_preparation(model, **case.kwargs)
        if before is not None:
            assert model_state(model) == before
    else:  # planning a model that cannot be prepared works and lists the same problem, by code
        assert [problem.code for problem in excinfo.value.problems] == [case.code]
        plan = plan_preparation(model, **case.kwargs)
        errors = [d for d in plan.diagnostics if d.severity == "error"]
        assert errors == list(excinfo.value.problems)
        data = json.loads(json.dumps(plan.to_dict()))
        assert data["errors"] == list(plan.errors) == [excinfo.value.problems[0].message]
        assert {"code": case.code, "severity": "error", "message": plan.errors[0]} in data["diagnostics"]
        assert "error" in str(plan)
        assert model_state(model) == before


def test_meta_device_model_is_planned_and_sized(llama_dir: pathlib.Path) -> None:
    """`kbitprep inspect` sizes a model from its config alone: planning on meta must report full bytes."""
    plan = plan_preparation(meta_llama(llama_dir))
    loaded = LlamaForCausalLM.from_pretrained(llama_dir)
    assert plan.bytes_before == kbitprep.model_bytes(loaded)
    assert plan.parameter_counts["float"] == sum(p.numel() for p in loaded.parameters())

    # A 4-bit skeleton on meta holds no quantized data either, and that is expected there: no warning about it.
    skeleton = plan_preparation(build_meta_model(tiny_llama_config(), quantize="nf4"))
    assert skeleton.quantization == "bitsandbytes-4bit"
    assert skeleton.codes == ("meta-device",), skeleton.diagnostics


def test_cannot_checkpoint_model_prepares_without_checkpointing() -> None:
    """The fix the error names works."""
    model = HoldsLinear4bit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and it is quiet
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.norm.weight.dtype is torch.float32
    assert type(model.proj.weight) is bnb.nn.Params4bit and model.proj.weight.dtype is torch.uint8


def test_no_input_embeddings_prepares_with_non_reentrant_checkpointing() -> None:
    model = NoInputEmbeddings()
    prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.checkpoint_kwargs == {"use_reentrant": False}


# ---------------------------------------------------------------------------------------------
# Warnings: the preparation goes ahead, the warning names the problem and the fix


def prepare_recording(model: nn.Module, **kwargs: Any) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_model_for_kbit_training(model, **kwargs)
    return list(caught)


def only_warning(caught: list[warnings.WarningMessage], category: type[Warning], code: str) -> str:
    ours = [w for w in caught if issubclass(w.category, KbitPrepWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert ours[0].category is category
    assert ours[0].message.code == code
    assert ours[0].filename == __file__, "the warning should point at the caller's line"
    return str(ours[0].message)


def test_peft_model_warns_and_keeps_adapters_trainable(llama_dir: pathlib.Path) -> None:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft's own, about transformers' renamed API
        model = peft.get_peft_model(load_4bit(llama_dir), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert adapters and all("lora_" in name for name in adapters)
    model.base_model.model.lm_head.weight.requires_grad_(True)  # a base weight someone left trainable
    assert sorted(plan_preparation(model).kept_trainable) == sorted(adapters + ["base_model.model.lm_head.weight"])

    message = only_warning(prepare_recording(model), KbitPrepWarning, "peft-model")

    assert_message(message, ("PeftModel",), ("Prepare the base model first", "get_peft_model"))
    assert sorted(name for name, p in model.named_parameters() if p.requires_grad) == sorted(
        adapters + ["base_model.model.lm_head.weight"])
    assert all(p.dtype is torch.float32 for name, p in model.named_parameters() if "lora_" in name)
    assert kbitprep.verify_gradient_flow(model).ok


def test_unknown_tensor_subclass_is_never_cast_and_named(llama_dir: pathlib.Path) -> None:
    model = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float16)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = nn.Parameter(layer.weight.detach().clone().as_subclass(TagTensor), requires_grad=False)
    weight, pointer = layer.weight, layer.weight.data_ptr()

    message = only_warning(prepare_recording(model), KbitPrepWarning, "unknown-tensor-subclass")

    assert_message(message, ("model.layers.0.mlp.up_proj.weight", "TagTensor", "never cast"),
                   ("plain torch.nn.Parameter",))
    assert layer.weight is weight and type(weight) is TagTensor
    assert weight.dtype is torch.float16 and weight.data_ptr() == pointer
    # An unknown backend keeps its own precision, as gptq/awq/... do: nothing else is cast either.
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert plan_preparation(model).quantization == "unknown"


def test_bnb_4bit_head_without_quantized_weights_names_skip_modules(llama_dir: pathlib.Path) -> None:
    # A new classification head is missing from the checkpoint, so it keeps a plain weight inside
    # a Linear4bit; transformers skips it by default, a user-given skip list can bring it back.
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(llama_dir, quantization_config=config, num_labels=2)
    assert isinstance(model.score, bnb.nn.Linear4bit) and getattr(model.score.weight, "quant_state", None) is None

    message = only_warning(prepare_recording(model), KbitPrepWarning, "bnb-unquantized-4bit-layers")

    assert_message(message, ("hold no quantized weights", "score", "quantization state not initialized"),
                   ("llm_int8_skip_modules=['score']",))

    # The fix the warning names: the head stays a plain layer, no warning, and the forward runs.
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head", "score"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = AutoModelForSequenceClassification.from_pretrained(llama_dir, quantization_config=config, num_labels=2)
    assert prepare_recording(fixed) == []
    assert fixed(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 2)


def test_not_quantized_model_warns_with_cost_and_alternatives(llama_dir: pathlib.Path) -> None:
    model = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float16)
    plan = plan_preparation(model)
    cost = plan.bytes_after - plan.bytes_before
    assert plan.quantization is None and not plan.checkpointing.enabled and plan.codes == ("not-quantized",)

    message = only_warning(prepare_recording(model), NotQuantizedWarning, "not-quantized")

    assert_message(message, ("not quantized", f"+{cost:,} bytes"), ("BitsAndBytesConfig", "upcast='none'"))
    assert cost > 0 and {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())

    # upcast="none" still warns (the model is not quantized) but casts nothing.
    model = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float16)
    only_warning(prepare_recording(model, upcast="none"), NotQuantizedWarning, "not-quantized")
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_float_quant_storage_with_upcast_all_warns_about_fsdp(llama_dir: pathlib.Path) -> None:
    model = load_4bit(llama_dir, bnb_4bit_quant_storage=torch.bfloat16)
    message = only_warning(prepare_recording(model), KbitPrepWarning, "bnb-quant-storage-with-upcast")
    assert_message(message, ("stored as ['bfloat16']", "FSDP"), ("upcast='none'",))

    quiet = load_4bit(llama_dir, bnb_4bit_quant_storage=torch.bfloat16)
    assert prepare_recording(quiet, upcast="none") == []


def test_use_reentrant_none_means_the_default_and_stays_quiet(llama_dir: pathlib.Path) -> None:
    """torch reads None as its (reentrant) default: the input-grad hook must be planned for it,
    and use_reentrant passed explicitly so torch does not warn at every forward."""
    import peft

    model = load_4bit(llama_dir)
    plan = plan_preparation(model, gradient_checkpointing_kwargs={"use_reentrant": None})
    assert plan.checkpointing.kwargs == {"use_reentrant": True} and plan.checkpointing.input_grad_hook
    assert prepare_recording(model, gradient_checkpointing_kwargs={"use_reentrant": None}) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft's own
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kbitprep.verify_gradient_flow(model)
    assert not [w for w in caught if "use_reentrant" in str(w.message)]


def test_offload_without_accelerator_warns_and_is_ignored(llama_dir: pathlib.Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers pins offloaded activations; with no accelerator that raises at the first forward.
    # The machine's hardware does not matter here: the check is made to say "no accelerator".
    monkeypatch.setattr(kbitprep.checkpointing, "has_accelerator", lambda: False)
    model = load_4bit(llama_dir)
    caught = prepare_recording(model, offload=True)
    messages = [str(w.message) for w in caught]
    assert len(caught) == 1 and caught[0].filename == __file__, messages
    assert caught[0].message.code == "offload-without-accelerator"
    assert_message(messages[0], ("offload=True needs an accelerator",), ("offload ignored",))
    assert plan_preparation(model, offload=True).checkpointing.offload is False
    assert kbitprep.verify_gradient_flow(attach_lora(model)).ok
