"""Train or fine-tune a GPT on a prepared chat dataset (see prepare.py).

    python train.py config/finetune_chat.py --batch_size=4          # single process
    torchrun --standalone --nproc_per_node=2 train.py config/demo.py  # DDP (gloo on CPU, nccl on CUDA)

Config keys and their meaning follow nanoGPT; `python train.py --help` lists them all with their defaults.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import chat
import configurator
from bench import peak_flops
from model import (GPT, GPTConfig, autocast, find_checkpoint, from_pretrained, load_checkpoint,
                   model_from_checkpoint, pretrained_config, resolve_device, resolve_dtype, resolve_pretrained,
                   save_checkpoint)

DEFAULTS = dict(
    # I/O
    out_dir="out", eval_interval=50, log_interval=10, eval_iters=20, init_from="scratch",
    # init_from: 'scratch', 'resume', 'gpt2' .. 'gpt2-xl', a Hugging Face repo id or a local HF GPT-2 directory
    dataset="chat",  # a folder under data/ or a path to a folder written by prepare.py
    # data
    gradient_accumulation_steps=1, batch_size=2, block_size=128,
    # model (used when training from scratch)
    n_layer=12, n_head=12, n_embd=768, dropout=0.1, bias=True,
    # AdamW and the learning-rate schedule
    learning_rate=3e-4, max_iters=1000, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    decay_lr=True, warmup_iters=100, lr_decay_iters=None, min_lr=3e-5,  # lr_decay_iters None: follows max_iters
    # early stopping: stop after `patience` evals without a val improvement of at least min_delta (0 = off)
    patience=5, min_delta=0.001,
    # system
    backend="auto", device="auto", dtype="auto", seed=1337,
    compile=None,  # torch.compile: True / False; None = on for CUDA, off on CPU and MPS (see resolve_compile)
    check_memory=True,  # refuse to start a run whose memory estimate exceeds the device's free memory
    # logging
    wandb_log=False, wandb_project="chat-gpt", wandb_run_name="", wandb_mode="",  # mode "": WANDB_MODE or online
    sample_max_tokens=32,  # length of the sample reply printed at each eval (0 = none)
)


# ----------------------------------------------------------------------------------------------------------------
# Data: windows that start on a conversation or turn boundary


class ChatData:
    """One split of a prepared dataset, memory-mapped. Batches are windows of block_size + 1 tokens starting at a
    turn boundary (so an answer is never trained without its question); a window may run into the following
    conversations and is padded (target -1, mask 0) at the end of the split."""

    def __init__(self, folder, split, meta):
        path = os.path.join(folder, f"{split}.bin")
        self.ids = np.memmap(path, dtype=np.uint16, mode="r")
        self.mask = np.memmap(os.path.join(folder, f"{split}_mask.bin"), dtype=np.uint8, mode="r")
        self.starts = np.load(os.path.join(folder, f"{split}_turns.npy"))
        self.convs = np.load(os.path.join(folder, f"{split}_convs.npy"))
        expected = meta["tokens"][split]
        if len(self.ids) != expected or len(self.mask) != expected:
            raise ValueError(f"{path}: {len(self.ids)} tokens / {len(self.mask)} mask entries but meta.json says "
                             f"{expected}: the dataset is incomplete, run prepare.py again")

    def get_batch(self, batch_size, block_size, generator):
        picks = torch.randint(len(self.starts), (batch_size,), generator=generator).numpy()
        x = np.full((batch_size, block_size), chat.EOT, dtype=np.int64)
        y = np.full((batch_size, block_size), -1, dtype=np.int64)
        m = np.zeros((batch_size, block_size), dtype=np.float32)
        for row, start in enumerate(self.starts[picks]):
            window = self.ids[start:start + block_size + 1].astype(np.int64)
            n = len(window) - 1  # block_size, or fewer at the end of the split
            x[row, :n] = window[:-1]
            y[row, :n] = window[1:]
            m[row, :n] = self.mask[start + 1:start + n + 1]
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)

    def first_prompt(self):
        """Token ids of the first val conversation up to where its first reply starts (for sample replies)."""
        end = self.convs[1] if len(self.convs) > 1 else len(self.ids)
        learned = np.flatnonzero(self.mask[:end])
        return self.ids[:learned[0] if len(learned) else end].astype(np.int64).tolist()


def load_dataset(dataset):
    folder = dataset if os.path.isdir(dataset) else os.path.join("data", dataset)
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no prepared dataset at {folder!r} (missing meta.json): run "
                                f"`python prepare.py YOUR_DATA.jsonl --out_dir={folder}` first")
    with open(meta_path) as f:
        meta = json.load(f)
    return {split: ChatData(folder, split, meta) for split in ("train", "val")}, meta


# ----------------------------------------------------------------------------------------------------------------
# Schedule and early stopping


def get_lr(it, cfg):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then constant."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    decay_iters = cfg["max_iters"] if cfg["lr_decay_iters"] is None else cfg["lr_decay_iters"]
    if it >= decay_iters:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


@dataclass
class EarlyStopping:
    """Counts evaluations without a val improvement of at least min_delta over the best seen so far."""
    patience: int
    min_delta: float
    best: float = float("inf")  # best val loss, for the best checkpoint (any improvement counts)
    reference: float = float("inf")  # val loss of the last improvement of at least min_delta
    stale: int = 0

    def update(self, val_loss):
        """Returns (is_new_best, should_stop)."""
        is_best = val_loss < self.best
        self.best = min(self.best, val_loss)
        if val_loss < self.reference - self.min_delta:
            self.reference, self.stale = val_loss, 0
        else:
            self.stale += 1
        return is_best, self.patience > 0 and self.stale >= self.patience


# ----------------------------------------------------------------------------------------------------------------
# Setup: config, processes, model, optimizer


def resolve_config(argv):
    """Defaults <- config files and flags; on resume, the saved config <- what this command line set."""
    cfg, explicit = configurator.load(DEFAULTS, argv, prog="train.py")
    resume_from = None
    if cfg["init_from"] == "resume":
        resume_from = find_checkpoint(cfg["out_dir"], last=True)
        saved = load_checkpoint(resume_from)["config"]
        overrides = {k: v for k, v in explicit.items() if k != "init_from" and saved.get(k) != v}
        cfg = {**DEFAULTS, **saved, **overrides, "init_from": "resume"}
        print(f"resuming {resume_from}" + (f" with overrides {overrides}" if overrides else ""))
    return cfg, resume_from, explicit


def setup_processes(cfg):
    """Single process, or DDP under torchrun (RANK / LOCAL_RANK / WORLD_SIZE set). Returns a small dict."""
    device = resolve_device(cfg["device"])
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", -1), ("LOCAL_RANK", 0),
                                                                        ("WORLD_SIZE", 1)))
    if rank >= 0:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        dist.init_process_group(backend=backend)
    dtype = resolve_dtype(cfg["dtype"], device, training=True)
    tune_cpu_allocator(device)
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype=bfloat16 is not supported on this GPU: use --dtype=float16")
    return {"device": device, "dtype": dtype, "rank": max(rank, 0), "world": world, "ddp": rank >= 0,
            "master": rank <= 0}


def tune_cpu_allocator(device):
    """On Linux/glibc CPU training, keep freed memory in the process for reuse: no allocation is served by mmap
    and none is returned to the OS. A training step allocates and frees the same large tensors (activations,
    gradients, logits) every step; by default each one is a fresh mmap whose pages the kernel faults in and zeroes,
    which measured ~15% of a CPU step (README, "Training speed"). The peak RSS stays that of one step."""
    if device != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30)  # int: 1 GiB of free heap top is kept, not given back
    except (OSError, AttributeError):  # not glibc (e.g. musl): keep its defaults
        pass


def resolve_compile(value, device):
    """compile=None: on for CUDA, where it pays; off on CPU, where it measured no faster than the eager fast paths
    (fused head loss, bf16, fused AdamW) after a minute or more of compiling (README, "Training speed"), and on MPS."""
    if value is None:
        return device.startswith("cuda")
    if isinstance(value, str):  # e.g. --compile=true, which the config parser leaves as a string
        if configurator.parse_bool(value) is None:
            raise ValueError(f"invalid value {value!r} for compile: use True, False or None (auto)")
        return configurator.parse_bool(value)
    return bool(value)


def build_model(cfg, ckpt, sys_info, explicit=()):
    """explicit: the keys the command line / config files set; for a pretrained init_from, an explicit n_layer,
    n_head, n_embd or bias that differs from the checkpoint's is refused (the defaults are for scratch models)."""
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, dropout=cfg["dropout"])
    elif cfg["init_from"] == "scratch":
        config = GPTConfig(block_size=cfg["block_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                           n_embd=cfg["n_embd"], dropout=cfg["dropout"], bias=cfg["bias"])
        check_memory(config, cfg, sys_info)
        model = GPT(config)
    elif cfg["init_from"] == "resume":
        raise ValueError("init_from='resume' needs a checkpoint")
    else:  # 'gpt2' .. 'gpt2-xl', a Hub repo id or a local Hugging Face directory
        files = resolve_pretrained(cfg["init_from"])
        overrides = {"dropout": cfg["dropout"], "block_size": cfg["block_size"],
                     **{k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "bias") if k in explicit}}
        config = pretrained_config(files, overrides)
        check_memory(config, cfg, sys_info)
        if sys_info.get("master", True):
            print(f"loading {files.source}: n_layer={config.n_layer}, n_head={config.n_head}, "
                  f"n_embd={config.n_embd}, block_size={config.block_size}")
        model = from_pretrained(files, overrides)
        cfg.update(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, bias=True)  # saved as run
    if cfg["block_size"] < model.config.block_size:
        model.crop_block_size(cfg["block_size"])
    elif cfg["block_size"] > model.config.block_size:
        raise ValueError(f"block_size {cfg['block_size']} exceeds the model's {model.config.block_size}")
    return model.to(sys_info["device"])


# ----------------------------------------------------------------------------------------------------------------
# Memory: estimate what a run needs before starting it, refuse one that clearly will not fit


def count_params(config):
    """Parameters of GPT(config), counted without building it (the head is tied to the token embedding)."""
    C = config.n_embd
    per_layer = 12 * C * C + (13 * C if config.bias else 2 * C)  # 4 matmuls (+ biases) and 2 LayerNorms
    return config.vocab_size * C + config.block_size * C + config.n_layer * per_layer + (2 if config.bias else 1) * C


def estimate_memory(config, cfg, dtype, ddp=False):
    """Bytes a training process needs, by part. Weights, gradients and AdamW's two moments are fp32 (4 bytes per
    parameter each; mixed precision adds a 2-byte cast of the weights, DDP a gradient-sized bucket copy).
    Activations kept for backward at batch_size x block_size follow Korthikanti et al. 2022: 34*s*b*h bytes per
    layer at 2 bytes per value, plus 5*a*s^2*b when the attention matrix is materialised (flash=False); the logits
    add b*s*V values with their fp32 copy and gradient. An estimate: allocator slack and the runtime come on top."""
    n = count_params(config)
    act = 2 if dtype in ("bfloat16", "float16") else 4
    b, s = cfg["batch_size"], min(cfg["block_size"], config.block_size)
    h, a = config.n_embd, config.n_head
    per_layer = 34 * s * b * h * act / 2 + (0 if config.flash else 5 * a * s * s * b * act / 2)
    parts = {
        "weights": 4 * n + (2 * n if act == 2 else 0),
        "gradients": 4 * n * (2 if ddp else 1),
        "optimizer": 8 * n,
        "activations": config.n_layer * per_layer + b * s * config.vocab_size * (act + 8),
    }
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def available_memory(device):
    """Free memory in bytes: the device's on CUDA, the OS's MemAvailable on CPU / MPS (shared); None if unknown."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(config, cfg, sys_info):
    """Print the run's memory estimate; raise RuntimeError with what to change when it exceeds the free memory
    (unless check_memory is False). Processes sharing host memory (DDP on CPU) are counted together."""
    need = estimate_memory(config, cfg, sys_info.get("dtype", "float32"), sys_info.get("ddp", False))
    device = sys_info["device"]
    procs = 1 if device.startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE", sys_info.get("world", 1)))
    total, avail = need["total"] * procs, available_memory(device)
    b, s = cfg["batch_size"], min(cfg["block_size"], config.block_size)

    def gib(x):
        return f"{x / 2 ** 30:.2f} GiB"

    if sys_info.get("master", True):
        print(f"memory estimate: {gib(total)}{f' for {procs} processes' if procs > 1 else ''} (weights "
              f"{gib(need['weights'])}, gradients {gib(need['gradients'])}, AdamW state {gib(need['optimizer'])}, "
              f"activations {gib(need['activations'])} at batch_size {b} x block_size {s})"
              + (f"; {gib(avail)} available on {device}" if avail is not None else ""), flush=True)
    if not cfg.get("check_memory", True) or avail is None or total <= avail:
        return need
    states = (need["total"] - need["activations"]) * procs
    if states > avail:
        advice = (f"the model alone takes {gib(states)} for its weights, gradients and AdamW state: use a smaller "
                  f"model (gpt2 < gpt2-medium < gpt2-large < gpt2-xl) or a device with more memory")
    else:
        fits = int((avail - states) / (need["activations"] * procs / b))  # the largest batch that fits
        advice = f"the activations at batch_size {b} x block_size {s} take {gib(need['activations'] * procs)}: "
        if fits >= 1:
            accum = math.ceil(b * cfg["gradient_accumulation_steps"] / fits)
            advice += (f"use a smaller batch with more accumulation, e.g. --batch_size={fits} "
                       f"--gradient_accumulation_steps={accum} (about the same tokens per step), or a smaller "
                       f"--block_size")
        else:
            advice += "use --batch_size=1 with a smaller --block_size, or a smaller model"
    raise RuntimeError(f"this run needs about {gib(total)} but only {gib(avail)} is available on {device}; {advice}. "
                       f"(--check_memory=False starts it anyway)")


# ----------------------------------------------------------------------------------------------------------------
# Steps: train, evaluate, checkpoint, log


def to_device(batch, device):
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return [t.pin_memory().to(device, non_blocking=True) for t in batch]
    return [t.to(device) for t in batch]


def train_step(model, optimizer, scaler, data, generator, cfg, run, stats=None):
    """One optimizer step over gradient_accumulation_steps micro-batches. The loss is the token-weighted mean over
    the learned tokens of all micro-batches (not the last micro-batch's); it stays on the device (no sync).
    stats: a dict whose "learned_tokens" is increased by this step's count (for the log's FLOP count)."""
    steps = cfg["gradient_accumulation_steps"]
    batches = [data.get_batch(cfg["batch_size"], cfg["block_size"], generator) for _ in range(steps)]
    learned = float(sum(m.sum() for _, _, m in batches))  # counted on the host: no device sync
    total = max(1.0, learned)
    if stats is not None:
        stats["learned_tokens"] = stats.get("learned_tokens", 0.0) + learned
    loss_sum = torch.zeros((), device=run["device"])
    for micro, batch in enumerate(batches):
        weight = float(batch[2].sum()) / total
        x, y, m = to_device(batch, run["device"])
        # under DDP, gradients are all-reduced only on the last micro-step
        sync = model.no_sync() if run["ddp"] and micro < steps - 1 else nullcontext()
        with sync:
            with autocast(run["device"], run["dtype"]):
                _, loss = model(x, y, m)
            scaler.scale(loss * weight).backward()
        loss_sum += loss.detach() * weight
    if cfg["grad_clip"] > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


@torch.no_grad()
def evaluate(model, data, cfg, run):
    """Token-weighted mean loss per split over eval_iters batches. The batches are the same at every eval (a fixed
    seed), so evaluations compare like with like; every DDP rank takes part and the result is all-reduced."""
    model.eval()
    losses = {}
    for i, (split, split_data) in enumerate(data.items()):
        generator = torch.Generator().manual_seed(cfg["seed"] + 7919 * run["rank"] + i)
        total = torch.zeros(2, device=run["device"])
        for _ in range(cfg["eval_iters"]):
            x, y, m = to_device(split_data.get_batch(cfg["batch_size"], cfg["block_size"], generator), run["device"])
            with autocast(run["device"], run["dtype"]):
                _, loss = model(x, y, m)
            total += torch.stack([loss.float() * m.sum(), m.sum()])
        if run["ddp"]:
            dist.all_reduce(total)
        losses[split] = (total[0] / total[1].clamp(min=1)).item()
    model.train()
    return losses


def sample_reply(model, prompt, meta, run, max_tokens):
    from sample import generate_replies  # sample.py imports nothing from train.py
    model.eval()
    with autocast(run["device"], run["dtype"]):
        reply = generate_replies(model, prompt, max_tokens, temperature=0.0, stop=[meta["default_stop"]],
                                 device=run["device"])[0]
    model.train()
    return reply


def checkpoint(raw_model, optimizer, scaler, state, cfg, meta, with_optimizer):
    """Everything as plain Python values or tensors: loads with torch.load(weights_only=True)."""
    ckpt = {
        "model": raw_model.state_dict(),  # the uncompiled, unwrapped module: no _orig_mod. / module. prefixes
        "model_args": asdict(raw_model.config),
        "template": meta["template"], "tokenizer": meta["tokenizer"],
        "default_stop": meta["default_stop"], "multiline_replies": meta["multiline_replies"],
        "config": dict(cfg), **state,
        "rng": {"torch": torch.get_rng_state(), "data": state["data_rng"]},
    }
    del ckpt["data_rng"]
    if torch.cuda.is_available():
        ckpt["rng"]["cuda"] = torch.cuda.get_rng_state()
    if with_optimizer:
        ckpt["optimizer"], ckpt["scaler"] = optimizer.state_dict(), scaler.state_dict()
    return ckpt


class Logger:
    """Console lines, out_dir/metrics.jsonl and (optionally) wandb; only the master process logs."""

    def __init__(self, cfg, run, resumed):
        self.enabled, self.wandb = run["master"], None
        self.path = os.path.join(cfg["out_dir"], "metrics.jsonl")
        if self.enabled and not resumed and os.path.exists(self.path):
            os.remove(self.path)  # a new run starts a new log; a resumed one appends
        if self.enabled and cfg["wandb_log"]:
            import wandb
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None, config=cfg,
                                    mode=cfg["wandb_mode"] or None)

    def log(self, record, line=None):
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("event", "iter")}, step=record["iter"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(out_dir):
    """Loss curves from metrics.jsonl as loss.png (skipped quietly when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval"]
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], alpha=0.4, label="train (per log step)")
    for split in ("train", "val"):
        ax.plot([r["iter"] for r in evals], [r[f"{split}_loss"] for r in evals], marker="o", label=f"{split} (eval)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss on assistant tokens")
    ax.legend()
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The loop


def unused_stamp(out_dir):
    """The run's start time, YYYYMMDD_HHMMSS; a run started in the same second as another gets the next second."""
    t = time.time()
    while os.path.exists(os.path.join(out_dir, f"finetuned_{time.strftime('%Y%m%d_%H%M%S', time.localtime(t))}_last.pt")):
        t += 1
    return time.strftime("%Y%m%d_%H%M%S", time.localtime(t))


class Trainer:
    """Holds the run's state so the loop, evaluation and checkpointing read as separate small steps."""

    def __init__(self, cfg, run, resume_from, explicit=()):
        self.cfg, self.run = cfg, run
        self.data, self.meta = load_dataset(cfg["dataset"])
        ckpt = load_checkpoint(resume_from, run["device"]) if resume_from else None
        torch.manual_seed(cfg["seed"] + run["rank"])
        self.raw_model = build_model(cfg, ckpt, run, explicit)
        self.optimizer = self.raw_model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                                             (cfg["beta1"], cfg["beta2"]), run["device"].split(":")[0])
        self.scaler = torch.amp.GradScaler(run["device"].split(":")[0],
                                           enabled=run["dtype"] == "float16" and run["device"].startswith("cuda"))
        self.data_rng = torch.Generator().manual_seed(cfg["seed"] + run["rank"])
        self.stopper = EarlyStopping(cfg["patience"], cfg["min_delta"])
        self.iter_num, self.losses = 0, {}
        self.stamp = unused_stamp(cfg["out_dir"])
        if ckpt is not None:
            self._restore(ckpt)
        model = torch.compile(self.raw_model) if resolve_compile(cfg["compile"], run["device"]) else self.raw_model
        self.model = DDP(model, device_ids=[run["device"]] if run["device"].startswith("cuda") else None) \
            if run["ddp"] else model
        self.best_path = os.path.join(cfg["out_dir"], f"finetuned_{self.stamp}.pt")
        self.last_path = os.path.join(cfg["out_dir"], f"finetuned_{self.stamp}_last.pt")
        self.logger = Logger(cfg, run, resumed=ckpt is not None)
        self.tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"] * run["world"]
        # MFU: nanoGPT's 6N + 12LHQT FLOPs per token (less the head's share on masked tokens, see _mfu) against a
        # GPU's data-sheet peak for the training dtype, else this device's matmul peak measured now (~0.5 s): never
        # a hard-coded A100
        self.flops_per_token = self.raw_model.flops_per_token(cfg["block_size"])
        self.peak_flops, self.peak_source = peak_flops(run["device"], run["dtype"]) if run["master"] else (0, "")

    def _restore(self, ckpt):
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iter_num, self.stamp, self.losses = ckpt["iter_num"], ckpt["run"], ckpt["losses"]
        # the saved progress (best, reference, stale) with this run's settings: a --patience/--min_delta given on
        # resume wins, like every other override
        self.stopper = EarlyStopping(**{**ckpt["early_stopping"], "patience": self.cfg["patience"],
                                        "min_delta": self.cfg["min_delta"]})
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        self.data_rng.set_state(ckpt["rng"]["data"].cpu())
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())

    def save(self, path, with_optimizer):
        state = {"iter_num": self.iter_num, "run": self.stamp, "losses": self.losses,
                 "train_loss": self.losses.get("train"), "val_loss": self.losses.get("val"),
                 "best_val_loss": self.stopper.best, "early_stopping": asdict(self.stopper),
                 "data_rng": self.data_rng.get_state()}
        save_checkpoint(path, checkpoint(self.raw_model, self.optimizer, self.scaler, state, self.cfg, self.meta,
                                         with_optimizer))

    def eval_and_checkpoint(self):
        """Evaluate, keep the best model, save the latest state. Returns True when early stopping fires."""
        self.losses = evaluate(self.model, self.data, self.cfg, self.run)
        is_best, stop = self.stopper.update(self.losses["val"])
        if self.run["master"]:
            if is_best:
                self.save(self.best_path, with_optimizer=False)
            self.save(self.last_path, with_optimizer=True)
        line = (f"eval iter {self.iter_num}: train loss {self.losses['train']:.4f}, val loss {self.losses['val']:.4f}"
                f" (best {self.stopper.best:.4f}{', saved' if is_best else ''}; {self.stopper.stale}/"
                f"{self.cfg['patience']} evals without improvement >= {self.cfg['min_delta']})")
        self.logger.log({"event": "eval", "iter": self.iter_num, "train_loss": self.losses["train"],
                         "val_loss": self.losses["val"], "best_val_loss": self.stopper.best}, line)
        if self.run["master"] and self.cfg["sample_max_tokens"] > 0:
            prompt = self.data["val"].first_prompt()
            reply = sample_reply(self.raw_model, prompt, self.meta, self.run, self.cfg["sample_max_tokens"])
            print(f"  sample: {chat.get_encoder().decode(prompt)!r} -> {reply!r}", flush=True)
        return stop

    def train(self):
        cfg, run = self.cfg, self.run
        interrupted = {"signal": None}

        def on_signal(signum, frame):  # finish the current step, save, exit; a second signal exits at once
            if interrupted["signal"] is not None:
                raise KeyboardInterrupt
            interrupted["signal"] = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        start_iter, reason = self.iter_num, f"reached max_iters={cfg['max_iters']}"
        t_start = time.time()
        self._start_window()
        while self.iter_num < cfg["max_iters"]:
            if self.iter_num % cfg["eval_interval"] == 0 and self.iter_num != start_iter or self.iter_num == 0:
                if self.eval_and_checkpoint():
                    reason = f"early stopping: {cfg['patience']} evals without a val improvement >= {cfg['min_delta']}"
                    break
                self._start_window()  # the log's ms/iter and MFU count train steps, not evals
            lr = get_lr(self.iter_num, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(self.model, self.optimizer, self.scaler, self.data["train"], self.data_rng, cfg, run,
                              stats=self.window)
            self.iter_num += 1
            if self.iter_num % cfg["log_interval"] == 0 or self.iter_num == cfg["max_iters"]:
                self._log_step(loss.item(), lr)  # the only host sync outside evals (before the clock: GPU time counts)
                self._start_window()
            if interrupted["signal"] is not None:
                reason = f"interrupted by signal {interrupted['signal']}"
                break
        else:  # max_iters reached: evaluate and save the steps since the last eval
            if self.iter_num != start_iter:
                self.eval_and_checkpoint()
        if reason.startswith("interrupted") and run["master"]:
            self.save(self.last_path, with_optimizer=True)
        return reason, time.time() - t_start

    def _start_window(self):
        self.window_t0, self.window_iter, self.window = time.time(), self.iter_num, {"learned_tokens": 0.0}

    def _mfu(self, dt, learned_per_iter):
        """FLOPs computed per second over the peak. Off CUDA the LM head (6 * vocab * n_embd FLOPs per token) runs
        only on learned tokens (GPT._masked_loss), so only those count: on chat data nanoGPT's formula, which counts
        the head on every token, would overstate the work done (and could pass 100%)."""
        if not self.peak_flops:
            return 0.0
        head = 6 * self.raw_model.config.vocab_size * self.raw_model.config.n_embd
        rows = self.tokens_per_iter if self.run["device"].startswith("cuda") else learned_per_iter * self.run["world"]
        flops = self.tokens_per_iter * (self.flops_per_token - head) + rows * head
        return flops / dt / (self.peak_flops * self.run["world"])

    def _log_step(self, loss, lr):
        iters = self.iter_num - self.window_iter
        dt = (time.time() - self.window_t0) / iters
        remaining = (self.cfg["max_iters"] - self.iter_num) * dt
        mfu = self._mfu(dt, self.window["learned_tokens"] / iters)
        line = (f"iter {self.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                f"{self.tokens_per_iter / dt:,.0f} tokens/s, MFU {mfu:.1%}, ETA {remaining / 60:.1f} min")
        self.logger.log({"event": "step", "iter": self.iter_num, "loss": loss, "lr": lr, "ms_per_iter": dt * 1000,
                         "tokens_per_s": self.tokens_per_iter / dt, "mfu": mfu}, line)


def main(argv=None):
    cfg, resume_from, explicit = resolve_config(sys.argv[1:] if argv is None else argv)
    run = setup_processes(cfg)
    if run["master"]:
        os.makedirs(cfg["out_dir"], exist_ok=True)
    try:
        trainer = Trainer(cfg, run, resume_from, explicit)
        n_params = trainer.raw_model.get_num_params()
        if run["master"]:
            print(f"{n_params / 1e6:.2f}M parameters, device {run['device']}, dtype {run['dtype']}, "
                  f"{run['world']} process(es), {trainer.tokens_per_iter:,} tokens/iter, run {trainer.stamp}")
            print(f"MFU is against the {trainer.peak_source} {run['dtype']} matmul peak of {run['device']}: "
                  f"{trainer.peak_flops / 1e9:,.0f} GFLOP/s")
        reason, seconds = trainer.train()
        if run["master"]:
            print(f"stopped: {reason} after {trainer.iter_num} iters in {seconds / 60:.1f} min; best val loss "
                  f"{trainer.stopper.best:.4f}")
            print(f"best model: {trainer.best_path}\nlatest state: {trainer.last_path}")
            plot = plot_losses(cfg["out_dir"])
            if plot:
                print(f"loss curve: {plot}")
        trainer.logger.close()
        if run["ddp"]:
            # gloo's worker thread may still be releasing the last eval all_reduce's tensor, which needs the GIL;
            # tearing the group down (which joins that thread while holding the GIL) could then hang a rank
            dist.barrier()
    finally:
        if run["ddp"]:
            dist.destroy_process_group()


if __name__ == "__main__":
    configurator.run(main)
