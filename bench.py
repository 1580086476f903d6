"""Benchmarks that print numbers (speed and memory targets live here, not in timed unit tests). Each
mode is a module of benchmarks/ with its own keys; this script parses them all and runs the one
--mode names.

    # training throughput, MFU (benchmarks/train_speed.py)
    python bench.py --mode=train --preset=tiny
    # GPT-2 124M shape, batch 4 (also: 6x384, batch 8)
    python bench.py --mode=train --preset=124m
    # nanoGPT's recipe for the device (CPU or CUDA), to compare
    python bench.py --mode=train --preset=124m --baseline
    # + where the step's time goes, the matmul-only ceiling
    python bench.py --mode=train --preset=124m --profile
    # generation tokens/s, KV cache on/off, vs transformers (quick)
    python bench.py --mode=generate
    # the same at GPT-2 124M shape: 32 + 256 tokens, batch 1 and 8
    python bench.py --mode=generate --gen_preset=full
    # bf16 vs fp32: same tokens?
    python bench.py --mode=half --ckpt=out/finetuned_X.pt --dataset=data/chat
    # sample.py end to end, fp32 and bf16, vs transformers (124M)
    python bench.py --mode=sample --gen_preset=full
    # GPT-2 medium shape: full vs trainable_layers=1 vs LoRA rank 8
    python bench.py --mode=finetune
    # prepare.py end to end vs a bare tokenise-and-write loop
    python bench.py --mode=prepare
    # per-rank peak memory and tokens/s, DDP vs FSDP, 2 processes at GPT-2 medium shape
    OMP_NUM_THREADS=1 python bench.py --mode=parallel
    # DPO vs SFT (+ precomputed reference, + LoRA): ms/step, pairs/s, peak memory, GPT-2 124M shape
    python bench.py --mode=preference

Every run ends with one machine-readable JSON line.
"""
import json
import sys

import configurator
from benchmarks import (finetune_cost, generate_speed, half_precision, parallel_memory,
                        preference_cost, prepare_speed, sample_speed, train_speed)

# --mode=X runs MODES[X].bench(cfg): the module holds the benchmark and the keys only it reads
MODES = {"train": train_speed, "generate": generate_speed, "half": half_precision,
         "sample": sample_speed, "finetune": finetune_cost, "prepare": prepare_speed,
         "parallel": parallel_memory, "preference": preference_cost}

DEFAULTS = dict(  # `python bench.py --help` prints these comments and those of each mode's DEFAULTS
    mode="train",  # train | generate | half | sample | finetune | prepare | parallel | preference
    device="auto",  # auto, cpu, cuda, cuda:N or mps
    # auto (bf16 where the device has it; --mode=generate: fp32), float32, bfloat16 or float16
    dtype="auto",
    seed=1337,  # seed of the random weights and tokens
    **train_speed.DEFAULTS, **generate_speed.DEFAULTS, **half_precision.DEFAULTS,
    **sample_speed.DEFAULTS, **finetune_cost.DEFAULTS, **prepare_speed.DEFAULTS,
    **parallel_memory.DEFAULTS, **preference_cost.DEFAULTS,
)


def key_meanings():
    """{key: meaning} for --help: the comments of this file's DEFAULTS and each mode's."""
    files = [__file__] + [module.__file__ for module in MODES.values()]
    return {key: text for path in files for key, text in configurator.key_meanings(path).items()}


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="bench.py", meanings=key_meanings())
    if cfg["mode"] not in MODES:
        raise SystemExit(f"error: unknown --mode={cfg['mode']!r}: use one of {sorted(MODES)}")
    result = MODES[cfg["mode"]].bench(cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
