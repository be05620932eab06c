"""The application around the preparation core: the `kbitprep` command's runs, folder by concern.

The core (`kbitprep.backends`, `plan`, `apply`, `checkpointing`, `verify`, `sizing`,
`device`, `precision`, and the chunked loss `kbitprep.loss`) imports nothing from here.
Each folder owns one concern and says so in its `__init__`:

    config/       settings: each finetune option declared once (CLI, checks, resume, report, docs,
                  the run file); runfile: --config run.yaml; schedule: the learning-rate schedule
    data/         rows: the row kinds; formats: which keys make which row (alpaca, sharegpt, ...);
                  files: the containers (datasets); jsonl: JSONL line by line; chat: conversations
                  and their trained spans; tokenize: ids, labels and batches; packing
    model/        loading (quantized, or saved quantized), lora, inspection (`kbitprep inspect`),
                  quiet (known log notes)
    training/     run: FinetuneRun, the phases claim → load → prepare → adapt → train → report → save,
                  over values; inputs: what a run reads, once; executor: what differs by executor
                  (TrainerExecutor: one process or DDP); sharded: ShardedExecutor (`--fsdp`) and
                  sharded_loop (its steps); hooks: per-step features both loops call; order: the
                  example order; trainer, divergence, evaluation, sampling, observer, tensorboard_log
    memory/       estimate: the fit check; step: a training step on the meta device;
                  simulated_loss; live_bytes: counting live tensor bytes, measured peaks
    distributed/  processes: torchrun start-up and barriers; fsdp: sharding the 4-bit base with FSDP2
    runs/         folder: the run folder (lock, manifest, checkpoints, atomic writes);
                  report: report.json; plot: the loss curve
    export/       merge: the adapter folded into the dequantized base; gguf: the merged model as
                  one GGUF file (llama.cpp); generate: `kbitprep generate` from a run or merged folder
    demo          `kbitprep demo`: the whole pipeline on the model and data shipped in the package

Imports go one way, no folder back to one above it (`tests/test_layout.py` keeps modules
free of circles): export uses training, model and runs; training uses distributed, memory,
config, data, model and runs; distributed uses config and data; memory uses config and model;
config uses data, model and runs; data uses runs. The CLI (`kbitprep.cli`) uses all of it
and nothing here uses the CLI.
"""
