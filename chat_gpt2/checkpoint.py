"""Checkpoints: their names, what they hold, atomic save, weights-only
load, the newest one, a model rebuilt.

A run started at YYYYMMDD_HHMMSS writes two files into out_dir:
    finetuned_YYYYMMDD_HHMMSS.pt       the best model (lowest val loss), with what sampling needs
    finetuned_YYYYMMDD_HHMMSS_last.pt  for resume: the latest state, optimizer, scaler, RNG states

Both are plain dicts of Python values and tensors, loaded with torch.load(weights_only=True): no
pickled classes. `tokenizer` is the dataset's: "gpt2", or a trained tokenizer's record with its
tokenizer.json text (tokenizer.py), so sampling and export need nothing else. A LoRA run's `model` holds only the adapter tensors; `lora` says what they are and
`base` which weights they belong to (init_from, a fingerprint, model_args): model_from_checkpoint
rebuilds that base and merges them in.
"""
import os
import re
import time
from dataclasses import asdict

import torch

from . import chat
from .errors import CheckpointError, ConfigError, MissingFileError, UserError
from .files import atomic_write
from .classifier import attach_head
from .hf_gpt2 import from_pretrained
from .lora import adapter_state, apply_lora, fingerprint, load_adapters, merge_lora, train_rows
from model import GPT, GPTConfig

CKPT_PATTERN = re.compile(r"^finetuned_(\d{8}_\d{6})(_last)?\.pt$")


def checkpoint_path(out_dir, stamp, last=False):
    return os.path.join(out_dir, f"finetuned_{stamp}{'_last' if last else ''}.pt")


def unused_stamp(out_dir):
    """The run's start time, YYYYMMDD_HHMMSS; a run started in the
    same second as another gets the next second."""
    t = time.time()
    while os.path.exists(checkpoint_path(out_dir, time.strftime("%Y%m%d_%H%M%S", time.localtime(t)),
                                         last=True)):
        t += 1
    return time.strftime("%Y%m%d_%H%M%S", time.localtime(t))


def find_checkpoint(out_dir, last=False):
    """The newest run's best checkpoint in out_dir (or its latest state with last=True)."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    runs = sorted(m.group(1) for m in map(CKPT_PATTERN.match, names)
                  if m and bool(m.group(2)) == last)
    if not runs:
        kind = os.path.basename(checkpoint_path("", "YYYYMMDD_HHMMSS", last))
        raise MissingFileError(f"no checkpoint {kind} in {out_dir!r}: "
                               "train first, or pass --ckpt=PATH")
    return checkpoint_path(out_dir, runs[-1], last)


# fixed by the weights; block_size may shrink, dropout change
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "bias")


def checkpoint_for_init(init_from):
    """The checkpoint file an init_from names, or None when it names none of ours ('scratch',
    'resume', Hugging Face weights): a .pt file, or a run's out_dir (its newest best checkpoint)."""
    if init_from.endswith(".pt"):
        return init_from
    if os.path.isdir(init_from) and any(map(CKPT_PATTERN.match, os.listdir(init_from))):
        return find_checkpoint(init_from)
    return None


def init_checkpoint(init_from, shape):
    """The checkpoint a new run starts from (init_from: see checkpoint_for_init), or None. shape:
    the SHAPE_KEYS the run set explicitly; one that differs from the checkpoint's is refused, as for
    pretrained GPT-2."""
    path = checkpoint_for_init(init_from)
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    if "model_args" not in ckpt:
        raise CheckpointError(f"--init_from={init_from}: {path} is not a model checkpoint "
                              "(no model_args)")
    wrong = [f"{k}={v} (the checkpoint has {ckpt['model_args'].get(k)})" for k, v in shape.items()
             if ckpt["model_args"].get(k) != v]
    if wrong:
        raise ConfigError(f"--init_from={init_from}: {', '.join(wrong)}: "
                          f"the model's shape comes from {path}; leave n_layer/n_head/n_embd/bias "
                          f"out (block_size may shrink, dropout may change)")
    ckpt["path"] = path
    return ckpt


def save_checkpoint(path, ckpt):
    """Write atomically (temp file + rename): a crash mid-save never
    leaves a torn or truncated checkpoint."""
    # a full disk: an OutputError naming the file, the old ones untouched
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(path, map_location="cpu", mmap=False):
    """mmap: the file mapped, its tensors read only where they are used (map_location the CPU)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torn, not a checkpoint, or holding pickled classes
        raise CheckpointError(f"could not read checkpoint {path}: "
                              f"{type(e).__name__}: {e}") from None


def training_checkpoint(raw_model, cfg, meta, state, optimizer=None, scaler=None):
    """What train.py saves: the weights, the model's shape, the data's template and stop, the run's
    config and progress (state), the RNG states, and with an optimizer its state and the scaler's
    (the _last file)."""
    state = dict(state)
    lora = getattr(raw_model, "lora", None)
    ckpt = {
        # the unwrapped, uncompiled module (no _orig_mod. / module. prefix); LoRA: its adapters only
        "model": adapter_state(raw_model) if lora else raw_model.state_dict(),
        "model_args": asdict(raw_model.config),
        "template": meta["template"], "tokenizer": meta["tokenizer"],
        "default_stop": meta["default_stop"], "multiline_replies": meta["multiline_replies"],
        "config": dict(cfg),
        "rng": {"torch": torch.get_rng_state(), "data": state.pop("data_rng")},
        **state,
    }
    if lora:
        ckpt["lora"], ckpt["base"] = dict(lora), dict(raw_model.lora_base)
    # the special tokens the model has rows for ({marker: id}) and the rows that alone train
    if getattr(raw_model, "special_tokens", None):
        ckpt["special_tokens"] = dict(raw_model.special_tokens)
    if getattr(raw_model, "trained_rows", None):
        ckpt["trained_rows"] = list(raw_model.trained_rows)
    # a classifier (classifier.py): its classes and the data's columns
    if getattr(raw_model, "labels", None):
        ckpt["classify"] = {"labels": list(raw_model.labels), "columns": meta.get("columns")}
    if torch.cuda.is_available():
        ckpt["rng"]["cuda"] = torch.cuda.get_rng_state()
    if optimizer is not None:
        ckpt["optimizer"], ckpt["scaler"] = optimizer.state_dict(), scaler.state_dict()
    return ckpt


def clean_state_dict(state_dict):
    """Drop wrappers' prefixes (torch.compile's _orig_mod., DDP's
    module.) so any state dict loads into GPT."""
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in state_dict.items()}


def model_from_checkpoint(ckpt, device="cpu", merge=True, **overrides):
    """The GPT a checkpoint holds, on device; overrides replace model_args (e.g. dropout for a
    resumed run). A LoRA checkpoint's base is rebuilt and checked, and its adapters merged in (a
    plain GPT), or with merge=False kept apart and trainable (resume, export --adapter_only)."""
    missing = [key for key in ("model", "model_args") if key not in ckpt]
    if missing:
        raise CheckpointError(f"not a model checkpoint: it lacks {', '.join(missing)}")
    if "lora" in ckpt:
        model = _lora_model(ckpt, merge, overrides)
        model.special_tokens = dict(ckpt.get("special_tokens") or {})
        return model.to(device)
    try:
        model = GPT(GPTConfig.from_dict({**ckpt["model_args"], **overrides}))
        if "classify" in ckpt:
            model = attach_head(model, ckpt["classify"]["labels"])
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"the checkpoint's weights do not fit its model_args: "
                              f"{str(e).splitlines()[0]}") from None
    model.special_tokens = dict(ckpt.get("special_tokens") or {})
    return model.to(device)


def describe_base(model, init_from, seed):
    """The `base` record of a LoRA run on model (before its adapters are added): how to rebuild it
    and its fingerprint. A local directory or file is stored as an absolute path (sampling may run
    from elsewhere)."""
    if init_from != "scratch" and os.path.exists(os.path.expanduser(init_from)):
        init_from = os.path.abspath(os.path.expanduser(init_from))
    return {"init_from": init_from, "seed": seed, "fingerprint": fingerprint(model),
            "model_args": asdict(model.config)}


def build_base(base, overrides=None):
    """The base model a `base` record describes, rebuilt on the CPU: a scratch model from its seed,
    our own checkpoint file (itself possibly LoRA, merged), or Hugging Face GPT-2 weights; cropped
    to its block_size."""
    args = {**base["model_args"], **(overrides or {})}
    init_from = base["init_from"]
    if init_from == "scratch":  # the same draws as train.py's: seed, then GPT(config) on the CPU
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base["seed"])
            model = GPT(GPTConfig.from_dict(args))
    elif os.path.isfile(init_from):
        model = model_from_checkpoint(load_checkpoint(init_from), dropout=args["dropout"])
    else:
        model = from_pretrained(init_from, {k: args[k] for k in ("dropout", "block_size", "flash")
                                            if k in args})
    if model.config.block_size > args["block_size"]:
        model.crop_block_size(args["block_size"])
    return model


def _lora_model(ckpt, merge, overrides):
    base = ckpt["base"]
    try:
        model = build_base(base, overrides)
    except (UserError, OSError) as e:
        raise CheckpointError(f"the LoRA checkpoint's base {base['init_from']!r} "
                              f"could not be rebuilt: {e}") from None
    found = fingerprint(model)
    if found != base["fingerprint"]:
        raise CheckpointError(f"the LoRA adapters were trained on other weights than "
                              f"{base['init_from']!r} holds now "
                              f"(fingerprint {found[:12]}, expected {base['fingerprint'][:12]}): "
                              f"restore the base the run started from at that path")
    model.lora_base = dict(base)
    apply_lora(model, ckpt["lora"])
    if ckpt.get("trained_rows"):  # new special tokens' rows: grown as in training, then loaded
        rows, tokenizer = ckpt["trained_rows"], ckpt.get("tokenizer") or chat.TOKENIZER
        model.init_token_rows(rows, chat.get_encoder(tokenizer).n_vocab)
        train_rows(model, rows)
    try:
        load_adapters(model, clean_state_dict(ckpt["model"]))
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's adapters do not fit its base: "
                              f"{str(e).splitlines()[0]}") from None
    return merge_lora(model) if merge else model


def load_model(out_dir="out", ckpt="", init_from="", device="cpu"):
    """A model to generate with, in eval mode on device, and the checkpoint's chat settings
    (template, tokenizer, default_stop). From init_from when given (one of our .pt files or a run's
    out_dir, as train.py's; else Hugging Face GPT-2 weights: the default template and stop), else
    from the ckpt file, else the newest run's best checkpoint in out_dir."""
    path = checkpoint_for_init(init_from) if init_from else None
    if init_from and path is None:
        if init_from in ("scratch", "resume"):
            raise CheckpointError(f"init_from={init_from!r} means nothing to sample from: "
                                  f"name pretrained weights (e.g. gpt2 or a local directory), "
                                  f"or leave init_from empty to use --ckpt / the newest checkpoint")
        model = from_pretrained(init_from).to(device)
        info = {"template": chat.TEMPLATE, "tokenizer": chat.TOKENIZER,
                "default_stop": chat.NEWLINE_STOP}
    else:
        path = path or ckpt or find_checkpoint(out_dir)
        info = load_checkpoint(path, device)
        model = model_from_checkpoint(info, device)
    return model.eval(), info


def load_classifier(out_dir="out", ckpt="", device="cpu"):
    """(GPTClassifier in eval mode, checkpoint) of a classification
    checkpoint (see load_model for the choice)."""
    model, info = load_model(out_dir, ckpt, device=device)
    if "classify" not in info:
        raise CheckpointError(f"{ckpt or find_checkpoint(out_dir)} is not a classifier: "
                              f"train one on a dataset prepared with --task=classify "
                              f"(docs/classification.md)")
    return model, info
