"""An Engine from a script's options (sample.py, eval.py, serve.py): the checkpoint loaded, the
weights converted to half precision where asked, and SamplingParams from the command line."""
import sys

import torch

from . import chat
from .checkpoint import load_model
from .device import cpu_has_bf16, resolve_device, resolve_dtype
from .engine import Engine
from .sampling import SAMPLING_KEYS, SamplingParams

# --use_cache: kept so that old commands run; decoding always uses the KV cache
USE_CACHE_NOTE = ("note: --use_cache=false no longer changes anything: decoding always uses the KV "
                  "cache, whose tokens equal full recomputation's")


def load_engine(cfg, one_row=False):
    """(Engine, checkpoint info) for a script's options: out_dir, ckpt, init_from (see
    checkpoint.load_model), device, dtype. In bfloat16 / float16 / int8 the matmul weights
    themselves are converted once here (and with them the KV cache), not just autocast: batch-1
    decoding is bound by reading the weights once per token (GPT.to_half). one_row: the script
    decodes one sequence at a time (dtype auto: see resolve_dtype)."""
    if not cfg.get("use_cache", True):
        print(USE_CACHE_NOTE, file=sys.stderr)
    device = resolve_device(cfg["device"])
    model, info = load_model(cfg["out_dir"], cfg["ckpt"], cfg.get("init_from", ""), device)
    dtype = resolve_dtype(cfg["dtype"], device, one_row)
    if cfg["dtype"] == "auto":
        print(f"dtype auto: {dtype} on {device}", file=sys.stderr)
    if dtype != "float32":
        to_half(model, dtype, device)
    enc = chat.run_encoder(info)  # with the special tokens the checkpoint records
    return Engine(model, enc, device, dtype), info


def to_half(model, dtype, device):
    """GPT.to_half for inference on device ("bfloat16" / "float16" / "int8"). On a CPU without that
    dtype's instructions, prompts (more than Linear.FEW_ROWS rows) multiply in fp32 (upcast);
    decoding steps keep the half-precision bytes. int8 weights take their own kernel for any number
    of rows."""
    native = device != "cpu" or dtype == "int8" or (dtype == "bfloat16" and cpu_has_bf16())
    return model.to_half(getattr(torch, dtype), upcast=not native)


def unescape(text):
    """`\\n` typed on a command line means a newline (other non-ASCII text is kept as it is)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def sampling_params(cfg, default_stop=None):
    """SamplingParams from a script's options (SAMPLING_KEYS, stop, seed). stop None: default_stop
    (the checkpoint's; None for no stop string); a string or a list of strings, with `\\n`
    unescaped, otherwise."""
    stop = cfg["stop"]
    if stop is None:
        stops = (default_stop,) if default_stop else ()
    else:
        if not isinstance(stop, (list, tuple)):  # --stop=5 arrives as an int: a stop string too
            stop = [stop]
        stops = tuple(unescape(str(s)) for s in stop)
    return SamplingParams(**{k: cfg[k] for k in SAMPLING_KEYS}, stop=stops, seed=cfg["seed"])
