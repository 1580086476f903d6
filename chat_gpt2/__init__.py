"""The library behind the scripts (prepare.py, train.py, sample.py, eval.py, export.py, serve.py,
classify.py, bench.py), with the two top-level modules that are the project's face: model.py (the
GPT) and configurator.py.

Imports point one way: scripts -> this package (and the two top-level modules); each module imports
only the ones listed above it. `model` and `configurator` live at the top level of the repository,
the others in chat_gpt2/.

    errors         the project's own error types (one-line messages for the user)
    files          atomic writes (temp file + rename), temporary folders, leftovers of killed runs
    configurator   (top level) config files and --key=value overrides
    tokenizer      a trained byte-level BPE: tokenizer.json -> tiktoken, the record that travels
                   in meta.json and checkpoints, mismatch checks (training: build.train_bpe)
    chat           the chat templates: token ids and training mask in one place; the Jinja template
    device         device, dtype, autocast, the CPU allocator, free memory, peak FLOP/s
    model          (top level) the GPT-2 model
    lora           LoRA adapters and training only the last blocks
    classifier     a GPT with a classification head (last real token): loss, predictions, P/R/F1
    hf_gpt2        Hugging Face GPT-2 weights in and out
    hf_tokenizer   a byte-level BPE's tokenizer files (GPT-2's or a trained one) for an export
    gguf_export    a chat or text model as a GGUF file (llama.cpp, Ollama) and an Ollama Modelfile
    checkpoint     checkpoint names, atomic save, weights-only load, model rebuild (LoRA merged)
    sampling       SamplingParams (each option declared once: default, help, bounds), sampling math
    engine         generation: the KV cache, a Decoder whose rows join and leave, streamed replies
    inference      an Engine from a script's options: checkpoint, weights to half, SamplingParams
    batcher        one worker thread: queued requests join the running batch (serve.py)
    server         the HTTP app: OpenAI-compatible API, /chat, the chat page (serve.py)
    sources        parquet files streamed as records, Hub datasets resolved to cached parquet files
    records        chat records read (.jsonl / .json / .parquet, their schemas) and plain text (.txt)
    dataset        the prepared dataset (chat or text) read: file names, meta.json, batches
    build          the prepared dataset built: tokenised, split train/val, published all or nothing
    preference     preference pairs: four layouts, the dataset built and read, DPO / SimPO losses
    classify_data  labelled text (.csv/.tsv/.jsonl/.json): columns, stratified split, batches
    memory         a training run's memory estimate and check
    training       the model to train, LR, early stopping, forward/backward, the step, eval sums
    parallel       under torchrun: DDP or FSDP2 (sharded), full state dicts gathered to rank 0
    evaluation     val loss, replies to held-out conversations, exact match and F1, multiple choice
    objectives     what a run optimises, by meta.json's kind: batches, loss, eval, report, FLOPs
    run_log        the log lines, metrics.jsonl, wandb and the loss plot
    judge          the optional external judge
"""
