"""--mode=parallel: per-rank peak memory and tokens/s of DDP vs FSDP (train.py's --parallel) with
2 processes under torchrun (gloo on CPU, nccl on CUDA), each mode a fresh launch, at GPT-2 medium
shape (or large: FSDP's case, where two DDP replicas would not fit 24 GB). CPU: the peak RSS;
CUDA: the peak allocated memory.

    OMP_NUM_THREADS=1 python bench.py --mode=parallel                  # medium: ddp vs fsdp
    OMP_NUM_THREADS=1 python bench.py --mode=parallel --parallel_shape=large --parallel_modes=fsdp
"""
import gc
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.distributed as dist

from benchmarks.train_speed import PRESET_OVERRIDES, RandomTokens, peak_rss_mb, time_steps
from chat_gpt2.device import resolve_device, resolve_dtype, tune_cpu_allocator
from chat_gpt2.parallel import replicate, shard_model
from chat_gpt2.training import DEFAULT_GRAD_CLIP, train_step
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python bench.py --help` prints these comments (--batch_size ... --warmup: as --mode=train's)
DEFAULTS = dict(
    parallel_modes="ddp,fsdp",  # --mode=parallel: the modes to compare, each a torchrun launch
    parallel_shape="medium",  # --mode=parallel: medium (24x16x1024), large (36x20x1280) or tiny
    parallel_rank="",  # --mode=parallel: this process is a rank of that mode's launch (internal)
)

SHAPES = {"tiny": dict(n_layer=2, n_head=2, n_embd=64),  # the test's
          "medium": dict(n_layer=24, n_head=16, n_embd=1024),
          "large": dict(n_layer=36, n_head=20, n_embd=1280)}
RUN = dict(batch_size=1, block_size=128, steps=2, warmup=1)
PROCESSES = 2


def bench(cfg):
    """Each mode in its own torchrun launch (so a rank's peak RSS is its own): rank 0 reports every
    rank's peak and the step's tokens/s across the ranks."""
    if cfg["parallel_rank"]:
        return _rank(cfg)
    rows = []
    for mode in cfg["parallel_modes"].split(","):
        keys = ("device", "dtype", "seed", "parallel_shape", *PRESET_OVERRIDES)
        flags = [f"--{k}={cfg[k]}" for k in keys]
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={PROCESSES}", os.path.join(REPO, "bench.py"),
                            "--mode=parallel", f"--parallel_rank={mode}", *flags],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"error: --parallel={mode} failed:\n{p.stderr[-4000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    shape = SHAPES[cfg["parallel_shape"]]
    print(f"parallel: {cfg['parallel_shape']} shape {shape['n_layer']}x{shape['n_head']}x"
          f"{shape['n_embd']}, AdamW fp32, {PROCESSES} processes, batch {rows[0]['batch_size']} x "
          f"block {rows[0]['block_size']} per rank, device {rows[0]['device']}, dtype "
          f"{rows[0]['dtype']}, load avg {rows[0]['load_avg_1min']}")
    print(f"  {'mode':<6}{'peak RSS per rank':>22}{'tokens/s':>10}")
    for r in rows:
        peaks = " / ".join(f"{mb:,.0f}" for mb in r["peak_rss_mb"])
        print(f"  {r['mode']:<6}{peaks + ' MB':>22}{r['tokens_per_s']:>10,.1f}")
    by_mode = {r["mode"]: max(r["peak_rss_mb"]) for r in rows}
    if {"ddp", "fsdp"} <= set(by_mode):
        print(f"  fsdp / ddp peak: {by_mode['fsdp'] / by_mode['ddp']:.0%}")
    return {"mode": "parallel", "runs": rows}


def _rank(cfg):
    """One rank: every rank's peak memory gathered to rank 0, which prints the JSON line. The
    process group is torn down after the model (DDP's) is freed, as train.py does."""
    device = resolve_device(cfg["device"])
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    run = {"device": device, "dtype": resolve_dtype(cfg["dtype"], device), "ddp": True,
           "fsdp": cfg["parallel_rank"] == "fsdp", "master": rank == 0}
    result = _measure(cfg, run)
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    if rank != 0:  # bench.py prints the returned dict: rank 0's alone is read
        sys.stdout = open(os.devnull, "w")
    return result


def _measure(cfg, run):
    """The model built, sharded (fsdp) or replicated (ddp) as train.py does, warmup steps, timed
    steps: this mode's figures, every rank's peak."""
    p = {**RUN, **{k: cfg[k] for k in PRESET_OVERRIDES if cfg[k]}}
    device, rank = run["device"], dist.get_rank()
    tune_cpu_allocator(device, lean=run["fsdp"])  # as train.py does
    config = GPTConfig(**SHAPES[cfg["parallel_shape"]], block_size=p["block_size"],
                       vocab_size=50304, dropout=0.0)
    torch.manual_seed(cfg["seed"])
    # FSDP: rank 0 builds it on the CPU, the others on the meta device
    model = shard_model(lambda: GPT(config) if run["fsdp"] else GPT(config).to(device), run)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.split(":")[0])
    model = replicate(model, run)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=run["dtype"] == "float16")
    step_cfg = {"gradient_accumulation_steps": 1, "batch_size": p["batch_size"],
                "block_size": p["block_size"], "grad_clip": DEFAULT_GRAD_CLIP}
    data, gen = RandomTokens(50304), torch.Generator().manual_seed(cfg["seed"] + rank)

    def step(data, gen):
        return train_step(model, optimizer, scaler, data, gen, step_cfg, run)
    time_steps(step, data, gen, p["warmup"], device)
    times, _, _ = time_steps(step, data, gen, p["steps"], device)
    cuda = device.startswith("cuda")
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mb()
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, round(peak, 1))
    return {"mode": cfg["parallel_rank"], "device": device, "dtype": run["dtype"],
              "batch_size": p["batch_size"], "block_size": p["block_size"], "steps": p["steps"],
              "peak_rss_mb": peaks, "tokens_per_s": round(
                  len(peaks) * p["batch_size"] * p["block_size"] / statistics.median(times), 1),
              "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
