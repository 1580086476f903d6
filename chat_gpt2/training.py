"""The pieces of a training run that train.py and bench.py share: the learning-rate schedule, early stopping,
one optimizer step over accumulated micro-batches, and the evaluation of the loss on each split."""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .device import autocast

DEFAULT_GRAD_CLIP = 1.0  # clip the gradient's global norm to this (0 = off); train.py's default, bench.py's too


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


def to_device(batch, device):
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return [t.pin_memory().to(device, non_blocking=True) for t in batch]
    return [t.to(device) for t in batch]


def train_step(model, optimizer, scaler, data, generator, cfg, run, stats=None):
    """One optimizer step over gradient_accumulation_steps micro-batches. The loss is the token-weighted mean over
    the learned tokens of all micro-batches (not the last micro-batch's); it stays on the device (no sync).
    stats: a dict whose counts (for the log's FLOP count) are increased by this step's: "learned_tokens", "tokens"
    (the batches' positions: a classifier's batches are as long as their longest example) and "context" (the sum
    of each position's sequence length)."""
    steps = cfg["gradient_accumulation_steps"]
    batches = [data.get_batch(cfg["batch_size"], cfg["block_size"], generator) for _ in range(steps)]
    learned = float(sum(m.sum() for _, _, m in batches))  # counted on the host: no device sync
    total = max(1.0, learned)
    if stats is not None:
        for key, n in (("learned_tokens", learned), ("tokens", sum(x.numel() for x, _, _ in batches)),
                       ("context", sum(x.numel() * x.size(1) for x, _, _ in batches))):
            stats[key] = stats.get(key, 0) + n
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

