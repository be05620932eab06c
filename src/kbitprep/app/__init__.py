"""The application around the preparation core: the `kbitprep` command's runs, folder by concern.

The core (`kbitprep.backends`, `plan`, `apply`, `checkpointing`, `verify`, `sizing`,
`device`, `precision`, and the chunked loss `kbitprep.loss`) imports nothing from here.
Each folder owns one concern and says so in its `__init__`:

    config/       settings: each finetune option declared once (CLI, checks, resume, report, docs)
    data/         rows: reading data files; chat: conversations and their trained spans;
                  tokenize: ids, labels and batches; packing: rows packed into --seq-len
    model/        loading (quantized), lora, inspection (`kbitprep inspect`), quiet (known log notes)
    training/     run: FinetuneRun, the phases claim → load → prepare → adapt → train → report → save;
                  executor: what differs by executor (TrainerExecutor: one process or DDP);
                  sharded: ShardedExecutor (`--fsdp`); trainer, divergence, evaluation, sampling, observer
    memory/       estimate: the fit check; step: a training step on the meta device;
                  simulated_loss; live_bytes: counting live tensor bytes, measured peaks
    distributed/  processes: torchrun start-up and barriers; fsdp: sharding the 4-bit base with FSDP2;
                  loop: the sharded step loop
    runs/         folder: the run folder (lock, manifest, checkpoints, atomic writes);
                  report: report.json; plot: the loss curve
    export/       merge: the adapter folded into the dequantized base; gguf: the merged model as
                  one GGUF file (llama.cpp); generate: `kbitprep generate` from a run or merged folder
    demo          `kbitprep demo`: the whole pipeline on the model and data shipped in the package

Imports go one way, down this list's dependencies: training uses data, model, memory, runs and
distributed; export uses model and runs; the CLI (`kbitprep.cli`) uses all of it and nothing
here uses the CLI.
"""
