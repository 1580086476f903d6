"""Benchmarks that print numbers (speed and memory targets live here, not in timed unit tests).

    python bench.py --mode=train --preset=tiny       # training throughput, MFU against the measured peak
    python bench.py --mode=train --preset=124m       # GPT-2 124M shape, batch 4 (also: 6x384, batch 8)
    python bench.py --mode=train --preset=124m --baseline  # nanoGPT's CPU recipe on the same machine, to compare
    python bench.py --mode=train --preset=124m --profile   # + where the step's time goes, the matmul-only ceiling
    python bench.py --mode=generate                  # generation tokens/s, KV cache on/off, vs transformers (quick)
    python bench.py --mode=generate --gen_preset=full  # the same at GPT-2 124M shape: 32 + 256 tokens, batch 1 and 8
    python bench.py --mode=half --ckpt=out/finetuned_X.pt --dataset=data/chat   # bf16 vs fp32: same tokens? perplexity?
    python bench.py --mode=sample --gen_preset=full  # sample.py end to end, fp32 and bf16, vs transformers (124M)
    python bench.py --mode=finetune                  # GPT-2 medium shape: full vs trainable_layers=1 vs LoRA rank 8
    python bench.py --mode=prepare                   # prepare.py end to end vs a bare tokenise-and-write loop (~25 MB)

Every run ends with one machine-readable JSON line.
"""
import copy
import dataclasses
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch
import torch.nn.functional as F

import configurator
from chat_gpt2 import chat
from chat_gpt2.checkpoint import load_model, save_checkpoint
from chat_gpt2.dataset import load_dataset
from chat_gpt2.device import (autocast, known_peak_flops, measure_matmul_peak, resolve_compile, resolve_device,
                              resolve_dtype, sync, tune_cpu_allocator)
from chat_gpt2.engine import Engine, Request
from chat_gpt2.inference import to_half
from chat_gpt2.sampling import SamplingParams
from chat_gpt2.errors import ConfigError
from chat_gpt2.evaluation import val_loss
from chat_gpt2.hf_gpt2 import hf_config, hf_state_dict
from chat_gpt2.lora import TARGETS, adapter_state, apply_lora, freeze_layers
from model import GPT, GPTConfig
from chat_gpt2.training import DEFAULT_GRAD_CLIP, to_device, train_step

DEFAULTS = dict(  # `python bench.py --help` prints these comments
    mode="train",  # train | generate | half | sample | finetune | prepare
    preset="tiny",  # --mode=train: tiny (seconds) | 6x384 (batch 8) | 124m (GPT-2 124M shape, batch 4)
    device="auto",  # auto, cpu, cuda, cuda:N or mps
    dtype="auto",  # auto (bf16 where the device has it), float32, bfloat16 or float16
    seed=1337,  # seed of the random weights and tokens
    batch_size=0,  # --mode=train/finetune: override the preset's batch size (0 = the preset's)
    block_size=0,  # override the preset's block size (0 = the preset's)
    steps=0,  # override the preset's timed steps (0 = the preset's)
    warmup=0,  # override the preset's untimed warm-up steps (0 = the preset's)
    compile=None,  # torch.compile as train.py's --compile
    baseline=False,  # --mode=train: nanoGPT's CPU recipe instead of ours (fp32, unfused AdamW, full-logits loss)
    profile=False,  # --mode=train: also where a step's time goes (phases; matmuls, attention alone; MFU ceilings)
    gen_preset="quick",  # --mode=generate: quick (a tiny model, seconds) | full (GPT-2 124M shape, random weights)
    gen_prompt_tokens=0,  # override the preset's prompt length (0 = the preset's)
    gen_new_tokens=0,  # override the preset's new tokens (0 = the preset's)
    gen_batch_sizes=None,  # override the preset's batch sizes, e.g. [1]
    gen_hf=True,  # also time transformers' GPT2LMHeadModel.generate(use_cache=True) on the same weights
    gen_half="bfloat16",  # also time our decoding with the weights in this dtype ("" = no)
    gen_prefill_tokens=256,  # also time one forward pass over a prompt this long (capped at block_size; 0 = no)
    ckpt="",  # --mode=half: a trained checkpoint
    dataset="",  # --mode=half: its prepared dataset (prompts and val perplexity)
    half_prompts=20,  # --mode=half: prompts, taken evenly over the val split
    half_new_tokens=64,  # --mode=half: greedy tokens per prompt
    sample_short=16,  # --mode=sample: the short run's new tokens (the long run's: the --gen_preset's new_tokens)
    sample_runs=2,  # --mode=sample: runs of each sample.py process, alternately; the fastest counts
    variants="full,layers1,lora8,lora8ckpt",  # --mode=finetune: the variants to compare, each in its own process
    variant="",  # --mode=finetune: run just this one, in this process
    prepare_chat="../shared/data/prompt-completion-mlx-wwdc25/train.jsonl",  # --mode=prepare: prompt/completion .jsonl
    prepare_text="../shared/data/tinyshakespeare-text/input.txt",  # --mode=prepare: a .txt (paths from the repo root)
    prepare_mb=25.0,  # --mode=prepare: each file is repeated to about this many MB ("" skips it: --prepare_text=)
    prepare_runs=2,  # --mode=prepare: runs of each (bare loop, prepare.py), alternately; the faster one counts
)


# ----------------------------------------------------------------------------------------------------------------
# Training: train.py's own train_step on random tokens, against the measured peak

# Shapes of the reference figures in docs/performance.md: vocab 50304, no bias, no dropout, one micro-step, block 256.
TRAIN_PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=128, batch_size=4, block_size=64, steps=5, warmup=2,
                 peak_sizes=(512, 1024), peak_repeats=2),
    "6x384": dict(n_layer=6, n_head=6, n_embd=384, batch_size=8, block_size=256, steps=10, warmup=2,
                  peak_sizes=(1024, 2048, 4096), peak_repeats=5),
    "124m": dict(n_layer=12, n_head=12, n_embd=768, batch_size=4, block_size=256, steps=6, warmup=2,
                 peak_sizes=(1024, 2048, 4096), peak_repeats=5),
}


class RandomTokens:
    """Stands in for dataset.ChatData: uniform random tokens, every position learned (mask 1), so the LM head runs
    on every position as in nanoGPT and the FLOP count 6N + 12LHQT is the work actually done."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def get_batch(self, batch_size, block_size, generator):
        seq = torch.randint(self.vocab_size, (batch_size, block_size + 1), generator=generator)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), torch.ones(batch_size, block_size)


def _train_setup(cfg):
    """The preset with cfg's overrides; the model, the module that runs (compiled or the model), the optimizer, and
    one train.py step as a function."""
    if cfg["preset"] not in TRAIN_PRESETS:
        raise SystemExit(f"error: unknown --preset={cfg['preset']!r}: use one of {sorted(TRAIN_PRESETS)}")
    p = dict(TRAIN_PRESETS[cfg["preset"]])
    p.update({k: cfg[k] for k in ("batch_size", "block_size", "steps", "warmup") if cfg[k]})
    p["grad_clip"] = DEFAULT_GRAD_CLIP
    device = resolve_device(cfg["device"])
    dtype = "float32" if cfg["baseline"] else resolve_dtype(cfg["dtype"], device)
    run = {"device": device, "dtype": dtype, "ddp": False, "compile": resolve_compile(cfg["compile"], device)}
    if not cfg["baseline"]:
        tune_cpu_allocator(device)
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], block_size=p["block_size"],
                          vocab_size=50304, bias=False, dropout=0.0)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.split(":")[0])
    if cfg["baseline"]:
        optimizer = _baseline(model, optimizer)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=run["dtype"] == "float16")
    step_cfg = {"gradient_accumulation_steps": 1, "batch_size": p["batch_size"], "block_size": p["block_size"],
                "grad_clip": p["grad_clip"]}
    compiled = torch.compile(model) if run["compile"] else model

    def step(data, gen):
        return train_step(compiled, optimizer, scaler, data, gen, step_cfg, run)
    return p, run, model, compiled, optimizer, step


def _baseline(model, optimizer):
    """nanoGPT's CPU recipe, to compare against on the same machine: PyTorch's default (unfused, for-loop on CPU)
    AdamW, and F.cross_entropy over the full fp32 logits instead of model.head_loss (fp32 and glibc's default
    allocator are set by the caller)."""

    def plain_loss(self, x, targets, loss_mask):  # every position is learned here (RandomTokens)
        return F.cross_entropy(self.lm_head(x).float(), targets, ignore_index=-1)

    model._masked_loss = types.MethodType(plain_loss, model)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=optimizer.defaults["lr"], betas=optimizer.defaults["betas"])


def _peak_rss_mb():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def _time_steps(step, data, gen, n, device):
    """Run n steps, syncing once per step. Returns (wall seconds per step, process CPU seconds per step, the loss
    of each step). CPU time is what a step costs whatever else the machine runs; wall time well above CPU time /
    threads means other processes took the cores."""
    times, cpu, losses = [], [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(data, gen)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(loss)
    return times, cpu, [float(x) for x in losses]  # .item() after the clock: no host sync inside the timed steps


def _measure_peaks(device, dtype, p, peaks=None):
    """{dtype: FLOP/s} for fp32 and the training dtype, the best of this and any earlier measurement (bench_train
    measures before and after training: a second chance for a moment when other processes leave the cores)."""
    peaks = dict(peaks or {})
    for d in {"float32", dtype}:
        peaks[d] = max(peaks.get(d, 0.0), measure_matmul_peak(device, d, p["peak_sizes"], p["peak_repeats"]))
    return peaks


def _median_ms(fn, device, repeats=5):
    """Median wall milliseconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def kernel_ms(model, batch_size, block_size, dtype, device):
    """The step's matmul-bound work timed alone at the model's shapes in dtype, in ms: the linear layers' matmuls
    (every Linear and the tied LM head on all tokens; forward x @ W.T, backward g @ W and g.T @ x: the 6N of the
    FLOP count) and attention (SDPA, causal) forward and forward + backward, times n_layer."""
    dt, tokens, cfg = getattr(torch, dtype), batch_size * block_size, model.config
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    out = {"matmul_fwd": 0.0, "matmul_bwd": 0.0}
    for k, n in sorted(set(shapes)):
        x, w, g = (torch.randn(*s, device=device).to(dt) for s in ((tokens, k), (n, k), (tokens, n)))
        count = shapes.count((k, n))
        out["matmul_fwd"] += count * _median_ms(lambda: x @ w.t(), device)
        out["matmul_bwd"] += count * (_median_ms(lambda: g @ w, device) + _median_ms(lambda: g.t() @ x, device))
    q, k, v = (torch.randn(batch_size, cfg.n_head, block_size, cfg.n_embd // cfg.n_head, device=device)
               .to(dt).requires_grad_() for _ in range(3))
    grad = torch.randn_like(q)

    def attend():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.no_grad():
        out["attention_fwd"] = cfg.n_layer * _median_ms(attend, device)
    both = _median_ms(lambda: attend().backward(grad), device)
    out["attention_bwd"] = cfg.n_layer * both - out["attention_fwd"]
    return {key: round(ms, 1) for key, ms in out.items()}


def phase_ms(model, optimizer, data, gen, p, run, steps=3):
    """Median wall ms of each phase of a training step (forward with the loss, backward, grad-norm clipping, AdamW
    step and zero_grad), with a device sync between phases. Not torch.profiler: on CPU its bookkeeping fragments
    the heap, so the large-tensor ops page-fault and show up many times slower than they run. Timing only: a
    float16 run's GradScaler is left out here (no accumulation or DDP either, as in the bench's own steps)."""
    names = ("forward", "backward", "clip", "optimizer")
    times = {name: [] for name in names}
    for _ in range(steps):
        x, y, m = to_device(data.get_batch(p["batch_size"], p["block_size"], gen), run["device"])
        marks = [time.perf_counter()]
        with autocast(run["device"], run["dtype"]):
            _, loss = model(x, y, m)
        marks.append(_synced_clock(run["device"]))
        loss.backward()
        marks.append(_synced_clock(run["device"]))
        torch.nn.utils.clip_grad_norm_(model.parameters(), p["grad_clip"])
        marks.append(_synced_clock(run["device"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(_synced_clock(run["device"]))
        for name, t0, t1 in zip(names, marks, marks[1:]):
            times[name].append((t1 - t0) * 1000)
    return {name: round(statistics.median(t), 1) for name, t in times.items()}


def _synced_clock(device):
    sync(device)
    return time.perf_counter()


def breakdown(model, compiled, optimizer, data, gen, p, run, flops_per_step, peak):
    """Where a step's time goes (phase_ms), how much of it the matmul-bound work takes when timed alone
    (kernel_ms), and the MFU ceilings that follow: if everything but the matmuls were free; if everything but the
    matmuls and attention were; and if only the elementwise ops (casts, GELU, LayerNorm, adds, embedding, the loss's
    softmax) were free, with clipping and AdamW as measured. compiled: the module the step runs (model or its
    torch.compile wrapper)."""
    phases = phase_ms(compiled, optimizer, data, gen, p, run)
    kernels = kernel_ms(model, p["batch_size"], p["block_size"], run["dtype"], run["device"])
    matmuls = kernels["matmul_fwd"] + kernels["matmul_bwd"]
    attention = kernels["attention_fwd"] + kernels["attention_bwd"]
    floors = {"matmuls": matmuls, "matmuls_attention": matmuls + attention,
              "matmuls_attention_clip_adamw": matmuls + attention + phases["clip"] + phases["optimizer"]}
    rest = {phase: round(phases[phase] - kernels[f"matmul_{short}"] - kernels[f"attention_{short}"], 1)
            for phase, short in (("forward", "fwd"), ("backward", "bwd"))}
    return {"phase_ms": phases, "kernel_ms": kernels, "elementwise_ms": rest,
            "mfu_ceiling": {k: round(flops_per_step / (ms / 1000) / peak, 4) for k, ms in floors.items()}}


def bench_train(cfg):
    """Train steps/s, tokens/s, achieved FLOP/s and MFU against the peaks measured in the same run, peak memory."""
    p, run, model, compiled, optimizer, step = _train_setup(cfg)
    device, dtype = run["device"], run["dtype"]
    peaks = _measure_peaks(device, dtype, p)
    known = known_peak_flops(device, dtype)
    data = RandomTokens(model.config.vocab_size)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    print(f"train: preset {cfg['preset']}, {model.get_num_params() / 1e6:.1f}M parameters, device {device}, dtype "
          f"{dtype}, compile {run['compile']}, {'BASELINE (nanoGPT recipe), ' if cfg['baseline'] else ''}"
          f"{torch.get_num_threads()} threads, batch {p['batch_size']} x block "
          f"{p['block_size']}; matmul peak " + ", ".join(f"{d} {v / 1e9:,.0f} GFLOP/s" for d, v in peaks.items()))
    gen = torch.Generator().manual_seed(cfg["seed"])
    warm_times, _, _ = _time_steps(step, data, gen, p["warmup"], device)  # compile, allocations, kernel choice
    times, cpu, losses = _time_steps(step, data, gen, p["steps"], device)
    peaks = _measure_peaks(device, dtype, p, peaks)
    tokens = p["batch_size"] * p["block_size"]
    flops_per_token = model.flops_per_token(p["block_size"])
    median, best = statistics.median(times), min(times)
    achieved = flops_per_token * tokens / median
    result = {
        "mode": "train", "preset": cfg["preset"], "device": device, "dtype": dtype, "compile": run["compile"],
        "baseline": cfg["baseline"],
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "n_layer": p["n_layer"], "n_head": p["n_head"], "n_embd": p["n_embd"], "batch_size": p["batch_size"],
        "block_size": p["block_size"], "n_params": model.get_num_params(), "flops_per_token": flops_per_token,
        "steps": p["steps"], "warmup_steps": p["warmup"], "warmup_s": round(sum(warm_times), 2),
        "ms_per_iter": round(median * 1000, 1), "ms_per_iter_best": round(best * 1000, 1),
        "cpu_ms_per_iter": round(statistics.median(cpu) * 1000, 1),
        "tokens_per_s": round(tokens / median, 1), "tokens_per_s_best": round(tokens / best, 1),
        "achieved_gflops": round(achieved / 1e9, 1),
        "peak_gflops_fp32": round(peaks["float32"] / 1e9, 1), "peak_gflops_dtype": round(peaks[dtype] / 1e9, 1),
        "mfu": round(achieved / peaks[dtype], 4), "mfu_vs_fp32_peak": round(achieved / peaks["float32"], 4),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None,
        "known_peak_gflops": round(known / 1e9, 1) if known else None,
        "mfu_vs_known_peak": round(achieved / known, 4) if known else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "max_memory_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
        if device.startswith("cuda") else None,
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # others' work
    }
    if cfg["profile"]:
        result["breakdown"] = breakdown(model, compiled, optimizer, data, gen, p, run, flops_per_token * tokens,
                                        peaks[dtype])
    _print_train(result)
    return result


def _print_train(r):
    print(f"{r['ms_per_iter']:.1f} ms/iter (best {r['ms_per_iter_best']:.1f}; process CPU time "
          f"{r['cpu_ms_per_iter']:.1f} ms), {r['tokens_per_s']:,.1f} tokens/s (best {r['tokens_per_s_best']:,.1f}), "
          f"{r['achieved_gflops']:,.1f} GFLOP/s achieved")
    print(f"MFU {r['mfu']:.1%} of the measured {r['dtype']} peak ({r['peak_gflops_dtype']:,.0f} GFLOP/s), "
          f"{r['mfu_vs_fp32_peak']:.1%} of the fp32 peak ({r['peak_gflops_fp32']:,.0f} GFLOP/s)"
          + (f", {r['mfu_vs_known_peak']:.1%} of the {r['gpu']} data sheet" if r["mfu_vs_known_peak"] else ""))
    memory = (f"max_memory_allocated {r['max_memory_allocated_mb']:,.0f} MB, "
              if r["max_memory_allocated_mb"] is not None else "")
    print(f"peak memory: {memory}RSS {r['peak_rss_mb']:,.0f} MB; loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}"
          f"; warm-up {r['warmup_s']:.1f} s for {r['warmup_steps']} steps; load average {r['load_avg_1min']}")
    if "breakdown" in r:
        b, ph, k = r["breakdown"], r["breakdown"]["phase_ms"], r["breakdown"]["kernel_ms"]
        print(f"step phases (ms): forward {ph['forward']:,.1f}, backward {ph['backward']:,.1f}, grad clipping "
              f"{ph['clip']:,.1f}, AdamW + zero_grad {ph['optimizer']:,.1f}")
        print(f"timed alone at the model's shapes (ms): linear matmuls forward {k['matmul_fwd']:,.1f} / backward "
              f"{k['matmul_bwd']:,.1f}; attention forward {k['attention_fwd']:,.1f} / backward "
              f"{k['attention_bwd']:,.1f}; the rest (casts, GELU, LayerNorm, adds, embedding, loss softmax) forward "
              f"{b['elementwise_ms']['forward']:,.1f} / backward {b['elementwise_ms']['backward']:,.1f}")
        c = b["mfu_ceiling"]
        print(f"MFU ceiling if only the matmuls took time: {c['matmuls']:.1%}; matmuls + attention: "
              f"{c['matmuls_attention']:.1%}; + grad clipping and AdamW: {c['matmuls_attention_clip_adamw']:.1%}")


# ----------------------------------------------------------------------------------------------------------------
# Generation: new tokens/s with and without the KV cache, and transformers' cached generate

GEN_PRESETS = {
    "quick": dict(model=dict(n_layer=2, n_head=2, n_embd=64, vocab_size=50257, block_size=128),
                  prompt_tokens=16, new_tokens=32, batch_sizes=[1, 4]),
    "full": dict(model=dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
                 prompt_tokens=32, new_tokens=256, batch_sizes=[1, 8]),
}


def _gen_setup(cfg):
    """The preset with cfg's overrides applied, and a random-weight model of its shape (seeded)."""
    if cfg["gen_preset"] not in GEN_PRESETS:
        raise SystemExit(f"error: unknown --gen_preset={cfg['gen_preset']!r}: use one of {sorted(GEN_PRESETS)}")
    preset = dict(GEN_PRESETS[cfg["gen_preset"]])
    for key in ("prompt_tokens", "new_tokens", "batch_sizes"):
        preset[key] = cfg[f"gen_{key}"] or preset[key]
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**preset["model"], dropout=0.0)).eval()
    return preset, model


def _time_ours(model, prompt, new_tokens, use_cache, device, dtype):
    """Greedy generation of exactly new_tokens tokens; returns (seconds, the tokens (B, new_tokens)).
    With the KV cache: the Engine; without: _uncached."""
    sync(device)
    t0 = time.perf_counter()
    if use_cache:
        tokens = greedy_tokens(model, prompt, new_tokens, device, dtype)
    else:
        with autocast(device, dtype):
            tokens = _uncached(model, prompt, new_tokens)
    sync(device)
    return time.perf_counter() - t0, tokens


def greedy_tokens(model, prompt, new_tokens, device="cpu", dtype="float32"):
    """Exactly new_tokens greedy tokens after each row of prompt (B, T), decoded together by the
    Engine (where <|endoftext|> counts as any token): (B, new_tokens)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    requests = [Request(row, params, ignore_eot=True) for row in prompt.tolist()]
    Engine(model, device=device, dtype=dtype).complete(requests)
    return torch.tensor([request.replies[0].tokens for request in requests], device=prompt.device)


@torch.inference_mode()
def _uncached(model, prompt, new_tokens):
    """The baseline the KV cache saves: every step runs the whole sequence again (in block_size)."""
    seq = prompt
    for _ in range(new_tokens):
        logits, _ = model(seq[:, -model.config.block_size:])
        seq = torch.cat([seq, logits[:, -1, :chat.VOCAB_SIZE].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.size(1):]


def _hf_model(model):
    """transformers' GPT2LMHeadModel holding our weights, converted as an export converts them."""
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config.from_dict(hf_config(model.config)))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith(".attn.bias") for k in missing), missing
    return hf.to(next(model.parameters()).device).eval()


def _time_hf(hf, prompt, new_tokens, device):
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    sync(device)
    return time.perf_counter() - t0, out[:, prompt.size(1):]


def bench_generate(cfg):
    """Table of new tokens/s per (implementation, batch size); returns the rows for the JSON line. The model runs in
    --dtype (default fp32 here: the reference), and again with its weights converted to --gen_half."""
    device = resolve_device(cfg["device"])
    dtype = "float32" if cfg["dtype"] == "auto" else resolve_dtype(cfg["dtype"], device)
    preset, model = _gen_setup(cfg)
    model.to(device)
    half = to_half(copy.deepcopy(model), cfg["gen_half"], device) if cfg["gen_half"] else None
    hf = _hf_model(model) if cfg["gen_hf"] and _has_transformers() and dtype == "float32" else None
    n_new, rows = preset["new_tokens"], []
    print(f"generate: preset {cfg['gen_preset']}, {model.get_num_params() / 1e6:.1f}M parameters, device {device}, "
          f"dtype {dtype}, {torch.get_num_threads()} threads, prompt {preset['prompt_tokens']} + {n_new} new tokens")
    print(f"{'implementation':<34}{'batch':>6}{'seconds':>10}{'tokens/s':>11}{'same tokens':>13}")
    for batch in preset["batch_sizes"]:
        prompt = torch.randint(0, model.config.vocab_size, (batch, preset["prompt_tokens"]),
                               generator=torch.Generator().manual_seed(cfg["seed"])).to(device)
        _time_ours(model, prompt, 2, True, device, dtype)  # warm-up: first-call allocations and kernel choice
        reference = None
        runs = [("ours, KV cache", lambda: _time_ours(model, prompt, n_new, True, device, dtype)),
                ("ours, no cache", lambda: _time_ours(model, prompt, n_new, False, device, dtype))]
        if half is not None:
            _time_ours(half, prompt, 2, True, device, "float32")
            runs.append((f"ours, KV cache, {cfg['gen_half']}",
                         lambda: _time_ours(half, prompt, n_new, True, device, "float32")))
        if hf is not None:
            _time_hf(hf, prompt, 2, device)
            runs.append(("transformers, use_cache", lambda: _time_hf(hf, prompt, n_new, device)))
        for name, run in runs:
            seconds, tokens = run()
            reference = tokens if reference is None else reference
            same = (tokens.cpu() == reference.cpu()).float().mean().item()  # greedy fp32 paths: all the same
            rows.append({"impl": name, "batch": batch, "seconds": round(seconds, 3),
                         "tokens_per_s": round(batch * n_new / seconds, 2), "same_tokens": same == 1.0,
                         "same_token_share": round(same, 4)})
            print(f"{name:<34}{batch:>6}{seconds:>10.2f}{batch * n_new / seconds:>11.1f}{same:>13.1%}", flush=True)
    prefill = _time_prefill(model, half, cfg, device, dtype)
    return {"mode": "generate", "preset": cfg["gen_preset"], "device": device, "dtype": dtype,
            "prompt_tokens": preset["prompt_tokens"], "new_tokens": n_new, "rows": rows,
            "speedups": _speedups(rows), "prefill": prefill}


@torch.no_grad()
def _time_prefill(model, half, cfg, device, dtype):
    """Prompt tokens/s of one forward pass over a gen_prefill_tokens prompt (batch 1; the best of 2, after a
    warm-up), ours in dtype and with the weights in gen_half: the compute-bound side of generation."""
    n = min(cfg["gen_prefill_tokens"], model.config.block_size)
    if n <= 0:
        return {}
    prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(cfg["seed"]))
    speeds = {}
    for name, m, run_dtype in ((dtype, model, dtype), (f"{cfg['gen_half']} weights", half, "float32")):
        if m is None:
            continue
        seconds = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            with autocast(device, run_dtype):
                m(prompt.to(device))
            sync(device)
            seconds.append(time.perf_counter() - t0)
        speeds[name] = round(n / min(seconds[1:]), 1)
    print(f"prompt of {n} tokens (prefill), tokens/s: " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items()))
    return {"tokens": n, "tokens_per_s": speeds}


def _speedups(rows):
    """Per batch size: the KV cache's speed-up over no cache, and over transformers' cached generate."""
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        speed = {r["impl"]: r["tokens_per_s"] for r in rows if r["batch"] == batch}
        cached = speed["ours, KV cache"]
        out[str(batch)] = {"cache_vs_no_cache": round(cached / speed["ours, no cache"], 2)}
        for name, value in speed.items():
            if name == "transformers, use_cache":
                out[str(batch)]["cache_vs_transformers"] = round(cached / value, 2)
            elif name.startswith("ours, KV cache, "):
                out[str(batch)]["half_vs_fp32"] = round(value / cached, 2)
                if "transformers, use_cache" in speed:
                    out[str(batch)]["half_vs_transformers"] = round(value / speed["transformers, use_cache"], 2)
    return out


def bench_half(cfg):
    """A trained model in fp32 and with its weights in gen_half (GPT.to_half): the share of greedy tokens that agree
    (prompts of 32 tokens taken evenly over the val split, half_new_tokens each; a row that flips once then
    continues from a different text, so also the step of each row's first difference, and the share of steps
    where both pick the same token after fp32's own tokens), and the val loss / perplexity of each."""
    if not cfg["ckpt"] or not cfg["dataset"]:
        raise ConfigError("--mode=half needs --ckpt=PATH (a trained checkpoint) and --dataset=DIR (its data)")
    device = resolve_device(cfg["device"])
    model, _ = load_model(ckpt=cfg["ckpt"], device=device)
    half = to_half(copy.deepcopy(model), cfg["gen_half"], device)
    val = load_dataset(cfg["dataset"])[0]["val"]
    starts = torch.linspace(0, max(0, len(val.ids) - 33), cfg["half_prompts"]).long().tolist()
    prompts = torch.stack([torch.from_numpy(val.ids[s:s + 32].astype("int64")) for s in starts]).to(device)
    tokens = [greedy_tokens(m, prompts, cfg["half_new_tokens"], device) for m in (model, half)]
    agree = (tokens[0] == tokens[1]).float().mean().item()
    differ = tokens[0] != tokens[1]
    first = [int(row.nonzero()[0]) if row.any() else None for row in differ]
    forced = _same_next_tokens(model, half, torch.cat([prompts, tokens[0]], dim=1), prompts.size(1))
    losses = [val_loss(m, cfg["dataset"], 16, device, dtype)[0]  # as eval.py --dtype runs them
              for m, dtype in ((model, "float32"), (half, cfg["gen_half"]))]
    ppl = [math.exp(loss) for loss in losses]
    result = {"mode": "half", "ckpt": cfg["ckpt"], "half": cfg["gen_half"], "prompts": len(starts),
              "new_tokens": cfg["half_new_tokens"], "same_token_share": round(agree, 4),
              "first_difference": first, "same_next_token_share": round(forced, 4),
              "val_loss_fp32": round(losses[0], 5), "val_loss_half": round(losses[1], 5),
              "perplexity_fp32": round(ppl[0], 4), "perplexity_half": round(ppl[1], 4),
              "perplexity_change": round(ppl[1] / ppl[0] - 1, 5)}
    print(f"greedy tokens, {cfg['gen_half']} vs fp32: {agree:.1%} the same over {len(starts)} prompts x "
          f"{cfg['half_new_tokens']} tokens; val perplexity {ppl[0]:.4f} (fp32) vs {ppl[1]:.4f} "
          f"({result['perplexity_change']:+.3%})")
    print(f"  rows that differ: {sum(f is not None for f in first)} of {len(first)}, first at steps "
          f"{sorted(f for f in first if f is not None)}; the same next token after fp32's tokens: {forced:.2%}")
    return result


@torch.no_grad()
def _same_next_tokens(model, half, seq, prompt_len):
    """The share of steps after prompt_len at which both models' greedy next token is the same, given seq (each
    step sees at most the last block_size tokens)."""
    same = []
    for end in range(prompt_len, seq.size(1)):
        window = seq[:, max(0, end - model.config.block_size):end]
        picks = [m(window)[0][:, -1, :chat.VOCAB_SIZE].argmax(-1) for m in (model, half)]
        same.append(picks[0] == picks[1])
    return torch.stack(same).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# sample.py end to end, fp32 and half precision, against transformers

SAMPLE_PROMPT = ("The old lighthouse keeper climbed the winding stairs every evening at dusk, carrying a lantern, "
                 "a flask of tea and a notebook in which he wrote down the ships that passed the rocks below.")


def bench_sample(cfg):
    """sample.py as a user runs it (process start, imports, checkpoint load, prompt, decoding) on a random-weight
    model of the preset's shape, in fp32 and with --dtype=gen_half, batch 1, greedy. A token's time is (seconds
    for the preset's new_tokens - seconds for sample_short) / their difference: the start-up cancels out. Each
    process runs sample_runs times, alternately, the fastest counting. Against transformers' generate (fp32, in
    this process, after a warm-up) on the same weights."""
    device = resolve_device(cfg["device"])
    preset, model = _gen_setup(cfg)
    short, long = cfg["sample_short"], preset["new_tokens"]
    enc = chat.get_encoder()
    prompt = torch.tensor([enc.encode(SAMPLE_PROMPT)[:preset["prompt_tokens"]]])
    text = enc.decode(prompt[0].tolist())
    dtypes = ["float32"] + ([cfg["gen_half"]] if cfg["gen_half"] else [])
    _check_no_early_end(model, prompt, long, dtypes)
    print(f"sample: preset {cfg['gen_preset']}, {model.get_num_params() / 1e6:.1f}M parameters, device {device}, "
          f"{os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())} threads, prompt {prompt.size(1)} tokens, "
          f"{short} vs {long} new tokens, best of {cfg['sample_runs']}, load avg {os.getloadavg()[0]:.2f}")
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "random.pt")
        save_checkpoint(ckpt, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                               "template": chat.TEMPLATE, "tokenizer": chat.TOKENIZER, "default_stop": None,
                               "multiline_replies": False})
        for _ in range(cfg["sample_runs"]):
            for dtype in dtypes:
                for n in (short, long):
                    t = _time_sample(ckpt, text, n, dtype, device)
                    seconds[dtype, n] = min(seconds.get((dtype, n), t), t)
    rows = [{"impl": f"sample.py --dtype={dtype}", "seconds_short": round(seconds[dtype, short], 3),
             "seconds_long": round(seconds[dtype, long], 3),
             "tokens_per_s": round((long - short) / (seconds[dtype, long] - seconds[dtype, short]), 2)}
            for dtype in dtypes]
    if cfg["gen_hf"] and _has_transformers():
        hf = _hf_model(model.to(device))
        _time_hf(hf, prompt.to(device), 2, device)
        rows.append({"impl": "transformers generate, fp32, in process",
                     "tokens_per_s": round(long / _time_hf(hf, prompt.to(device), long, device)[0], 2)})
    return _sample_report(rows, cfg, short, long)


def _check_no_early_end(model, prompt, new_tokens, dtypes):
    """sample.py stops at <|endoftext|>: a random model's greedy text must not reach it, or a run would be short."""
    for dtype in dtypes:
        m = model if dtype == "float32" else to_half(copy.deepcopy(model), dtype, "cpu")
        if chat.EOT in greedy_tokens(m, prompt, new_tokens)[0].tolist():
            raise ConfigError(f"the random model's greedy text ends within {new_tokens} tokens in {dtype}: "
                              "try another --seed")


def _time_sample(ckpt, text, new_tokens, dtype, device):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.py"),
                    f"--ckpt={ckpt}", "--raw", f"--prompt={text}", "--temperature=0",
                    f"--max_new_tokens={new_tokens}", f"--dtype={dtype}", f"--device={device}"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _sample_report(rows, cfg, short, long):
    hf = next((r["tokens_per_s"] for r in rows if r["impl"].startswith("transformers")), None)
    print(f"{'implementation':<42}{'s, ' + str(short):>10}{'s, ' + str(long):>10}{'tokens/s':>10}"
          f"{'vs transformers':>17}")
    for r in rows:
        if hf:
            r["vs_transformers"] = round(r["tokens_per_s"] / hf, 2)
        timed = f"{r['seconds_short']:>10.2f}{r['seconds_long']:>10.2f}" if "seconds_long" in r else " " * 20
        ratio = f"{r['vs_transformers']:>16.2f}x" if hf else ""
        print(f"{r['impl']:<42}{timed}{r['tokens_per_s']:>10.1f}{ratio}")
    return {"mode": "sample", "preset": cfg["gen_preset"], "short": short, "long": long, "rows": rows,
            "load_avg_1min": round(os.getloadavg()[0], 2)}


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning: full vs the last block vs LoRA, at GPT-2 medium shape

FINETUNE = dict(n_layer=24, n_head=16, n_embd=1024, batch_size=4, block_size=256, steps=3, warmup=1)
VARIANTS = {"full": {}, "layers1": {"trainable_layers": 1}, "lora8": {"lora_rank": 8},
            "lora8ckpt": {"lora_rank": 8, "grad_checkpointing": True}, "fullckpt": {"grad_checkpointing": True}}


def bench_finetune(cfg):
    """Each variant in a fresh process (so its peak RSS is its own): tokens/s, peak memory, trainable parameters and
    the size of its best (weights) and _last (weights + AdamW state) checkpoints."""
    if cfg["variant"]:
        return _finetune_variant(cfg)
    rows = []
    for name in cfg["variants"].split(","):
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}: use some of {','.join(VARIANTS)}")
        flags = [f"--{k}={cfg[k]}" for k in ("device", "dtype", "batch_size", "block_size", "steps", "warmup")]
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--mode=finetune", f"--variant={name}",
                            *flags], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"error: variant {name} failed:\n{p.stderr}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"finetune: GPT-2 medium shape {FINETUNE['n_layer']}x{FINETUNE['n_head']}x{FINETUNE['n_embd']}, "
          f"batch {rows[0]['batch_size']} x block {rows[0]['block_size']}, device {rows[0]['device']}, dtype "
          f"{rows[0]['dtype']}, {rows[0]['threads']} threads, load avg {rows[0]['load_avg_1min']}")
    print(f"  {'variant':<9}{'trainable':>16}{'tokens/s':>10}{'peak RSS':>11}{'best ckpt':>12}{'_last ckpt':>12}")
    for r in rows:
        print(f"  {r['variant']:<9}{r['trainable_params']:>16,}{r['tokens_per_s']:>10,.0f}{r['peak_rss_mb']:>8,.0f} MB"
              f"{r['best_ckpt_mb']:>9,.1f} MB{r['last_ckpt_mb']:>9,.1f} MB")
    return {"mode": "finetune", "variants": rows}


def _finetune_variant(cfg):
    p = {**FINETUNE, **{k: cfg[k] for k in ("batch_size", "block_size", "steps", "warmup") if cfg[k]}}
    device = resolve_device(cfg["device"])
    run = {"device": device, "dtype": resolve_dtype(cfg["dtype"], device), "ddp": False}
    settings = VARIANTS[cfg["variant"]]
    tune_cpu_allocator(device, lean=settings.get("grad_checkpointing", False))  # as train.py does
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], block_size=p["block_size"],
                          vocab_size=50304, dropout=0.0))
    if settings.get("lora_rank"):
        apply_lora(model, {"rank": settings["lora_rank"], "alpha": float(settings["lora_rank"]), "dropout": 0.0,
                           "targets": list(TARGETS)})
    freeze_layers(model, settings.get("trainable_layers", -1))
    model.grad_checkpointing = settings.get("grad_checkpointing", False)
    model.to(device)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.split(":")[0])
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=run["dtype"] == "float16")
    step_cfg = {"gradient_accumulation_steps": 1, "batch_size": p["batch_size"], "block_size": p["block_size"],
                "grad_clip": DEFAULT_GRAD_CLIP}
    data, gen = RandomTokens(model.config.vocab_size), torch.Generator().manual_seed(cfg["seed"])

    def step(data, gen):
        return train_step(model, optimizer, scaler, data, gen, step_cfg, run)
    _time_steps(step, data, gen, p["warmup"], device)
    times, _, _ = _time_steps(step, data, gen, p["steps"], device)
    weights = adapter_state(model) if settings.get("lora_rank") else model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:  # what train.py's best and _last files hold, less the small extras
        best, last = os.path.join(tmp, "best.pt"), os.path.join(tmp, "last.pt")
        torch.save({"model": weights}, best)
        torch.save({"model": weights, "optimizer": optimizer.state_dict()}, last)
        sizes = [os.path.getsize(path) / 2 ** 20 for path in (best, last)]
    return {"variant": cfg["variant"], "device": device, "dtype": run["dtype"], "threads": torch.get_num_threads(),
            "batch_size": p["batch_size"], "block_size": p["block_size"], "steps": p["steps"],
            "total_params": sum(t.numel() for t in model.parameters()),
            "trainable_params": sum(t.numel() for t in model.parameters() if t.requires_grad),
            "ms_per_iter": round(statistics.median(times) * 1000, 1),
            "tokens_per_s": round(p["batch_size"] * p["block_size"] / statistics.median(times), 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "best_ckpt_mb": round(sizes[0], 2),
            "last_ckpt_mb": round(sizes[1], 2),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------------------------------------------------------------
# prepare.py end to end against tools/prepare_bare.py, the work every tokeniser must do (JSON decoding, the template's
# text, tiktoken's batch encoder, uint16 writes): both as processes (wall, CPU, peak RSS)


def bench_prepare(cfg):
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        for kind, source in (("chat", cfg["prepare_chat"]), ("text", cfg["prepare_text"])):
            if not source:
                continue
            source = source if os.path.isfile(source) else os.path.join(here, source)  # relative to the repo
            if not os.path.isfile(source):
                raise SystemExit(f"error: --prepare_{kind}={cfg[f'prepare_{kind}']}: no such file")
            path = os.path.join(tmp, f"big_{kind}{os.path.splitext(source)[1]}")
            copies = _repeat_file(source, path, cfg["prepare_mb"] * 10 ** 6)
            runs = {"bare": [], "prepare": []}
            for _ in range(cfg["prepare_runs"]):  # alternately: a load that comes and goes hits both alike
                runs["bare"].append(_run_child([os.path.join(here, "tools", "prepare_bare.py"), kind, path,
                                                os.path.join(tmp, "bare.bin")]))
                runs["prepare"].append(_run_child([os.path.join(here, "prepare.py"), path,
                                                   f"--out_dir={os.path.join(tmp, kind)}"]))
            (bare, bare_out), (prep, _) = (min(runs[k], key=lambda r: r[0]["s"]) for k in ("bare", "prepare"))
            with open(os.path.join(tmp, kind, "meta.json")) as f:
                tokens = sum(json.load(f)["tokens"].values())
            rows.append({"kind": kind, "source": source, "copies": copies, "mb": round(os.path.getsize(path) / 1e6, 1),
                         "tokens": tokens, "tokens_bare": int(bare_out.split()[-1]),
                         **{f"bare_{k}": v for k, v in bare.items()}, **{f"prepare_{k}": v for k, v in prep.items()},
                         "ratio": round(bare["s"] / prep["s"], 3)})
    print(f"prepare: {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}; the faster of {cfg['prepare_runs']} "
          f"run(s) each; ratio = bare wall / prepare.py wall (1 = as fast as the bare loop; both whole processes)")
    for r in rows:
        print(f"  {r['kind']:<5}{r['mb']:>6.1f} MB ({r['copies']} copies), {r['tokens']:,} tokens: bare "
              f"{r['bare_s']:.2f}s wall / {r['bare_cpu_s']:.2f}s CPU / {r['bare_peak_rss_mb']:.0f} MB; prepare.py "
              f"{r['prepare_s']:.2f}s wall / {r['prepare_cpu_s']:.2f}s CPU / {r['prepare_peak_rss_mb']:.0f} MB; "
              f"ratio {r['ratio']:.2f}")
    return {"mode": "prepare", "rows": rows, "load_avg_1min": round(os.getloadavg()[0], 2)}


def _repeat_file(source, path, size):
    """Write source repeated until path holds about size bytes; returns the number of copies."""
    with open(source, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        data += b"\n"
    copies = max(1, round(size / max(1, len(data))))
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return copies


# Runs `python ARGS` from a fresh small process and reports its rusage: a child of bench.py itself would count
# bench.py's own memory (torch) in its peak RSS, which Linux carries over a fork and exec.
MEASURE_CHILD = """import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), time.perf_counter() - start,
                  usage.ru_utime + usage.ru_stime, usage.ru_maxrss]), file=sys.stderr)
"""


def _run_child(args):
    """({s, cpu_s, peak_rss_mb}, stdout) of `python *args`: wall and CPU time and peak RSS of that process alone,
    interpreter start and imports included."""
    p = subprocess.run([sys.executable, "-c", MEASURE_CHILD, *args], capture_output=True, text=True)
    code, wall, cpu, rss = json.loads(p.stderr.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"error: {' '.join(args)} failed:\n{p.stdout}{p.stderr}")
    rss = rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux
    return {"s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(rss, 1)}, p.stdout


def _has_transformers():
    return importlib.util.find_spec("transformers") is not None


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="bench.py")
    modes = {"train": bench_train, "generate": bench_generate, "half": bench_half, "sample": bench_sample,
             "finetune": bench_finetune, "prepare": bench_prepare}
    if cfg["mode"] not in modes:
        raise SystemExit(f"error: unknown --mode={cfg['mode']!r}: use one of {sorted(modes)}")
    result = modes[cfg["mode"]](cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
