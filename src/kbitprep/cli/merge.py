"""`kbitprep merge RUN_DIR --output DIR`: a finished run's adapter merged into a standalone model folder."""

from __future__ import annotations

import argparse

from rich.console import Console

HELP = "merge a finished run's adapter into its dequantized base; write a model folder that needs no peft"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..app.export.merge import MERGE_DTYPES

    parser = commands.add_parser(
        "merge", help=HELP, description=HELP[0].upper() + HELP[1:] + " or bitsandbytes.",
        epilog="The base is loaded and dequantized exactly as the run loaded it, so the merged weights are the "
               "ones the adapter was trained against. The folder loads with AutoModelForCausalLM.from_pretrained.",
    )
    parser.add_argument("run", metavar="RUN_DIR", help="the --output folder of a finished `kbitprep finetune` run")
    parser.add_argument("--output", metavar="DIR", required=True, help="the model folder to create (must not exist)")
    parser.add_argument("--dtype", choices=list(MERGE_DTYPES), default=None,
                        help="dtype of the merged weights (default: the base model's)")
    from ..app.export.gguf import GGUF_ARCHITECTURES, GGUF_DTYPES

    parser.add_argument("--gguf", action="store_true",
                        help="also write model.gguf for llama.cpp/Ollama, tokenizer and chat template inside "
                             f"({', '.join(GGUF_ARCHITECTURES)})")
    parser.add_argument("--gguf-dtype", choices=list(GGUF_DTYPES), default="f16",
                        help="type of the GGUF file's weight matrices; norms stay f32. q8_0 ... q4_0 are written by "
                             "the gguf package, the k-quants (q6_k ... q2_k) by llama.cpp's quantizer (needs "
                             "llama-cpp-python: pip install 'kbitprep[llama-cpp]') (default: %(default)s)")
    parser.add_argument("--gguf-pre", metavar="NAME", default=None,
                        help="llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) for a byte-level BPE tokenizer "
                             "llama.cpp's table does not recognise; you vouch that it splits text the same "
                             "(default: found from the tokenizer's behaviour, refused when unknown)")
    parser.add_argument("--verify", action="store_true",
                        help="compare the written model (and model.gguf, where llama-cpp-python is installed) with "
                             "the run's 4-bit base + adapter on the run's first rows: max logit difference and "
                             "greedy agreement; fail, writing nothing, past the printed tolerance")
    return parser


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.export.merge import merge_run

    with console.status("merging"):
        report = merge_run(args.run, args.output, dtype=args.dtype, gguf=args.gguf, gguf_dtype=args.gguf_dtype,
                           gguf_pre=args.gguf_pre, verify=args.verify)
    console.print(f"merged {report.merged} adapted layer(s) into {report.dequantized} dequantized "
                  f"{report.quantize} layer(s) of {report.base}", markup=False, highlight=False)
    console.print(f"wrote {report.output} ({report.dtype}, {report.seconds:.1f} s); load it with "
                  "AutoModelForCausalLM.from_pretrained", markup=False, highlight=False)
    if report.gguf:
        console.print(f"wrote {report.gguf} ({args.gguf_dtype}); run it with llama.cpp (llama-cli -m ...) or "
                      "Ollama (FROM ./model.gguf)", markup=False, highlight=False)
    if report.modelfile:
        console.print(f"wrote {report.modelfile}: `ollama create NAME -f {report.modelfile}`", markup=False,
                      highlight=False)
    console.print(f"generation stops at token id(s) {', '.join(map(str, report.eos_token_ids)) or 'none'} "
                  "(generation_config.json eos_token_id)", markup=False, highlight=False)
    for figures in report.verify or ():
        judged = f"tolerance {figures['tolerance']:g}" if figures["tolerance"] is not None else "not judged"
        console.print(f"verified {figures['model']} ({figures['dtype']}) on {figures['rows']} row(s) of the run's "
                      f"data: max |logit difference| {figures['max_abs']:.4g} ({figures['relative']:.3g} of the "
                      f"logit scale {figures['scale']:.4g}; {judged}), greedy agreement {figures['agreement']:.3f}"
                      + (f" (at least {figures['min_agreement']:g})" if figures["min_agreement"] is not None else ""),
                      markup=False, highlight=False)
    return 0
