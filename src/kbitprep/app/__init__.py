"""The application around the preparation core: loading, data, the run folder, fine-tuning, the demo.

The core (`kbitprep.backends`, `plan`, `apply`, `checkpointing`, `verify`, `sizing`,
`device`) imports nothing from here; this package builds the `kbitprep` command's runs on
top of it. One module per concern:

    settings     FinetuneSettings: each option declared once (CLI, checks, resume, report, docs)
    finetune     FinetuneRun: claim → load → prepare → adapt → train → save; finetune()
    trainer      the Trainer subclass, its arguments, and the run's callback (transformers)
    lora         attaching the LoRA adapter (peft)
    sampling     the first batch's loss and greedy sample completions
    run_report   FinetuneReport (report.json); plotting: the loss curve (matplotlib)
    observer     FinetuneObserver, the progress interface the CLI renders
    distributed  starting the processes and the barriers under torchrun
    chat         "messages" rows: the chat template, the assistant spans that are trained
    packing      rows packed into --seq-len sequences, and the check that they stay apart
    evaluation   held-out rows, the eval loss and perplexity during training
    merge        `kbitprep merge`: the adapter folded into the dequantized base
    data, loading, outputs, quiet, inspection, demo, loss: as their docstrings say
"""
