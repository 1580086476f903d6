"""Memory a training run needs, estimated before it starts, and a clear refusal (with what to
change) when it clearly will not fit the device's free memory."""
import math
import os

from .device import available_memory
from .errors import ResourceError
from .lora import lora_settings


def count_params(config):
    """Parameters of GPT(config), counted without building it (the head is tied to the
    token embedding)."""
    C = config.n_embd
    ln_f = (2 if config.bias else 1) * C
    return (config.vocab_size * C + config.block_size * C
            + config.n_layer * _layer_params(config) + ln_f)


def _layer_params(config):
    C = config.n_embd
    return 12 * C * C + (13 * C if config.bias else 2 * C)  # 4 matmuls (+ biases) and 2 LayerNorms


def count_trainable(config, cfg):
    """Trainable parameters of GPT(config) under cfg's lora_* / trainable_layers settings, counted
    without building it: LoRA trains rank * (in + out) per target layer, trainable_layers=N the last
    N blocks and ln_f."""
    C = config.n_embd
    lora = lora_settings(cfg)
    if lora:
        # in + out features of each target layer
        widths = {"attn.c_attn": 4 * C, "attn.c_proj": 2 * C,
                  "mlp.c_fc": 5 * C, "mlp.c_proj": 5 * C}
        return config.n_layer * sum(lora["rank"] * widths[t] for t in lora["targets"])
    layers = cfg.get("trainable_layers", -1)
    if layers == -1:
        return count_params(config)
    return min(layers, config.n_layer) * _layer_params(config) + (2 if config.bias else 1) * C


def estimate_memory(config, cfg, dtype, ddp=False, trainable=None):
    """Bytes a training process needs, by part. Weights, gradients and AdamW's two moments are fp32
    (4 bytes per parameter each; mixed precision adds a 2-byte cast of the weights, DDP a
    gradient-sized bucket copy). Activations kept for backward at batch_size x block_size follow
    Korthikanti et al. 2022: 34*s*b*h bytes per layer at 2 bytes per value, plus 5*a*s^2*b when the
    attention matrix is materialised (flash=False); the logits add b*s*V values with their fp32 copy
    and gradient. An estimate: allocator slack and the runtime come on top. trainable: how many
    parameters train (None: all); gradients and AdamW state exist only for those (activations are
    counted in full: LoRA needs them in every layer, and the estimate stays an upper bound). A
    preference run's batch is 2 x batch_size rows (chosen and rejected); DPO's reference adds
    reference_memory."""
    n = count_params(config)
    t = n if trainable is None else trainable
    act = 2 if dtype in ("bfloat16", "float16") else 4
    b = cfg["batch_size"] * (2 if cfg.get("preference_loss") else 1)
    s = min(cfg["block_size"], config.block_size)
    h, a = config.n_embd, config.n_head
    per_layer = 34 * s * b * h * act / 2 + (0 if config.flash else 5 * a * s * s * b * act / 2)
    # with grad_checkpointing a block keeps only its input; one block's activations exist at a
    # time in backward
    kept = config.n_layer * (s * b * h * act if cfg.get("grad_checkpointing") else per_layer)
    kept += per_layer if cfg.get("grad_checkpointing") else 0
    parts = {
        "weights": 4 * n + (2 * n if act == 2 else 0),
        "gradients": 4 * t * (2 if ddp else 1),
        "optimizer": 8 * t,
        "activations": kept + b * s * config.vocab_size * (act + 8),
        "reference": reference_memory(config, cfg, b * s * config.vocab_size * (act + 4)),
    }
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def reference_memory(config, cfg, logits):
    """Bytes of DPO's frozen reference during a step: a copy of the weights in fp32 (rebuilt from
    init_from) and its forward's logits (no gradients: nothing else of its forward is kept); none
    with LoRA (the same weights, adapters off), SimPO or precompute_ref (its forward runs before
    training, where the gradients and AdamW state do not exist yet, and the copy is then freed)."""
    if cfg.get("preference_loss") != "dpo" or lora_settings(cfg) or cfg.get("precompute_ref"):
        return 0
    return 4 * count_params(config) + logits


def check_memory(config, cfg, sys_info, trainable=None):
    """Print the run's memory estimate; raise ResourceError with what to change when it exceeds
    the free memory (unless check_memory is False). Processes sharing host memory (DDP on CPU)
    are counted together."""
    need = estimate_memory(config, cfg, sys_info.get("dtype", "float32"),
                           sys_info.get("ddp", False), trainable)
    device = sys_info["device"]
    procs = 1 if device.startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                   sys_info.get("world", 1)))
    total, avail = need["total"] * procs, available_memory(device)
    b, s = cfg["batch_size"], min(cfg["block_size"], config.block_size)

    def gib(x):
        return f"{x / 2 ** 30:.2f} GiB"

    if sys_info.get("master", True):
        print(f"memory estimate: {gib(total)}{f' for {procs} processes' if procs > 1 else ''} "
              f"(weights {gib(need['weights'])}, gradients {gib(need['gradients'])}, "
              f"AdamW state {gib(need['optimizer'])}, "
              + (f"DPO reference {gib(need['reference'])}, " if need["reference"] else "") +
              f"activations {gib(need['activations'])} at batch_size {b} x block_size {s})"
              + (f"; {gib(avail)} available on {device}" if avail is not None else ""), flush=True)
    if not cfg.get("check_memory", True) or avail is None or total <= avail:
        return need
    states = (need["total"] - need["activations"]) * procs
    if states > avail:
        advice = (f"the model alone takes {gib(states)} for its weights, gradients and AdamW "
                  f"state: use a smaller model (gpt2 < gpt2-medium < gpt2-large < gpt2-xl) "
                  f"or a device with more memory")
    else:
        # the largest batch that fits
        fits = int((avail - states) / (need["activations"] * procs / b))
        advice = (f"the activations at batch_size {b} x block_size {s} "
                  f"take {gib(need['activations'] * procs)}: ")
        if fits >= 1:
            accum = math.ceil(b * cfg["gradient_accumulation_steps"] / fits)
            advice += (f"use a smaller batch with more accumulation, e.g. --batch_size={fits} "
                       f"--gradient_accumulation_steps={accum} (about the same tokens per step), "
                       f"or a smaller --block_size")
        else:
            advice += "use --batch_size=1 with a smaller --block_size, or a smaller model"
    raise ResourceError(f"this run needs about {gib(total)} but only {gib(avail)} is available "
                        f"on {device}; {advice}. (--check_memory=False starts it anyway)")

