"""The pieces of a training run: the model to train (init_from, LoRA, frozen layers), the
learning-rate schedule, early stopping, the forward and backward pass over accumulated
micro-batches, the clipped optimizer step, a step's FLOPs and the sums over fixed evaluation
batches (train.py and its objectives; bench.py measures train_step)."""
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import chat
from .checkpoint import SHAPE_KEYS, describe_base, init_checkpoint, model_from_checkpoint
from .device import autocast
from .errors import ConfigError, DivergedError
from .hf_gpt2 import from_pretrained, pretrained_config, resolve_pretrained
from .lora import apply_lora, freeze_layers, lora_settings, train_rows
from .memory import check_memory, count_trainable
from .tokenizer import check_same, padded_vocab
from model import GPT, GPTConfig

DEFAULT_GRAD_CLIP = 1.0  # clip the gradient's global norm to this (0 = off): train.py's, bench.py's


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
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg["min_lr"] + coeff * (cfg["learning_rate"] - cfg["min_lr"])


@dataclass
class EarlyStopping:
    """Counts evaluations without a val improvement of at least min_delta over the best so far."""
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


# --------------------------------------------------------------------------------------------------
# The model to train


def build_model(cfg, ckpt, sys_info, explicit=(), meta=None):
    """The model to train, on the device: resumed from ckpt, or the base named by init_from; then
    the rows of the dataset's new special tokens (meta: its meta.json; add_special_tokens); then
    LoRA adapters (lora_rank > 0, the base frozen) or the trainable_layers freeze, under which the
    new rows alone of the embedding train. explicit: see _base_model. The dataset's tokenizer is a
    scratch model's vocabulary; any other model's must match it."""
    meta = meta or {}
    tokenizer = meta.get("tokenizer") or chat.TOKENIZER
    if ckpt is not None:  # a LoRA run comes back with its adapters apart, trainable (merge=False)
        check_same(tokenizer, ckpt.get("tokenizer"), f"the dataset {cfg['dataset']} is tokenized "
                   "with {ours}, but the run being resumed was trained with {theirs}")
        model = model_from_checkpoint(ckpt, _build_device(sys_info), merge=False,
                                      dropout=cfg["dropout"])
    else:
        model = _base_model(cfg, sys_info, explicit, meta)
    if cfg["block_size"] < model.config.block_size:
        model.crop_block_size(cfg["block_size"])
    elif cfg["block_size"] > model.config.block_size:
        raise ConfigError(f"block_size {cfg['block_size']} exceeds the model's "
                          f"{model.config.block_size}")
    lora = lora_settings(cfg)
    if ckpt is not None and ckpt.get("lora") != lora:
        raise ConfigError(f"the run being resumed was trained with LoRA settings {ckpt.get('lora')}"
                          f", not {lora}: the lora_* keys cannot change on resume")
    if lora and ckpt is None:
        # the base as trained on (cropped): a LoRA checkpoint stores how to rebuild it, no weights
        model.lora_base = describe_base(model, cfg["init_from"], cfg["seed"])
    rows = add_special_tokens(model, meta, cfg["init_from"] == "scratch", ckpt is not None)
    if ckpt is not None:
        rows = ckpt.get("trained_rows", [])
    if lora and ckpt is None:
        apply_lora(model, lora)
    freeze_layers(model, cfg["trainable_layers"])  # after the crop, which makes a new wpe Parameter
    if rows and (lora or cfg["trainable_layers"] != -1) and not getattr(model, "trained_rows", 0):
        if sys_info.get("fsdp"):  # a sharded wte: the hook's row mask would not fit its shards
            raise ConfigError("--parallel=fsdp cannot train the rows of new special tokens alone "
                              "(--trainable_layers): use --parallel=ddp")
        train_rows(model, rows)
    model.grad_checkpointing = cfg["grad_checkpointing"]
    return model.to(sys_info["device"]) if not sys_info.get("fsdp") else model


def _build_device(sys_info):
    """Where a model is built before it moves to the device: the CPU, or under FSDP where
    parallel.shard_model builds it (the CPU on rank 0, the meta device elsewhere: None keeps it
    there), which places the shards."""
    return None if sys_info.get("fsdp") else "cpu"


def add_special_tokens(model, meta, scratch, resumed=False):
    """Give model rows for the special tokens of the dataset (meta.json's, {marker: id}) it has none
    for: a pretrained or fine-tuned base's new rows start from the mean of its real tokens' rows
    (GPT.init_token_rows: the vocabulary grows when they do not fit); a scratch model keeps its
    random ones. Sets model.special_tokens; returns the new ids. A marker whose id differs from
    the model's, or new ones on resume, are a ConfigError."""
    ids, have = meta.get("special_tokens") or {}, dict(getattr(model, "special_tokens", {}) or {})
    clash = [f"{m} is {i} in the data, {have[m]} in the model" for m, i in ids.items()
             if m in have and have[m] != i]
    new = sorted(i for m, i in ids.items() if m not in have)
    if clash or (new and resumed):
        raise ConfigError(f"the dataset's special tokens do not match the model's: "
                          f"{'; '.join(clash) or f'new ones {new} on resume'}")
    if new and (not scratch or max(new) >= model.config.vocab_size):
        # the real rows: the tokenizer's own (GPT-2's or a trained one's), before any marker
        real = chat.get_encoder(meta.get("tokenizer") or chat.TOKENIZER).n_vocab
        model.init_token_rows(new, real)
    model.special_tokens = {**have, **ids}
    return new


def _base_model(cfg, sys_info, explicit, meta):
    """explicit: the keys the command line / config files set; for a pretrained init_from, an
    explicit n_layer, n_head, n_embd or bias that differs from the checkpoint's is refused (the
    defaults are for scratch models). A scratch model's vocabulary is the tokenizer's, padded
    (padded_vocab: GPT-2's 50257 -> 50304); pretrained weights must have read the same tokenizer."""
    data = f"the dataset {cfg['dataset']} is tokenized with {{ours}}"
    tokenizer = meta.get("tokenizer") or chat.TOKENIZER
    if cfg["init_from"] == "scratch":  # its rows: the tokenizer's and the template's special tokens
        n_vocab = chat.run_encoder(meta).n_vocab
        config = GPTConfig(**{k: cfg[k] for k in ("block_size", "n_layer", "n_head", "n_embd",
                                                   "dropout", "bias")},
                           vocab_size=padded_vocab(n_vocab))
        check_memory(config, cfg, sys_info, count_trainable(config, cfg))
        return GPT(config)
    if cfg["init_from"] == "resume":
        raise ConfigError("init_from='resume' needs a checkpoint")
    init = init_checkpoint(cfg["init_from"], {k: cfg[k] for k in SHAPE_KEYS if k in explicit})
    if init is not None:  # one of our checkpoints (pretrained on text, a full fine-tune): a new run
        check_same(tokenizer, init.get("tokenizer"),
                   f"{data}, but --init_from={cfg['init_from']} was trained with {{theirs}}")
        config = GPTConfig.from_dict({**init["model_args"], "dropout": cfg["dropout"]})
        check_memory(config, cfg, sys_info, count_trainable(config, cfg))
        if sys_info.get("master", True):
            print(f"starting a new run (fresh optimizer, iter 0) from {init['path']} "
                  f"(iter {init.get('iter_num')})")
        model = model_from_checkpoint(init, _build_device(sys_info), dropout=cfg["dropout"])
        cfg["init_from"] = os.path.abspath(init["path"])  # what a LoRA checkpoint rebuilds from
    else:  # 'gpt2' .. 'gpt2-xl', a Hub repo id or a local Hugging Face directory
        check_same(tokenizer, chat.TOKENIZER,
                   f"{data}, but --init_from={cfg['init_from']} (GPT-2 weights) reads {{theirs}}")
        files = resolve_pretrained(cfg["init_from"])
        shape = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "bias") if k in explicit}
        overrides = {"dropout": cfg["dropout"], "block_size": cfg["block_size"], **shape}
        config = pretrained_config(files, overrides)
        check_memory(config, cfg, sys_info, count_trainable(config, cfg))
        if sys_info.get("master", True):
            print(f"loading {files.source}: n_layer={config.n_layer}, n_head={config.n_head}, "
                  f"n_embd={config.n_embd}, block_size={config.block_size}")
        model = from_pretrained(files, overrides)
    # the run's shape, saved with its config
    cfg.update(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, bias=config.bias)
    return model


def describe_training(cfg):
    """What trains, for the start line: "" (everything), LoRA's settings or the last blocks."""
    lora = lora_settings(cfg)
    if lora:
        targets = ",".join(lora["targets"])
        return f" (LoRA rank {lora['rank']}, alpha {lora['alpha']:g} on {targets})"
    layers = cfg["trainable_layers"]
    return "" if layers == -1 else f" (the last {layers} blocks + ln_f)"


# --------------------------------------------------------------------------------------------------
# One step


def to_device(batch, device):
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return [t.pin_memory().to(device, non_blocking=True) for t in batch]
    return [t.to(device) for t in batch]


def masked_loss(model, batch):
    """The mean loss over the positions a batch (x, y, m) marks in m: a language model's learned
    next tokens, or a classifier's one label per row (the model reads it where m is 1)."""
    x, y, m = batch
    return model(x, y, m)[1]


def learned(batch):
    """How many positions the loss of (x, y, m) averages over, counted on the host (no device
    sync): the weight of a micro-batch in its step's mean."""
    return float(batch[2].sum())


def forward_backward(model, scaler, batches, run, loss_of=masked_loss, weight_of=learned):
    """Gradients of the weighted mean loss over the micro-batches (CPU tensors), each weighted by
    weight_of: by default the learned tokens, the token-weighted mean (not the mean of the
    micro-batches' means). Across ranks the gradients are reduced on the last micro-batch only.
    Returns the loss, on the device (no sync)."""
    weights = [weight_of(batch) for batch in batches]
    total = max(1.0, sum(weights))
    loss_sum = torch.zeros((), device=run["device"])
    for micro, (batch, weight) in enumerate(zip(batches, weights)):
        weight /= total
        batch = to_device(batch, run["device"])
        with gradient_sync(model, last=micro == len(batches) - 1):
            with autocast(run["device"], run["dtype"]):
                loss = loss_of(model, batch)
            scaler.scale(loss * weight).backward()
        loss_sum += loss.detach() * weight
    return loss_sum


def gradient_sync(model, last):
    """The context of a micro-batch's backward: gradients reduced across the ranks on the last one
    only (DDP's no_sync, FSDP's set_requires_gradient_sync; under torch.compile the module inside);
    one process: nothing to do."""
    if hasattr(model, "no_sync"):
        return nullcontext() if last else model.no_sync()
    sharded = getattr(model, "_orig_mod", model)
    if hasattr(sharded, "set_requires_gradient_sync"):
        sharded.set_requires_gradient_sync(last)
    return nullcontext()


def clip_and_step(model, optimizer, scaler, grad_clip):
    """Clip the gradient's global norm to grad_clip (0 = off), step, clear the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_step(model, optimizer, scaler, data, generator, cfg, run):
    """One language-model step over gradient_accumulation_steps micro-batches of data, as train.py's
    loop takes it (bench.py measures this). Returns the token-weighted mean loss, on the device."""
    batches = [data.get_batch(cfg["batch_size"], cfg["block_size"], generator)
               for _ in range(cfg["gradient_accumulation_steps"])]
    loss = forward_backward(model, scaler, batches, run)
    clip_and_step(model, optimizer, scaler, cfg["grad_clip"])
    return loss


def step_flops(model, batches, head_on_all):
    """(tokens, training FLOPs) of a step over these batches (model: the unwrapped GPT): every
    position runs the body (a classifier's batches end at their longest example), the output head
    runs on every position (head_on_all) or on the learned ones only."""
    tokens = sum(x.numel() for x, _, _ in batches)
    context = sum(x.numel() * x.size(1) for x, _, _ in batches)  # each position's sequence length
    head_tokens = tokens if head_on_all else sum(learned(batch) for batch in batches)
    return tokens, model.train_flops(tokens, context / max(1, tokens), head_tokens)


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_totals(model, data, cfg, run, sums):
    """{split: sums(model, batch) added up over eval_iters batches} for train and val. The batches
    are the same at every eval (a fixed seed), so evaluations compare like with like; every DDP rank
    takes part and the totals are all-reduced."""
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
    """(loss x learned tokens, learned tokens) of one batch, for eval_totals: their ratio in the
    end is the token-weighted mean loss."""
    _, _, m = batch
    return torch.stack([masked_loss(model, batch).float() * m.sum(), m.sum()])


def check_finite(value, what, iter_num, cfg, dtype, last_path):
    """Stop a diverged run at once, before anything is saved from it, saying what to try."""
    if math.isfinite(value):
        return
    last = f"; the last good state is {last_path}" if os.path.exists(last_path) else ""
    raise DivergedError(f"non-finite {what} ({value}) at iteration {iter_num}: the run "
                        f"diverged and was stopped; nothing was saved from it{last}. Try a "
                        f"lower --learning_rate (now {cfg['learning_rate']:g}), --grad_clip=1.0"
                        f" (now {cfg['grad_clip']:g}) or --dtype=float32 (now {dtype})")
