"""--mode=preference: one DPO step vs one SFT step on random preference pairs at GPT-2 124M and
medium shapes, each variant in a fresh process: ms/step, pairs/s, pair tokens/s, peak memory.

    python bench.py --mode=preference                          # GPT-2 124M shape
    python bench.py --mode=preference --pref_shapes=124m,medium # and GPT-2 medium shape

Variants: sft (prompt + chosen, one sequence per pair), dpo (the policy's forward and backward over
chosen and rejected, plus a frozen copy's forward), dpo_precomputed (--precompute_ref: the
reference's log-probabilities computed once before training, the copy dropped), dpo_lora (LoRA
rank 8; the reference is the same model with its adapters off).
"""
import copy
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import torch

from benchmarks.finetune_cost import FINETUNE
from benchmarks.train_speed import PRESET_OVERRIDES, TRAIN_PRESETS, peak_rss_mb, time_steps
from chat_gpt2.device import resolve_device, resolve_dtype, tune_cpu_allocator
from chat_gpt2.lora import TARGETS, apply_lora
from chat_gpt2.objectives import Preference
from chat_gpt2.preference import PreferenceData, pair_batch
from chat_gpt2.training import DEFAULT_GRAD_CLIP, clip_and_step, forward_backward
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python bench.py --help` prints these comments (--batch_size, --steps, --warmup: as --mode=train's)
DEFAULTS = dict(
    pref_shapes="124m",  # --mode=preference: model shapes, some of tiny,124m,medium
    # --mode=preference: the variants to compare, each in its own process
    pref_variants="sft,dpo,dpo_precomputed,dpo_lora",
    pref_variant="",  # --mode=preference: run just this variant (at the first shape), in this process
    # --mode=preference: the tokens of a random pair's prompt, chosen and rejected replies
    pref_lengths="64,96,96",
)

# batch: pairs per step; block 256 holds prompt + one reply
SHAPES = {"tiny": {k: TRAIN_PRESETS["tiny"][k] for k in ("n_layer", "n_head", "n_embd")},
          "124m": {k: TRAIN_PRESETS["124m"][k] for k in ("n_layer", "n_head", "n_embd")},
          "medium": {k: FINETUNE[k] for k in ("n_layer", "n_head", "n_embd")}}
STEP = dict(batch_size=4, block_size=256, steps=3, warmup=1)
VARIANTS = {"sft": {}, "dpo": {"reference": "copy"},
            "dpo_precomputed": {"reference": "copy", "precompute_ref": True},
            "dpo_lora": {"reference": "adapters off", "lora_rank": 8}}
PAIRS = 64  # random pairs held (train and val: what --precompute_ref goes through)


class RandomPairs(PreferenceData):
    """Stands in for a preference dataset split: fixed-length pairs of uniform random tokens."""

    def __init__(self, n_pairs, lengths, vocab_size, generator, first=0):
        self.first = first
        self.pairs = [tuple(torch.randint(vocab_size, (n,), generator=generator).numpy()
                            .astype(np.int64) for n in lengths) for _ in range(n_pairs)]

    def __len__(self):
        return len(self.pairs)

    def pair(self, i):
        return self.pairs[i]


def bench(cfg):
    """Each shape and variant in a fresh process (so its peak RSS is its own); a table of them."""
    if cfg["pref_variant"]:
        return _preference_variant(cfg)
    rows = []
    for shape in cfg["pref_shapes"].split(","):
        for name in cfg["pref_variants"].split(","):
            if shape not in SHAPES or name not in VARIANTS:
                raise SystemExit(f"error: unknown shape {shape!r} or variant {name!r}: use some of "
                                 f"{','.join(SHAPES)} and {','.join(VARIANTS)}")
            flags = [f"--{k}={cfg[k]}" for k in ("device", "dtype", "seed", "pref_lengths",
                                                  *PRESET_OVERRIDES)]
            p = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--mode=preference",
                                f"--pref_shapes={shape}", f"--pref_variant={name}", *flags],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"error: {shape} {name} failed:\n{p.stderr}")
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    r = rows[0]
    print(f"preference: batch {r['batch_size']} pairs, prompt/chosen/rejected {r['lengths']} tokens, "
          f"device {r['device']}, dtype {r['dtype']}, {r['threads']} threads, load avg "
          f"{r['load_avg_1min']}")
    print(f"  {'shape':<8}{'variant':<17}{'trainable':>13}{'ms/step':>10}{'pairs/s':>9}"
          f"{'pair tok/s':>12}{'peak RSS':>11}")
    for r in rows:
        print(f"  {r['shape']:<8}{r['variant']:<17}{r['trainable_params']:>13,}"
              f"{r['ms_per_step']:>10,.0f}{r['pairs_per_s']:>9,.2f}{r['pair_tokens_per_s']:>12,.0f}"
              f"{r['peak_rss_mb']:>8,.0f} MB")
    return {"mode": "preference", "variants": rows}


def _objective(model, data, settings, p, run):
    """train.py's Preference objective over data, its reference as the variant says."""
    cfg = {"preference_loss": "dpo", "precompute_ref": settings.get("precompute_ref", False),
           "beta": 0.1, "simpo_gamma": 0.0, "batch_size": p["batch_size"],
           "block_size": p["block_size"]}
    objective = Preference(data, {}, cfg, run)
    objective.policy = model
    if settings["reference"] == "copy":  # what prepare() builds from init_from, here a copy
        objective.reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg["precompute_ref"]:
        objective.ref_logps = objective.precompute()
        objective.reference = None
    return objective


def _step(model, optimizer, scaler, data, settings, p, run):
    """One training step of the variant, as a function for time_steps."""
    objective = _objective(model, data, settings, p, run) if settings.get("reference") else None

    def step(data, gen):
        batch = data["train"].get_batch(p["batch_size"], p["block_size"], gen)
        if objective is None:  # SFT: prompt + chosen, the chosen reply learned
            pairs = [data["train"].pair(i)[:2] for i in batch[3].tolist()]
            loss = forward_backward(model, scaler, [pair_batch(pairs, p["block_size"])], run)
        else:
            loss = forward_backward(model, scaler, [batch], run, objective.loss, objective.weight)
        clip_and_step(model, optimizer, scaler, DEFAULT_GRAD_CLIP)
        return loss
    return step


def _preference_variant(cfg):
    shape = cfg["pref_shapes"].split(",")[0]
    p = {**STEP, **{k: cfg[k] for k in PRESET_OVERRIDES if cfg[k]}}
    lengths = [int(n) for n in cfg["pref_lengths"].split(",")]
    device = resolve_device(cfg["device"])
    run = {"device": device, "dtype": resolve_dtype(cfg["dtype"], device), "ddp": False}
    settings = VARIANTS[cfg["pref_variant"]]
    tune_cpu_allocator(device)
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**SHAPES[shape], block_size=p["block_size"], vocab_size=50304,
                          dropout=0.0))
    if settings.get("lora_rank"):
        rank = settings["lora_rank"]
        apply_lora(model, {"rank": rank, "alpha": float(rank), "dropout": 0.0,
                           "targets": list(TARGETS)})
    model.to(device)
    gen = torch.Generator().manual_seed(cfg["seed"])
    data = {"train": RandomPairs(PAIRS, lengths, model.config.vocab_size, gen),
            "val": RandomPairs(PAIRS // 4, lengths, model.config.vocab_size, gen, first=PAIRS)}
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.split(":")[0])
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=run["dtype"] == "float16")
    step = _step(model, optimizer, scaler, data, settings, p, run)
    time_steps(step, data, gen, p["warmup"], device)
    times, _, _ = time_steps(step, data, gen, p["steps"], device)
    step_s = statistics.median(times)
    return {"variant": cfg["pref_variant"], "shape": shape, "device": device, "dtype": run["dtype"],
            "threads": torch.get_num_threads(), "batch_size": p["batch_size"],
            "block_size": p["block_size"], "lengths": cfg["pref_lengths"], "steps": p["steps"],
            "trainable_params": sum(t.numel() for t in model.parameters() if t.requires_grad),
            "ms_per_step": round(step_s * 1000, 1),
            "pairs_per_s": round(p["batch_size"] / step_s, 3),
            "pair_tokens_per_s": round(p["batch_size"] * sum(lengths) / step_s, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
