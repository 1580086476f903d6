"""--mode=finetune: full fine-tuning vs the last block only vs LoRA at GPT-2 medium shape, each
variant in a fresh process: tokens/s, peak memory, trainable parameters, checkpoint sizes.

    python bench.py --mode=finetune                  # GPT-2 medium shape: full vs trainable_layers=1 vs LoRA rank 8
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from benchmarks.train_speed import PRESET_OVERRIDES, RandomTokens, peak_rss_mb, time_steps
from chat_gpt2.device import resolve_device, resolve_dtype, tune_cpu_allocator
from chat_gpt2.lora import TARGETS, adapter_state, apply_lora, freeze_layers
from chat_gpt2.training import DEFAULT_GRAD_CLIP, train_step
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python bench.py --help` prints these comments (--batch_size ... --warmup: as --mode=train's)
DEFAULTS = dict(
    # --mode=finetune: the variants to compare, each in its own process
    variants="full,layers1,lora8,lora8ckpt",
    variant="",  # --mode=finetune: run just this one, in this process
)

FINETUNE = dict(n_layer=24, n_head=16, n_embd=1024, batch_size=4, block_size=256, steps=3, warmup=1)
VARIANTS = {"full": {}, "layers1": {"trainable_layers": 1}, "lora8": {"lora_rank": 8},
            "lora8ckpt": {"lora_rank": 8, "grad_checkpointing": True},
            "fullckpt": {"grad_checkpointing": True}}


def bench(cfg):
    """Each variant in a fresh process (so its peak RSS is its own): tokens/s, peak memory,
    trainable parameters and the size of its best (weights) and _last (weights + AdamW state)
    checkpoints."""
    if cfg["variant"]:
        return _finetune_variant(cfg)
    rows = []
    for name in cfg["variants"].split(","):
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}: use some of {','.join(VARIANTS)}")
        flags = [f"--{k}={cfg[k]}" for k in ("device", "dtype", *PRESET_OVERRIDES)]
        p = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--mode=finetune",
                            f"--variant={name}", *flags], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"error: variant {name} failed:\n{p.stderr}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print("finetune: GPT-2 medium shape "
          f"{FINETUNE['n_layer']}x{FINETUNE['n_head']}x{FINETUNE['n_embd']}, batch "
          f"{rows[0]['batch_size']} x block {rows[0]['block_size']}, device {rows[0]['device']}, "
          f"dtype {rows[0]['dtype']}, {rows[0]['threads']} threads, load avg "
          f"{rows[0]['load_avg_1min']}")
    print(f"  {'variant':<9}{'trainable':>16}{'tokens/s':>10}{'peak RSS':>11}{'best ckpt':>12}"
          f"{'_last ckpt':>12}")
    for r in rows:
        print(f"  {r['variant']:<9}{r['trainable_params']:>16,}{r['tokens_per_s']:>10,.0f}"
              f"{r['peak_rss_mb']:>8,.0f} MB{r['best_ckpt_mb']:>9,.1f} MB"
              f"{r['last_ckpt_mb']:>9,.1f} MB")
    return {"mode": "finetune", "variants": rows}


def _finetune_variant(cfg):
    p = {**FINETUNE, **{k: cfg[k] for k in PRESET_OVERRIDES if cfg[k]}}
    device = resolve_device(cfg["device"])
    run = {"device": device, "dtype": resolve_dtype(cfg["dtype"], device), "ddp": False}
    settings = VARIANTS[cfg["variant"]]
    tune_cpu_allocator(device, lean=settings.get("grad_checkpointing", False))  # as train.py does
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"],
                          block_size=p["block_size"], vocab_size=50304, dropout=0.0))
    if settings.get("lora_rank"):
        apply_lora(model,
                   {"rank": settings["lora_rank"], "alpha": float(settings["lora_rank"]),
                    "dropout": 0.0,
                           "targets": list(TARGETS)})
    freeze_layers(model, settings.get("trainable_layers", -1))
    model.grad_checkpointing = settings.get("grad_checkpointing", False)
    model.to(device)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.split(":")[0])
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=run["dtype"] == "float16")
    step_cfg = {"gradient_accumulation_steps": 1, "batch_size": p["batch_size"],
                "block_size": p["block_size"], "grad_clip": DEFAULT_GRAD_CLIP}
    data, gen = RandomTokens(model.config.vocab_size), torch.Generator().manual_seed(cfg["seed"])

    def step(data, gen):
        return train_step(model, optimizer, scaler, data, gen, step_cfg, run)
    time_steps(step, data, gen, p["warmup"], device)
    times, _, _ = time_steps(step, data, gen, p["steps"], device)
    weights = adapter_state(model) if settings.get("lora_rank") else model.state_dict()
    # what train.py's best and _last files hold, less the small extras
    with tempfile.TemporaryDirectory() as tmp:
        best, last = os.path.join(tmp, "best.pt"), os.path.join(tmp, "last.pt")
        torch.save({"model": weights}, best)
        torch.save({"model": weights, "optimizer": optimizer.state_dict()}, last)
        sizes = [os.path.getsize(path) / 2 ** 20 for path in (best, last)]
    return {"variant": cfg["variant"], "device": device, "dtype": run["dtype"],
            "threads": torch.get_num_threads(),
            "batch_size": p["batch_size"], "block_size": p["block_size"], "steps": p["steps"],
            "total_params": sum(t.numel() for t in model.parameters()),
            "trainable_params": sum(t.numel() for t in model.parameters() if t.requires_grad),
            "ms_per_iter": round(statistics.median(times) * 1000, 1),
            "tokens_per_s": round(p["batch_size"] * p["block_size"] / statistics.median(times), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "best_ckpt_mb": round(sizes[0], 2),
            "last_ckpt_mb": round(sizes[1], 2),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
