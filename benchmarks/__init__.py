"""bench.py's modes, one module each (`python bench.py --mode=X`); each defines the DEFAULTS only it
reads and one bench(cfg) that prints a report and returns the JSON line's dict.

    train_speed      --mode=train     train.py's train_step on random tokens: tokens/s, MFU, --profile's breakdown
    generate_speed   --mode=generate  decoding tokens/s, KV cache on/off, half-precision weights, vs transformers
    half_precision   --mode=half      a trained model in fp32 vs half precision: same greedy tokens? perplexity?
    sample_speed     --mode=sample    sample.py end to end as processes, fp32 and half, vs transformers
    finetune_cost    --mode=finetune  full vs last block vs LoRA at GPT-2 medium shape: speed, memory, checkpoints
    prepare_speed    --mode=prepare   prepare.py end to end vs tools/prepare_bare.py's bare loop
    parallel_memory  --mode=parallel  DDP vs FSDP, 2 processes under torchrun: per-rank peak memory, tokens/s
    preference_cost  --mode=preference  DPO vs SFT steps (copy / precomputed / LoRA reference): ms, pairs/s, memory
"""
