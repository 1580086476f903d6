"""--mode=train: train.py's own train_step on random tokens; steps/s, tokens/s, achieved FLOP/s and
MFU against the matmul peak measured in the same run, peak memory; --profile adds where a step's
time goes.

    python bench.py --mode=train --preset=tiny       # training throughput, MFU against the measured peak
    python bench.py --mode=train --preset=124m       # GPT-2 124M shape, batch 4 (also: 6x384, batch 8)
    python bench.py --mode=train --preset=124m --baseline  # nanoGPT's recipe for the device, to compare
    python bench.py --mode=train --preset=124m --profile   # + where the step's time goes, the matmul-only ceiling
"""
import os
import resource
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

from chat_gpt2.device import (autocast, known_peak_flops, measure_matmul_peak, resolve_compile,
                              resolve_device, resolve_dtype, sync, tune_cpu_allocator)
from chat_gpt2.training import DEFAULT_GRAD_CLIP, to_device, train_step
from model import GPT, GPTConfig

# `python bench.py --help` prints these comments (--device, --dtype, --seed: bench.py's)
DEFAULTS = dict(
    # --mode=train: tiny (seconds) | 6x384 (batch 8) | 124m (GPT-2 124M shape, batch 4)
    preset="tiny",
    batch_size=0,  # --mode=train/finetune: override the preset's batch size (0 = the preset's)
    block_size=0,  # --mode=train/finetune: override the preset's block size (0 = the preset's)
    steps=0,  # --mode=train/finetune: override the preset's timed steps (0 = the preset's)
    # --mode=train/finetune: override the preset's untimed warm-up steps (0 = the preset's)
    warmup=0,
    compile=None,  # --mode=train: torch.compile as train.py's --compile
    # --mode=train: nanoGPT's recipe instead of ours (full-logits loss; on the CPU fp32, plain AdamW)
    baseline=False,
    # --mode=train: also where a step's time goes (phases; matmuls, attention alone; MFU ceilings)
    profile=False,
)
# the keys above that override a preset
PRESET_OVERRIDES = ("batch_size", "block_size", "steps", "warmup")

# Shapes of the reference figures in docs/performance.md: vocab 50304, no bias, no dropout, one
# micro-step, block 256.
TRAIN_PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=128, batch_size=4, block_size=64, steps=5, warmup=2,
                 peak_sizes=(512, 1024), peak_repeats=2),
    "6x384": dict(n_layer=6, n_head=6, n_embd=384, batch_size=8, block_size=256, steps=10, warmup=2,
                  peak_sizes=(1024, 2048, 4096), peak_repeats=5),
    "124m": dict(n_layer=12, n_head=12, n_embd=768, batch_size=4, block_size=256, steps=6, warmup=2,
                 peak_sizes=(1024, 2048, 4096), peak_repeats=5),
}


class RandomTokens:
    """Stands in for dataset.ChatData: uniform random tokens, every position learned (mask 1), so
    the LM head runs on every position as in nanoGPT and the FLOP count 6N + 12LHQT is the work
    actually done."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def get_batch(self, batch_size, block_size, generator):
        seq = torch.randint(self.vocab_size, (batch_size, block_size + 1), generator=generator)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), torch.ones(batch_size, block_size)


def train_setup(cfg, preset=None):
    """The preset (--preset's, or preset: tools/gpu_bench.py's) with cfg's overrides; the model, the
    module that runs (compiled or the model), the optimizer, and one train.py step as a function."""
    if preset is None and cfg["preset"] not in TRAIN_PRESETS:
        raise SystemExit(f"error: unknown --preset={cfg['preset']!r}: use one of "
                         f"{sorted(TRAIN_PRESETS)}")
    p = dict(preset or TRAIN_PRESETS[cfg["preset"]])
    p.update({k: cfg[k] for k in PRESET_OVERRIDES if cfg[k]})
    p["grad_clip"] = DEFAULT_GRAD_CLIP
    device = resolve_device(cfg["device"])
    cpu_baseline = cfg["baseline"] and not device.startswith("cuda")
    dtype = "float32" if cpu_baseline else resolve_dtype(cfg["dtype"], device)
    run = {"device": device, "dtype": dtype, "ddp": False,
           "compile": resolve_compile(cfg["compile"], device)}
    if not cpu_baseline:
        tune_cpu_allocator(device)
    torch.manual_seed(cfg["seed"])
    model = GPT(train_config(p)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.split(":")[0])
    if cfg["baseline"]:
        optimizer = _baseline(model, optimizer, cpu_baseline)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=run["dtype"] == "float16")
    step_cfg = {"gradient_accumulation_steps": 1, "batch_size": p["batch_size"],
                "block_size": p["block_size"], "grad_clip": p["grad_clip"]}
    compiled = torch.compile(model) if run["compile"] else model

    def step(data, gen):
        return train_step(compiled, optimizer, scaler, data, gen, step_cfg, run)
    return p, run, model, compiled, optimizer, step


def train_config(p):
    """The GPTConfig of a preset's shape (nanoGPT's padded vocabulary, no bias, no dropout)."""
    return GPTConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"],
                     block_size=p["block_size"], vocab_size=50304, bias=False, dropout=0.0)


def _baseline(model, optimizer, cpu):
    """nanoGPT's recipe for the device, to compare against on the same machine: its loss,
    F.cross_entropy over the full fp32 logits instead of model.head_loss; on CUDA that is all (bf16
    autocast, or fp16 with a GradScaler, torch.compile and fused AdamW are its CUDA recipe as they
    are ours; its TF32 switch changes nothing here: under autocast no matmul is fp32). On the CPU
    (cpu): PyTorch's default AdamW too (unfused, for-loop); fp32 and glibc's default allocator are
    set by the caller."""

    def plain_loss(self, x, targets, loss_mask):  # every position is learned here (RandomTokens)
        return F.cross_entropy(self.lm_head(x).float(), targets, ignore_index=-1)

    model._masked_loss = types.MethodType(plain_loss, model)
    if not cpu:
        return optimizer
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=optimizer.defaults["lr"], betas=optimizer.defaults["betas"])


def peak_rss_mb():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # bytes on macOS, KiB on Linux
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def time_steps(step, data, gen, n, device):
    """Run n steps, syncing once per step. Returns (wall seconds per step, process CPU seconds per
    step, the loss of each step). CPU time is what a step costs whatever else the machine runs; wall
    time well above CPU time / threads means other processes took the cores."""
    times, cpu, losses = [], [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(data, gen)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(loss)
    # .item() after the clock: no host sync inside the timed steps
    return times, cpu, [float(x) for x in losses]


def _measure_peaks(device, dtype, p, peaks=None):
    """{dtype: FLOP/s} for fp32 and the training dtype, the best of this and any earlier measurement
    (bench measures before and after training: a second chance for a moment when other processes
    leave the cores)."""
    peaks = dict(peaks or {})
    for d in {"float32", dtype}:
        peaks[d] = max(peaks.get(d, 0.0),
                       measure_matmul_peak(device, d, p["peak_sizes"], p["peak_repeats"]))
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
    """The step's matmul-bound work timed alone at the model's shapes in dtype, in ms: the linear
    layers' matmuls (every Linear and the tied LM head on all tokens; forward x @ W.T, backward g @
    W and g.T @ x: the 6N of the FLOP count) and attention (SDPA, causal) forward and forward +
    backward, times n_layer."""
    dt, tokens, cfg = getattr(torch, dtype), batch_size * block_size, model.config
    shapes = [(m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, torch.nn.Linear)]
    out = {"matmul_fwd": 0.0, "matmul_bwd": 0.0}
    for k, n in sorted(set(shapes)):
        x, w, g = (torch.randn(*s, device=device).to(dt)
                   for s in ((tokens, k), (n, k), (tokens, n)))
        count = shapes.count((k, n))
        out["matmul_fwd"] += count * _median_ms(lambda: x @ w.t(), device)
        out["matmul_bwd"] += count * (_median_ms(lambda: g @ w, device)
                                      + _median_ms(lambda: g.t() @ x, device))
    q, k, v = (torch.randn(batch_size, cfg.n_head, block_size, cfg.n_embd // cfg.n_head,
                           device=device)
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
    """Median wall ms of each phase of a training step (forward with the loss, backward, grad-norm
    clipping, AdamW step and zero_grad), with a device sync between phases. Not torch.profiler: on
    CPU its bookkeeping fragments the heap, so the large-tensor ops page-fault and show up many
    times slower than they run. Timing only: a float16 run's GradScaler is left out here (no
    accumulation or DDP either, as in the bench's own steps)."""
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
    """Where a step's time goes (phase_ms), how much of it the matmul-bound work takes when timed
    alone (kernel_ms), and the MFU ceilings that follow: if everything but the matmuls were free; if
    everything but the matmuls and attention were; and if only the elementwise ops (casts, GELU,
    LayerNorm, adds, embedding, the loss's softmax) were free, with clipping and AdamW as measured.
    compiled: the module the step runs (model or its torch.compile wrapper)."""
    phases = phase_ms(compiled, optimizer, data, gen, p, run)
    kernels = kernel_ms(model, p["batch_size"], p["block_size"], run["dtype"], run["device"])
    matmuls = kernels["matmul_fwd"] + kernels["matmul_bwd"]
    attention = kernels["attention_fwd"] + kernels["attention_bwd"]
    floors = {"matmuls": matmuls, "matmuls_attention": matmuls + attention,
              "matmuls_attention_clip_adamw":
                  matmuls + attention + phases["clip"] + phases["optimizer"]}
    rest = {phase: round(phases[phase] - kernels[f"matmul_{short}"] - kernels[f"attention_{short}"],
                         1)
            for phase, short in (("forward", "fwd"), ("backward", "bwd"))}
    ceilings = {k: round(flops_per_step / (ms / 1000) / peak, 4) for k, ms in floors.items()}
    return {"phase_ms": phases, "kernel_ms": kernels, "elementwise_ms": rest,
            "mfu_ceiling": ceilings}


def bench(cfg):
    """Train steps/s, tokens/s, FLOP/s, MFU against the peaks measured in this run, peak memory."""
    return measure(cfg)[0]


def measure(cfg, preset=None):
    """bench's report and JSON dict for --preset or preset (train_setup), and a function that runs
    one more step of the same run (tools/gpu_bench.py profiles it): (result, step)."""
    p, run, model, compiled, optimizer, step = train_setup(cfg, preset)
    device, dtype = run["device"], run["dtype"]
    cuda = device.startswith("cuda")
    peaks = _measure_peaks(device, dtype, p)
    known = known_peak_flops(device, dtype)
    data = RandomTokens(model.config.vocab_size)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    print(f"train: preset {cfg['preset']}, {model.get_num_params() / 1e6:.1f}M parameters, device "
          f"{device}, dtype {dtype}, compile {run['compile']}, "
          f"{'BASELINE (nanoGPT recipe), ' if cfg['baseline'] else ''}{torch.get_num_threads()} "
          f"threads, batch {p['batch_size']} x block {p['block_size']}; matmul peak "
          + ", ".join(f"{d} {v / 1e9:,.0f} GFLOP/s" for d, v in peaks.items()))
    gen = torch.Generator().manual_seed(cfg["seed"])
    # compile, allocations, kernel choice
    warm_times, _, _ = time_steps(step, data, gen, p["warmup"], device)
    times, cpu, losses = time_steps(step, data, gen, p["steps"], device)
    # training's, not the peak measurement's matmuls
    cuda_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
    peaks = _measure_peaks(device, dtype, p, peaks)
    tokens = p["batch_size"] * p["block_size"]
    flops_per_token = model.flops_per_token(p["block_size"])
    median, best = statistics.median(times), min(times)
    achieved = flops_per_token * tokens / median
    result = {
        "mode": "train", "preset": cfg["preset"], "device": device, "dtype": dtype,
        "compile": run["compile"], "baseline": cfg["baseline"],
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "n_layer": p["n_layer"], "n_head": p["n_head"], "n_embd": p["n_embd"],
        "batch_size": p["batch_size"],
        "block_size": p["block_size"], "n_params": model.get_num_params(),
        "flops_per_token": flops_per_token,
        "steps": p["steps"], "warmup_steps": p["warmup"], "warmup_s": round(sum(warm_times), 2),
        "ms_per_iter": round(median * 1000, 1), "ms_per_iter_best": round(best * 1000, 1),
        "cpu_ms_per_iter": round(statistics.median(cpu) * 1000, 1),
        "tokens_per_s": round(tokens / median, 1), "tokens_per_s_best": round(tokens / best, 1),
        "achieved_gflops": round(achieved / 1e9, 1),
        "peak_gflops_fp32": round(peaks["float32"] / 1e9, 1),
        "peak_gflops_dtype": round(peaks[dtype] / 1e9, 1),
        "mfu": round(achieved / peaks[dtype], 4),
        "mfu_vs_fp32_peak": round(achieved / peaks["float32"], 4),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if cuda else None,
        "known_peak_gflops": round(known / 1e9, 1) if known else None,
        "mfu_vs_known_peak": round(achieved / known, 4) if known else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "max_memory_allocated_mb": round(cuda_mb, 1) if cuda else None,
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        # others' work
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if cfg["profile"]:
        result["breakdown"] = breakdown(model, compiled, optimizer, data, gen, p, run,
                                        flops_per_token * tokens, peaks[dtype])
    _print_train(result)
    return result, lambda: step(data, gen)


def _print_train(r):
    print(f"{r['ms_per_iter']:.1f} ms/iter (best {r['ms_per_iter_best']:.1f}; process CPU time "
          f"{r['cpu_ms_per_iter']:.1f} ms), {r['tokens_per_s']:,.1f} tokens/s (best "
          f"{r['tokens_per_s_best']:,.1f}), {r['achieved_gflops']:,.1f} GFLOP/s achieved")
    print(f"MFU {r['mfu']:.1%} of the measured {r['dtype']} peak ({r['peak_gflops_dtype']:,.0f} "
          f"GFLOP/s), {r['mfu_vs_fp32_peak']:.1%} of the fp32 peak ({r['peak_gflops_fp32']:,.0f} "
          "GFLOP/s)" + (f", {r['mfu_vs_known_peak']:.1%} of the {r['gpu']} data sheet"
                        if r["mfu_vs_known_peak"] else ""))
    memory = (f"max_memory_allocated {r['max_memory_allocated_mb']:,.0f} MB, "
              if r["max_memory_allocated_mb"] is not None else "")
    print(f"peak memory: {memory}RSS {r['peak_rss_mb']:,.0f} MB; loss {r['loss_first']:.4f} -> "
          f"{r['loss_last']:.4f}; warm-up {r['warmup_s']:.1f} s for {r['warmup_steps']} steps; "
          f"load average {r['load_avg_1min']}")
    if "breakdown" in r:
        b, ph, k = r["breakdown"], r["breakdown"]["phase_ms"], r["breakdown"]["kernel_ms"]
        print(f"step phases (ms): forward {ph['forward']:,.1f}, backward {ph['backward']:,.1f}, "
              f"grad clipping {ph['clip']:,.1f}, AdamW + zero_grad {ph['optimizer']:,.1f}")
        print("timed alone at the model's shapes (ms): linear matmuls forward "
              f"{k['matmul_fwd']:,.1f} / backward {k['matmul_bwd']:,.1f}; attention forward "
              f"{k['attention_fwd']:,.1f} / backward {k['attention_bwd']:,.1f}; the rest (casts, "
              "GELU, LayerNorm, adds, embedding, loss softmax) forward "
              f"{b['elementwise_ms']['forward']:,.1f} / backward "
              f"{b['elementwise_ms']['backward']:,.1f}")
        c = b["mfu_ceiling"]
        print(f"MFU ceiling if only the matmuls took time: {c['matmuls']:.1%}; matmuls + "
              f"attention: {c['matmuls_attention']:.1%}; + grad clipping and AdamW: "
              f"{c['matmuls_attention_clip_adamw']:.1%}")
