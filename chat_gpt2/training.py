"""The pieces of a training run that train.py, its objectives and bench.py share: the learning-rate schedule,
early stopping, the forward and backward pass over accumulated micro-batches, the clipped optimizer step, the FLOPs
of a step, and sums over fixed evaluation batches."""
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


def masked_loss(model, batch):
    """The mean loss over the positions a batch (x, y, m) marks in m: a language model's learned next tokens, or a
    classifier's one label per row (the model reads it where m is 1)."""
    x, y, m = batch
    return model(x, y, m)[1]


def learned(batch):
    """How many positions the loss of (x, y, m) averages over, counted on the host (no device sync): the weight of
    a micro-batch in its step's mean."""
    return float(batch[2].sum())


def forward_backward(model, scaler, batches, run, loss_of=masked_loss, weight_of=learned):
    """Gradients of the weighted mean loss over the micro-batches (CPU tensors), each weighted by weight_of (the
    learned tokens by default: the token-weighted mean, not the mean of the micro-batches' means). Under DDP the
    gradients are all-reduced only on the last micro-batch. Returns the loss, on the device (no sync)."""
    weights = [weight_of(batch) for batch in batches]
    total = max(1.0, sum(weights))
    loss_sum = torch.zeros((), device=run["device"])
    for micro, (batch, weight) in enumerate(zip(batches, weights)):
        weight /= total
        batch = to_device(batch, run["device"])
        sync = model.no_sync() if run["ddp"] and micro < len(batches) - 1 else nullcontext()
        with sync:
            with autocast(run["device"], run["dtype"]):
                loss = loss_of(model, batch)
            scaler.scale(loss * weight).backward()
        loss_sum += loss.detach() * weight
    return loss_sum


def clip_and_step(model, optimizer, scaler, grad_clip):
    """Clip the gradient's global norm to grad_clip (0 = off), step the optimizer, clear the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_step(model, optimizer, scaler, data, generator, cfg, run):
    """One language-model step over gradient_accumulation_steps micro-batches of data, as train.py's loop takes
    it (bench.py measures this). Returns the token-weighted mean loss, on the device."""
    batches = [data.get_batch(cfg["batch_size"], cfg["block_size"], generator)
               for _ in range(cfg["gradient_accumulation_steps"])]
    loss = forward_backward(model, scaler, batches, run)
    clip_and_step(model, optimizer, scaler, cfg["grad_clip"])
    return loss


def step_flops(model, batches, head_on_all):
    """(tokens, training FLOPs) of a step over these batches (model: the unwrapped GPT): every position of the
    batches runs the body (a classifier's batches end at their longest example), the output head runs on every
    position (head_on_all) or only on the learned ones."""
    tokens = sum(x.numel() for x, _, _ in batches)
    context = sum(x.numel() * x.size(1) for x, _, _ in batches)  # each position's sequence length, summed
    head_tokens = tokens if head_on_all else sum(learned(batch) for batch in batches)
    return tokens, model.train_flops(tokens, context / max(1, tokens), head_tokens)


@torch.no_grad()
def eval_totals(model, data, cfg, run, sums):
    """{split: sums(model, batch) added up over eval_iters batches} for train and val. The batches are the same at
    every eval (a fixed seed), so evaluations compare like with like; every DDP rank takes part and the totals
    are all-reduced."""
    model.eval()
    totals = {}
    for i, split in enumerate(("train", "val")):
        generator = torch.Generator().manual_seed(cfg["seed"] + 7919 * run["rank"] + i)
        total = 0
        for _ in range(cfg["eval_iters"]):
            batch = data[split].get_batch(cfg["batch_size"], cfg["block_size"], generator)
            with autocast(run["device"], run["dtype"]):
                total = total + sums(model, to_device(batch, run["device"]))
        if run["ddp"]:
            dist.all_reduce(total)
        totals[split] = total
    model.train()
    return totals


def loss_sums(model, batch):
    """(loss x learned tokens, learned tokens) of one batch, for eval_totals: a token-weighted mean in the end."""
    _, _, m = batch
    return torch.stack([masked_loss(model, batch).float() * m.sum(), m.sum()])
