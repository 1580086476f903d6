"""Train or fine-tune a GPT on a dataset prepared by prepare.py: chat, plain text or labelled text.

    python train.py config/finetune_chat.py --batch_size=4    # single process
    torchrun --standalone --nproc_per_node=2 train.py config/demo.py  # DDP (gloo on CPU, nccl GPU)
    torchrun --standalone --nproc_per_node=2 train.py config/demo.py --parallel=fsdp  # sharded

Config keys and their meaning follow nanoGPT; `python train.py --help` lists them with defaults.
"""
import gc
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

import configurator
from chat_gpt2.checkpoint import (CKPT_PATTERN, checkpoint_path, find_checkpoint, load_checkpoint,
                                  save_checkpoint, training_checkpoint, unused_stamp)
from chat_gpt2.classify_data import load_prepared
from chat_gpt2.device import (peak_flops, resolve_compile, resolve_device, resolve_dtype,
                              tune_cpu_allocator)
from chat_gpt2.errors import CheckpointError, ConfigError, MissingFileError
from chat_gpt2.files import remove_dead_leftovers
from chat_gpt2.lora import lora_settings
from chat_gpt2.objectives import objective_for
from chat_gpt2.parallel import (agreed_signal, check_parallel, gathered_state, load_optimizer_state,
                                local_part, replicate, rng_of_ranks, shard_model)
from chat_gpt2.run_log import Logger, Window, plot_accuracy, plot_losses, start_lines
from chat_gpt2.training import (DEFAULT_GRAD_CLIP, EarlyStopping, build_model, check_finite,
                                clip_and_step, forward_backward, get_lr)

# one key a line, its meaning beside (or above) it: `python train.py --help` prints these comments
DEFAULTS = dict(
    # I/O
    out_dir="out",  # where checkpoints, metrics.jsonl and loss.png go
    eval_interval=50,  # evaluate (and save) every this many iterations
    log_interval=10,  # print a training line every this many iterations
    eval_iters=20,  # batches per split in each evaluation
    # a .jsonl in HellaSwag's layout scored at evals as eval.py --choices does ("" = none)
    eval_choices="",
    eval_choices_every=1,  # score eval_choices at the first eval and every this many evals after
    # scratch, resume, gpt2..gpt2-xl, a HF repo id or dir, or our .pt / a run's out_dir
    init_from="scratch",
    dataset="chat",  # a folder under data/ or a path to a folder written by prepare.py
    # data
    gradient_accumulation_steps=1,  # micro-batches per optimizer step
    batch_size=2,  # sequences per micro-batch
    block_size=128,  # tokens per sequence (the context); may be smaller than a pretrained model's
    # model (used when training from scratch; a pretrained model's shape comes with its weights)
    n_layer=12,  # transformer blocks
    n_head=12,  # attention heads per block
    n_embd=768,  # width of the residual stream
    dropout=0.1,  # dropout probability while training (0 = none)
    bias=True,  # biases in Linear and LayerNorm layers, as GPT-2
    # AdamW and the learning-rate schedule
    learning_rate=3e-4,  # peak learning rate, after warmup
    max_iters=1000,  # optimizer steps in all
    weight_decay=0.1,  # AdamW weight decay on matrices and embeddings
    beta1=0.9,  # AdamW beta1
    beta2=0.95,  # AdamW beta2
    grad_clip=DEFAULT_GRAD_CLIP,  # clip the gradient's global norm to this (0 = off)
    decay_lr=True,  # warmup then cosine decay to min_lr; False = constant learning_rate
    warmup_iters=100,  # linear warmup steps
    lr_decay_iters=None,  # where the cosine reaches min_lr; None = max_iters
    min_lr=3e-5,  # the learning rate at the end of the decay
    # > 0: max_iters = ceil(epochs * train tokens / tokens per iter); beats a config's max_iters
    epochs=0.0,
    # what trains (docs/training.md)
    trainable_layers=-1,  # train only the last N blocks + ln_f (-1 = everything)
    lora_rank=0,  # LoRA adapters of this rank, the base frozen (0 = off)
    lora_alpha=0.0,  # LoRA scale numerator: updates are scaled by lora_alpha / lora_rank (0 = rank)
    lora_dropout=0.0,  # dropout on the LoRA adapters' input
    # the Linear layers of each block that get adapters
    lora_targets="attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj",
    # recompute each block's activations in backward: much less memory, ~1/3 more compute
    grad_checkpointing=False,
    # preference pairs (a dataset prepared with --task=preference; docs/training.md)
    preference_loss="",  # dpo or simpo ("" = none: SFT; config/dpo.py sets dpo)
    beta=0.1,  # DPO: how far from the reference the rewards pull (SimPO: the reward scale, ~2)
    simpo_gamma=0.5,  # SimPO: the margin the chosen reward must beat the rejected one by
    precompute_ref=False,  # DPO: the reference's log-probabilities once, before training
    sft_weight=0.0,  # DPO / SimPO: plus this x the mean NLL of the chosen tokens (TRL's rpo_alpha)
    # early stopping
    patience=5,  # stop after this many evals without a val improvement >= min_delta (0 = never)
    min_delta=0.001,  # the smallest val-loss drop that counts as an improvement
    # system
    backend="auto",  # DDP backend: auto = nccl on CUDA, gloo elsewhere
    # under torchrun: ddp = a replica per rank; fsdp = weights, gradients and AdamW state sharded
    parallel="ddp",
    device="auto",  # auto, cpu, cuda, cuda:N or mps
    dtype="auto",  # auto (bf16 where the device has it), float32, bfloat16 or float16
    seed=1337,  # seed of the weights' init, the batches and dropout
    compile=None,  # torch.compile: True / False; None = on for CUDA, off on CPU and MPS
    check_memory=True,  # refuse to start a run whose memory estimate exceeds the free memory
    # logging
    wandb_log=False,  # also log to Weights & Biases
    wandb_project="chat-gpt",  # the wandb project
    wandb_run_name="",  # the wandb run's name ("" = wandb's)
    wandb_mode="",  # online / offline ("" = $WANDB_MODE or online)
    sample_max_tokens=32,  # length of the sample reply printed at each eval (0 = none)
)

# where and how a process runs: on resume, from its own command line rather than the saved config
HERE_KEYS = ("out_dir", "device", "backend", "check_memory")


# --------------------------------------------------------------------------------------------------
# Setup: config and processes


def resolve_config(argv):
    """Defaults <- config files and flags; on resume, the saved config <- this command line."""
    cfg, explicit = configurator.load(DEFAULTS, argv, prog="train.py")
    resume_from = None
    if cfg["init_from"] == "resume":
        try:
            resume_from = find_checkpoint(cfg["out_dir"], last=True)
        except MissingFileError:
            raise MissingFileError(f"no run to resume in {cfg['out_dir']!r} (no "
                                   f"finetuned_*_last.pt): pass the run's folder as --out_dir=..., "
                                   f"or start one with --init_from=scratch or gpt2") from None
        saved = load_checkpoint(resume_from, mmap=True).get("config", {})  # no tensor read
        saved = configurator.check_saved(DEFAULTS, saved,
                                         f"the config saved in {resume_from}")
        here = {k: cfg[k] for k in HERE_KEYS}  # where and how this process runs, not the saved run
        overrides = {k: v for k, v in explicit.items() if k != "init_from" and saved.get(k) != v}
        cfg = {**DEFAULTS, **saved, **here, **overrides, "init_from": "resume"}
        print(f"resuming {resume_from}" + (f" with overrides {overrides}" if overrides else ""))
    for key in ("eval_interval", "eval_iters", "log_interval"):
        if cfg[key] < 1:
            raise ConfigError(f"--{key} must be >= 1, got {cfg[key]}")
    resolve_epochs(cfg, argv, explicit)
    lora_settings(cfg)  # bad LoRA / trainable_layers values: refused before any data is read
    return cfg, resume_from, explicit


def resolve_epochs(cfg, argv, explicit):
    """epochs vs max_iters: the command line beats config files (and a resumed run's saved values);
    both on the command line, or both in config files and neither on the command line: refused."""
    flags = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    if cfg["epochs"] < 0:
        raise ConfigError(f"--epochs must be >= 0 (0 = use max_iters), got {cfg['epochs']}")
    if {"epochs", "max_iters"} <= flags:
        raise ConfigError("--epochs and --max_iters were both given: pass one (epochs sets "
                          "max_iters)")
    if "max_iters" in flags:
        cfg["epochs"] = 0.0
    elif "epochs" not in flags and {"epochs", "max_iters"} <= set(explicit) and cfg["epochs"] > 0:
        raise ConfigError("the config files set both epochs and max_iters: keep one, or pick one "
                          "on the command line")


def setup_processes(cfg):
    """Single process, or DDP under torchrun (RANK / LOCAL_RANK / WORLD_SIZE set): a small dict."""
    if cfg["dtype"] == "int8":
        raise ConfigError("--dtype=int8 is for inference (sample.py, eval.py, serve.py): train "
                          "with auto, float32, bfloat16 or float16")
    device = resolve_device(cfg["device"])
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", -1), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    fsdp = check_parallel(cfg, rank)
    if rank >= 0:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        auto = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=auto if cfg["backend"] == "auto" else cfg["backend"])
    dtype = resolve_dtype(cfg["dtype"], device)
    tune_cpu_allocator(device, lean=cfg["grad_checkpointing"] or fsdp)  # FSDP: memory first
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype=bfloat16 is not supported on this GPU: use --dtype=float16")
    return {"device": device, "dtype": dtype, "rank": max(rank, 0), "world": world,
            "ddp": rank >= 0, "fsdp": fsdp, "master": rank <= 0}


# --------------------------------------------------------------------------------------------------
# The run: its state, and the loop


class Trainer:
    """A run's state (model, optimizer, progress, RNG states) and its loop, train(). What depends
    on the kind of task (batches, loss, evaluation, report, FLOPs) is the objective's."""

    def __init__(self, cfg, run, resume_from, explicit=()):
        self.cfg, self.run = cfg, run
        data, self.meta = load_prepared(cfg["dataset"])
        self.task = objective_for(self.meta, data, cfg, run)
        self.tokens_per_iter = (cfg["gradient_accumulation_steps"] * cfg["batch_size"]
                                * cfg["block_size"] * run["world"])
        if cfg["epochs"] > 0:
            cfg["max_iters"] = math.ceil(cfg["epochs"] * self.task.epoch_tokens
                                         / self.tokens_per_iter)
        # FSDP: the file mapped, not read (rank 0 broadcasts weights and AdamW state to the shards)
        where = ("cpu", True) if run["fsdp"] else (run["device"], False)  # map_location, mmap
        ckpt = load_checkpoint(resume_from, *where) if resume_from else None
        torch.manual_seed(cfg["seed"] + run["rank"])
        self.raw_model = shard_model(lambda: self.task.prepare(
            build_model(cfg, ckpt, run, explicit, self.meta)), run)
        if run["rank"] > 0:  # rank 0's initial weights are every rank's (FSDP's other ranks draw
            torch.manual_seed(cfg["seed"] + run["rank"])  # none): their dropout streams start here
        device_type = run["device"].split(":")[0]
        self.optimizer = self.raw_model.configure_optimizers(
            cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device_type)
        self.scaler = torch.amp.GradScaler(device_type, enabled=run["dtype"] == "float16"
                                           and device_type == "cuda")
        self.data_rng = torch.Generator().manual_seed(cfg["seed"] + run["rank"])
        self.stopper = EarlyStopping(cfg["patience"], cfg["min_delta"])
        self.iter_num, self.losses, self.evaluated_at, self.signal = 0, {}, None, None
        self.stamp = unused_stamp(cfg["out_dir"])
        if ckpt is not None:
            try:
                self._restore(ckpt)
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
                first = str(e).splitlines()[0] if str(e) else ""
                raise CheckpointError(f"{resume_from} is not a resumable training state "
                                      f"({type(e).__name__}: {first}): resume from an intact "
                                      f"finetuned_*_last.pt") from None
        compiled = resolve_compile(cfg["compile"], run["device"])
        self.model = torch.compile(self.raw_model) if compiled else self.raw_model
        self.model = replicate(self.model, run)
        self.best_path = checkpoint_path(cfg["out_dir"], self.stamp)
        self.last_path = checkpoint_path(cfg["out_dir"], self.stamp, last=True)
        self.logger = Logger(cfg, run, resume_iter=self.iter_num if ckpt is not None else None)
        # MFU: the FLOPs of what runs (the objective counts them) against a GPU's data-sheet peak
        # for the dtype, else this device's matmul peak measured now (~0.5 s): never an A100's
        self.peak_flops, self.peak_source = (peak_flops(run["device"], run["dtype"])
                                             if run["master"] else (0, ""))

    def _restore(self, ckpt):
        load_optimizer_state(self.raw_model, self.optimizer, ckpt["optimizer"], self.run)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iter_num, self.stamp, self.losses = ckpt["iter_num"], ckpt["run"], ckpt["losses"]
        # older checkpoints were saved at evals only
        self.evaluated_at = ckpt.get("evaluated_at", self.iter_num)
        # the saved progress (best, reference, stale) with this run's settings: a --patience or
        # --min_delta given on resume wins, like every other override
        self.stopper = EarlyStopping(**{**ckpt["early_stopping"], "patience": self.cfg["patience"],
                                        "min_delta": self.cfg["min_delta"]})
        # each rank's own streams when the world size is the same (rank 0's in older checkpoints)
        rng, ranks = ckpt["rng"], ckpt.get("rank_rng")
        if ranks and len(ranks) == self.run["world"]:
            rng = ranks[self.run["rank"]]
        torch.set_rng_state(rng["torch"].cpu())
        self.data_rng.set_state(rng["data"].cpu())
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"].cpu())

    def save(self, path, with_optimizer):
        """Every rank calls this (FSDP gathers the weights); rank 0 writes."""
        gathered = gathered_state(self.raw_model, self.optimizer if with_optimizer else None,
                                  self.run)
        ranks = rng_of_ranks(self.data_rng, self.run)
        if not self.run["master"]:
            return
        if ranks:
            gathered["rank_rng"] = ranks
        state = {"iter_num": self.iter_num, "run": self.stamp, "losses": self.losses,
                 "train_loss": self.losses.get("train"), "val_loss": self.losses.get("val"),
                 "best_val_loss": self.stopper.best, "early_stopping": asdict(self.stopper),
                 "evaluated_at": self.evaluated_at, "data_rng": self.data_rng.get_state()}
        optimizer = (self.optimizer, self.scaler) if with_optimizer else (None, None)
        ckpt = training_checkpoint(self.raw_model, self.cfg, self.meta, state, *optimizer)
        save_checkpoint(path, {**ckpt, **gathered})

    def train(self):
        """learning rate -> evaluate and checkpoint -> forward and backward over the micro-batches
        -> clip and step -> log, until max_iters, early stopping or a signal. Returns why it stopped
        and the seconds it took."""
        cfg, run, task = self.cfg, self.run, self.task
        self.catch_signals()
        t_start, window = time.time(), Window(self.iter_num)
        while True:
            lr = get_lr(self.iter_num, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            # evaluate and checkpoint every eval_interval iterations and after the last; a run
            # resumed at an eval iteration evaluates there unless its saved state already did
            last = self.iter_num >= cfg["max_iters"]
            due = self.iter_num % cfg["eval_interval"] == 0 or last
            if due and self.evaluated_at != self.iter_num:
                self.losses = task.evaluate(self.model)
                for split in ("train", "val"):
                    self.check_finite(self.losses[split], f"{split} loss (eval)")
                self.evaluated_at = self.iter_num
                is_best, stop = self.stopper.update(self.losses["val"])
                if is_best:
                    self.save(self.best_path, with_optimizer=False)
                self.save(self.last_path, with_optimizer=True)
                self.logger.eval(self.iter_num, self.losses, self.stopper, is_best,
                                 *task.report(self.raw_model, self.losses))
                if stop and not last:
                    reason = (f"early stopping: {cfg['patience']} evals without a val improvement "
                              f">= {cfg['min_delta']}")
                    break
                window = Window(self.iter_num)  # the log's ms/iter and MFU: train steps, not evals
            if last:
                reason = f"reached max_iters={cfg['max_iters']}"
                break
            # forward and backward over the micro-batches (weighted as the objective says), step
            batches = [task.batch(self.data_rng) for _ in range(cfg["gradient_accumulation_steps"])]
            loss = forward_backward(self.model, self.scaler, batches, run, task.loss, task.weight)
            clip_and_step(self.model, self.optimizer, self.scaler, cfg["grad_clip"])
            self.iter_num += 1
            window.add(*task.work(self.raw_model, batches))
            log_now = self.iter_num % cfg["log_interval"] == 0 or self.iter_num == cfg["max_iters"]
            synced = log_now or not run["device"].startswith("cuda")  # host syncs: on GPUs at logs
            if synced:
                self.check_finite(loss.item(), "training loss")
            if log_now:  # loss.item() syncs before the log reads the clock: GPU time counts
                epoch = self.iter_num * self.tokens_per_iter / task.epoch_tokens  # passes of train
                self.logger.step(self.iter_num, loss.item(), lr, epoch, window, self.peak_flops)
                window = Window(self.iter_num)
            # a signal caught by any rank stops every rank at this step
            if (synced or not run["ddp"]) and (caught := agreed_signal(self.signal, run)):
                reason = f"interrupted by signal {caught}"
                break
        self.signal = agreed_signal(self.signal, run)  # then every rank checks and saves
        if self.signal is not None:
            # on a GPU the loss is checked at log steps only; each rank checks what it holds
            for name, p in self.raw_model.named_parameters():
                largest = local_part(p.detach()).float().abs().max().item()
                self.check_finite(largest, f"weight {name}")
            self.save(self.last_path, with_optimizer=True)
        return reason, time.time() - t_start

    def catch_signals(self):
        """On SIGINT / SIGTERM the loop finishes its step, saves and stops; a second one exits."""
        def on_signal(signum, frame):
            if self.signal is not None:
                raise KeyboardInterrupt
            self.signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    def check_finite(self, value, what):
        check_finite(value, what, self.iter_num, self.cfg, self.run["dtype"], self.last_path)


def main(argv=None):
    cfg, resume_from, explicit = resolve_config(sys.argv[1:] if argv is None else argv)
    run = setup_processes(cfg)
    if run["master"]:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        # checkpoints half-written by killed runs (finetuned_*.pt.tmp<PID>); a live run's stay
        removed = remove_dead_leftovers(cfg["out_dir"],
                                        temp_of=lambda name: bool(CKPT_PATTERN.match(name)))
        if removed:
            print(f"removed {len(removed)} leftover(s) of interrupted runs: {', '.join(removed)}")
    trainer = None
    try:
        trainer = Trainer(cfg, run, resume_from, explicit)
        if run["master"]:
            print(start_lines(trainer.raw_model, cfg, run, trainer.tokens_per_iter, trainer.stamp,
                              trainer.peak_flops, trainer.peak_source))
        reason, seconds = trainer.train()
        if run["master"]:
            print(f"stopped: {reason} after {trainer.iter_num} iters in {seconds / 60:.1f} min; "
                  f"best val loss {trainer.stopper.best:.4f}")
            trainer.task.test(trainer.best_path)  # a classifier's test split
            print(f"best model: {trainer.best_path}\nlatest state: {trainer.last_path}")
            for name, plot in (("loss", plot_losses(cfg["out_dir"])),
                               ("accuracy", plot_accuracy(cfg["out_dir"]))):
                if plot:
                    print(f"{name} curve: {plot}")
        trainer.logger.close()
        if trainer.signal is not None and run["master"]:
            print(f"to continue: python train.py --init_from=resume --out_dir={cfg['out_dir']}",
                  flush=True)
        if run["ddp"]:
            # gloo's worker thread may still be releasing the last eval all_reduce's tensor, which
            # needs the GIL; tearing the group down (joining it, GIL held) could then hang a rank
            dist.barrier()
    finally:
        stopped_by = trainer.signal if trainer is not None else None
        if run["ddp"]:
            # the DDP wrapper holds the group too: freed after the group's teardown, at interpreter
            # exit, gloo's worker threads would be destroyed there and abort ("terminate called")
            trainer = None
            gc.collect()
            dist.destroy_process_group()
    if stopped_by is not None:
        sys.exit(128 + stopped_by)  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    configurator.run(main)
