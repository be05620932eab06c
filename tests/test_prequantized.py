"""Model folders saved already quantized by bitsandbytes (`save_pretrained` of a 4-bit or 8-bit model).

Checked, on folders made here from the demo's tiny Llama (nf4 with and without double
quantization, fp4, int8; bitsandbytes 0.50 serializes all of them on a CPU):

- what each folder holds is read from its config.json alone, as a literal table;
- the `--quantize` rule: `auto` loads a saved folder as saved (nf4 for any other), its own
  format named explicitly is accepted, every other value is refused before anything loads;
  another quantization method (gptq) is refused naming what is supported;
- loading does not quantize twice: the packed bytes the model holds are the file's bytes,
  and the 4-bit layers compute in the dtype `--compute-dtype` resolves to;
- the meta skeleton (`inspect`, the memory model, the `--fsdp` skeleton) is the loaded
  model's: the same parameter names, shapes and dtypes, double quantization included;
- the weight-shape check before loading compares packed shapes, and still names a config
  that does not belong to the weights;
- `finetune` on a saved folder records the format it found, resumes against it, and
  `merge` gives exactly dequantize(stored 4-bit or int8 weights) + the adapter's update;
- `finetune --fsdp` under torchrun trains from a saved nf4 folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kbitprep.app.demo import DEMO_DATA, build_tiny_model
from kbitprep.backends.bitsandbytes import (
    QuantizeConflictError,
    UnsupportedQuantizationError,
    resolve_quantize,
    saved_quantization,
)

# folder name -> BitsAndBytesConfig arguments it is saved with
SAVED = {
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}
FOUR_BIT = ("nf4-double", "nf4", "fp4")
ROOT = Path(__file__).resolve().parents[1]


def _quiet() -> warnings.catch_warnings:
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("ignore")
    return context


def save_prequantized(base: Path, folder: Path, arguments: dict) -> Path:
    """`base` loaded with a BitsAndBytesConfig and saved with `save_pretrained`, with its tokenizer."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(**arguments))
        model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prequantized")
    base = build_tiny_model(root / "plain")
    return {"plain": base, **{name: save_prequantized(base, root / name, args) for name, args in SAVED.items()}}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_what_each_folder_holds_is_read_from_its_config(folders: dict[str, Path]) -> None:
    held = {name: (lambda s: s and (s.quantize, s.double_quant, s.storage))(saved_quantization(_config(folder)))
            for name, folder in folders.items()}
    assert held == {"plain": None, "nf4-double": ("nf4", True, "uint8"), "nf4": ("nf4", False, "uint8"),
                    "fp4": ("fp4", False, "uint8"), "int8": ("int8", False, "uint8")}


def test_auto_loads_as_saved_and_a_contradicting_quantize_is_refused(folders: dict[str, Path]) -> None:
    for name in SAVED:
        stored = name.split("-")[0]
        assert resolve_quantize(_config(folders[name]), "auto")[0] == stored
        assert resolve_quantize(_config(folders[name]), stored)[0] == stored  # named explicitly: the same
        for other in ("nf4", "fp4", "int8", "none"):
            if other != stored:
                with pytest.raises(QuantizeConflictError, match=rf"saved already quantized by bitsandbytes "
                                   rf"\({stored}.*--quantize {other} .*pass --quantize {stored}"):
                    resolve_quantize(_config(folders[name]), other, where=str(folders[name]))
    assert resolve_quantize(_config(folders["plain"]), "auto") == ("nf4", None)
    assert resolve_quantize(_config(folders["plain"]), "none") == ("none", None)


def test_another_quantization_method_names_what_is_supported() -> None:
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    with pytest.raises(UnsupportedQuantizationError, match="'gptq'.*bitsandbytes \\(4-bit nf4/fp4, 8-bit\\)"):
        resolve_quantize(config, "auto")


@pytest.mark.parametrize("name", list(SAVED))
def test_loading_keeps_the_stored_bytes_and_the_skeleton_matches_the_load(folders: dict[str, Path],
                                                                           name: str) -> None:
    from safetensors.torch import load_file

    from kbitprep.app.model.loading import load_quantized_model
    from kbitprep.sizing import build_meta_model

    context = _quiet()
    try:
        model = load_quantized_model(folders[name], "auto", compute="float32")
        skeleton = build_meta_model(folders[name], quantize="auto", dtype=torch.bfloat16)
    finally:
        context.__exit__(None, None, None)
    stored = load_file(folders[name] / "model.safetensors")
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.weight.data, stored["model.layers.0.self_attn.q_proj.weight"])  # not quantized again
    if name != "int8":
        assert layer.compute_dtype == torch.float32
        assert (layer.weight.quant_state.state2 is not None) == (name == "nf4-double")

    def layout(m: torch.nn.Module) -> dict:
        return {n: (tuple(p.shape), p.dtype) for n, p in m.named_parameters()}

    assert layout(skeleton) == layout(model)
    if name != "int8":
        loaded = model.model.layers[0].mlp.up_proj.weight.quant_state
        meta = skeleton.model.layers[0].mlp.up_proj.weight.quant_state
        assert (meta.absmax.dtype, meta.absmax.shape, meta.quant_type) == \
            (loaded.absmax.dtype, loaded.absmax.shape, loaded.quant_type)


def test_inspect_sizes_a_saved_folder_as_saved_from_config_alone_and_with_weights(folders: dict[str, Path]) -> None:
    from kbitprep.app.model.inspection import inspect_model

    context = _quiet()
    try:
        meta = inspect_model(folders["nf4-double"], meta=True)
        loaded = inspect_model(folders["nf4-double"])
        plain_nf4 = inspect_model(folders["plain"], meta=True)  # the same format, quantized at load
    finally:
        context.__exit__(None, None, None)
    assert (meta.quantize, meta.saved, loaded.saved) == ("nf4", "nf4 with double quantization",
                                                          "nf4 with double quantization")
    for policy in meta.plans:
        assert meta.plans[policy].bytes_before == loaded.plans[policy].bytes_before \
            == plain_nf4.plans[policy].bytes_before
    with pytest.raises(QuantizeConflictError):
        inspect_model(folders["nf4-double"], quantize="int8")


def test_the_memory_model_sizes_a_saved_folder_as_its_quantization(folders: dict[str, Path]) -> None:
    from kbitprep.app.memory.estimate import MemorySettings, plan_memory

    for saved, plain in (("fp4", "fp4"), ("nf4-double", "nf4")):
        ours = plan_memory(folders[saved], MemorySettings(batch_size=1, seq_len=16, device="cpu"))
        reference = plan_memory(folders["plain"], MemorySettings(quantize=plain, batch_size=1, seq_len=16,
                                                                device="cpu"))
        assert ours.estimate.total == reference.estimate.total
        assert ours.to_dict()["components"] == reference.to_dict()["components"]


def test_the_shape_check_compares_packed_shapes_and_names_a_foreign_config(folders: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    from kbitprep.app.model.loading import ModelFolderError, check_weight_shapes

    check_weight_shapes(folders["nf4-double"], "nf4")  # packed [N, 1] weights are what it expects
    foreign = shutil.copytree(folders["nf4-double"], tmp_path / "foreign")
    config = _config(foreign)
    config["intermediate_size"] = 256
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="mlp.*has shape .* but config.json gives it"):
        check_weight_shapes(foreign, "nf4")


def test_settings_resolve_auto_against_the_folder_so_resume_compares_the_format(folders: dict[str, Path]) -> None:
    from kbitprep.app.config.settings import FinetuneSettings

    recorded = FinetuneSettings(str(folders["fp4"]), "d", "o").resolved()
    assert recorded.quantize == "fp4"
    assert FinetuneSettings(str(folders["fp4"]), "d", "o", quantize="fp4").resolved() \
        .resume_differences(recorded.to_dict()) == []
    assert FinetuneSettings(str(folders["plain"]), "d", "o").resolved().quantize == "nf4"
    with pytest.raises(QuantizeConflictError):
        FinetuneSettings(str(folders["fp4"]), "d", "o", quantize="none").resolved()


def test_finetune_refuses_a_contradicting_quantize_before_writing_anything(folders: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "kbitprep", "finetune", str(folders["nf4-double"]),
                             str(DEMO_DATA), "--output", str(out), "--quantize", "int8"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                            timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kbitprep: error: ") and "--quantize int8" in lines[0]
    assert "Traceback" not in result.stderr and not out.exists()


def _finetune(model: Path, out: Path) -> dict:
    from kbitprep.app.config.settings import FinetuneSettings
    from kbitprep.app.training.run import finetune

    settings = FinetuneSettings(str(model), str(DEMO_DATA), str(out), lora_r=4, lora_dropout=0.0, lr=1e-2,
                                batch_size=4, max_steps=3, seq_len=32, upcast="norms")
    context = _quiet()
    try:
        finetune(settings)
    finally:
        context.__exit__(None, None, None)
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nf4-double", "int8"])
def test_finetune_and_merge_of_a_saved_folder_dequantize_the_stored_weights(folders: dict[str, Path],
                                                                            tmp_path: Path, name: str) -> None:
    import bitsandbytes as bnb
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kbitprep.app.export.merge import adapter_updates, merge_run

    report = _finetune(folders[name], tmp_path / "run")
    assert report["settings"]["quantize"] == name.split("-")[0]
    merged = merge_run(tmp_path / "run", tmp_path / "merged", dtype="fp32")
    assert merged.dequantized == 14 and merged.merged == 14
    ours = load_file(tmp_path / "merged" / "model.safetensors")

    # The oracle: the stored weights as transformers loads them (never quantized by kbitprep),
    # dequantized by bitsandbytes, plus scale * B @ A from the adapter file.
    context = _quiet()
    try:
        stored = AutoModelForCausalLM.from_pretrained(folders[name])
    finally:
        context.__exit__(None, None, None)
    updates = {module: update for module, update, _ in adapter_updates(tmp_path / "run" / "adapter")}
    for module_name, module in stored.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weight = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
        else:
            continue
        expected = weight.float() + updates[module_name]
        torch.testing.assert_close(ours[f"{module_name}.weight"], expected, rtol=0, atol=0)


@pytest.mark.slow
def test_finetune_fsdp_under_torchrun_trains_from_a_saved_nf4_folder(folders: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "kbitprep", "finetune", str(folders["nf4-double"]), str(DEMO_DATA), "--output", str(run),
               "--fsdp", "--max-steps", "2", "--save-steps", "2", "--batch-size", "2", "--seq-len", "32",
               "--upcast", "norms"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((run / "report.json").read_text())
    assert report["world_size"] == 2 and report["settings"]["quantize"] == "nf4"
    assert 0.45 <= report["model"]["sharding"]["fraction"] <= 0.55
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
