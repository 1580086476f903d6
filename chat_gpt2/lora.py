"""Parameter-efficient fine-tuning: LoRA adapters on the blocks'
Linear layers, or training only the last blocks.

LoRA (Hu et al. 2021): a target layer's output becomes W x + b + (alpha / r) * B A dropout(x), with
the base W, b frozen and only A (r, in) and B (out, r) trained. B starts at zero, so step 0 computes
exactly the base model. The wrapped layer keeps its `weight` and `bias` names and adds `lora_A` /
`lora_B`, so the base's state-dict names do not change and merging is W += (alpha / r) * B @ A:
after it the model is a plain GPT, with no inference cost.

A LoRA checkpoint (checkpoint.py) holds only A and B, what the adapters were (`lora`) and which base
they belong to (`base`: how to rebuild it and a fingerprint of its weights); peft_adapter() writes
them in PEFT's layout.
"""
import hashlib
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from .errors import ConfigError
from model import Linear

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the Linear layers of a Block
LORA_KEYS = ("lora_A", "lora_B")
# a LoRA checkpoint's trained embedding rows (train_rows), (len(rows), n_embd), beside the adapters
ROWS_KEY = "transformer.wte.trained_rows"
# PEFT's name for them (TrainableTokens: the rows' values, which replace the base's)
PEFT_ROWS_KEY = "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"


class LoRALinear(Linear):
    """Our Linear plus a low-rank update. It takes over the base layer's weight and bias Parameters
    (same names in the state dict, so a plain GPT's weights load into it and it merges back into a
    plain Linear)."""

    def __init__(self, base, rank, alpha, dropout):
        nn.Module.__init__(self)  # no fresh weight: the base's Parameters are taken over below
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        # zero: step 0 = the base
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init
        self.lora_dropout = nn.Dropout(dropout)
        self.scale = alpha / rank

    def forward(self, x):
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return super().forward(x) + update * self.scale

    def merged(self):
        """A plain Linear holding W + scale * B @ A (the same
        Parameter objects, updated in place)."""
        with torch.no_grad():
            self.weight += (self.lora_B @ self.lora_A) * self.scale
        out = Linear.__new__(Linear)
        nn.Module.__init__(out)
        out.in_features, out.out_features, out.weight, out.bias = (
            self.in_features, self.out_features, self.weight, self.bias)
        return out


# --------------------------------------------------------------------------------------------------
# Config


def parse_targets(text):
    """'attn.c_attn,mlp.c_fc' -> a tuple of TARGETS entries; an
    unknown or missing name is a ConfigError."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ConfigError(f"--lora_targets: unknown layer {unknown[0]!r}; "
                          f"choose from {','.join(TARGETS)}")
    if not names:
        raise ConfigError(f"--lora_targets is empty; choose from {','.join(TARGETS)}")
    return tuple(dict.fromkeys(names))


def lora_settings(cfg):
    """The run's adapter settings {rank, alpha, dropout, targets}, or
    None when LoRA is off. Checks the values."""
    rank, alpha, dropout = (cfg.get("lora_rank", 0), cfg.get("lora_alpha", 0.0),
                            cfg.get("lora_dropout", 0.0))
    if not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"--lora_rank must be a whole number >= 0 (0 = no LoRA), got {rank!r}")
    layers = cfg.get("trainable_layers", -1)
    if not isinstance(layers, int) or layers < -1:
        raise ConfigError(f"--trainable_layers must be -1 (all) or a number of blocks >= 0, "
                          f"got {layers!r}")
    if rank == 0:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ConfigError(f"--lora_alpha must be a number > 0 (0 = the rank, a scale of 1), "
                          f"got {alpha!r}")
    alpha = alpha or rank
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"--lora_dropout must be in [0, 1), got {dropout!r}")
    if layers != -1:
        raise ConfigError("--lora_rank and --trainable_layers cannot be combined: "
                          "LoRA already freezes the whole base; use one or the other")
    return {"rank": rank, "alpha": float(alpha), "dropout": float(dropout), "targets": list(
        parse_targets(cfg.get("lora_targets", ",".join(TARGETS))))}


# --------------------------------------------------------------------------------------------------
# Applying, freezing, merging


def apply_lora(model, lora):
    """Freeze model and wrap its target layers in every block with adapters (the only trainable
    tensors). Sets model.lora to the settings (which checkpoints save). Returns model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        for target in lora["targets"]:
            parent_name, name = target.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, LoRALinear(getattr(parent, name), lora["rank"], lora["alpha"],
                                             lora["dropout"]))
    model.lora = dict(lora)
    return model


def merge_lora(model):
    """Fold every adapter into its base weight: the model becomes a
    plain GPT (its state dict one's too)."""
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    if getattr(model, "rows_hook", None) is not None:  # a plain GPT: every row trains again
        model.rows_hook.remove()
        model.rows_hook = model.trained_rows = None
    model.lora = None
    return model


def freeze_layers(model, n):
    """Train only the last n blocks and the final LayerNorm (n = -1: everything). The tied token
    embedding / LM head, the position embedding and the earlier blocks get requires_grad=False: no
    gradients, no AdamW state."""
    n_layer = len(model.transformer.h)
    if n == -1:
        return model
    if n > n_layer:
        raise ConfigError(f"--trainable_layers={n} exceeds the model's {n_layer} layers (n_layer)")
    for p in model.parameters():
        p.requires_grad_(False)
    # a classifier's head (classifier.py) always trains
    head = [model.score] if hasattr(model, "score") else []
    for module in [*model.transformer.h[n_layer - n:], model.transformer.ln_f, *head]:
        for p in module.parameters():
            p.requires_grad_(True)
    return model


def train_rows(model, rows):
    """Train the token embedding's rows `rows` (new special tokens) while every other row stays as
    it is (LoRA, trainable_layers): the tied wte / LM head weight requires grad, a hook zeroes the
    other rows' gradient, and GPT.configure_optimizers does not decay it (decay would move them).
    Sets model.trained_rows (checkpoints save it)."""
    weight = model.transformer.wte.weight
    keep = torch.zeros(weight.size(0), 1, dtype=torch.bool)
    keep[list(rows)] = True
    weight.requires_grad_(True)
    model.rows_hook = weight.register_hook(lambda grad: torch.where(keep.to(grad.device), grad, 0))
    model.trained_rows = sorted(rows)
    return model


def adapter_state(model):
    """The adapter tensors of model's state dict (the only ones a LoRA checkpoint stores), and the
    trained rows of the embedding (train_rows) as ROWS_KEY."""
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in LORA_KEYS}
    if getattr(model, "trained_rows", None):
        state[ROWS_KEY] = model.transformer.wte.weight.detach()[model.trained_rows].clone()
    return state


def load_adapters(model, state):
    """Load adapter tensors (and trained rows) into a model with the same adapters; every
    adapter must be filled, nothing else given."""
    expected = set(adapter_state(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter tensors do not match the settings: missing {missing[:2]}, "
                         f"unexpected {unexpected[:2]}")
    state = dict(state)
    if ROWS_KEY in state:
        with torch.no_grad():
            model.transformer.wte.weight[model.trained_rows] = state.pop(ROWS_KEY).to(
                model.transformer.wte.weight.dtype)
    model.load_state_dict(state, strict=False)
    return model


def fingerprint(model):
    """sha256 over the names, shapes, dtypes and bytes of every base parameter (adapters excluded):
    tells whether the base rebuilt at load time is the one the adapters were trained on (~1 s per GB
    of weights)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in LORA_KEYS:
            continue
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# PEFT's adapter layout (export.py --adapter_only)


def peft_adapter(model, base_name):
    """(adapter_config.json dict, tensors) that peft.PeftModel.from_pretrained loads onto
    transformers' GPT2LMHeadModel of the base. GPT-2's Conv1D stores (in, out), hence
    fan_in_fan_out=True; PEFT's lora_A / lora_B are nn.Linear weights of the same (r, in) / (out, r)
    shapes as ours, so no tensor is transposed. Trained rows of new special tokens go in as PEFT's
    trainable_token_indices on wte (the tied LM head follows), onto a base resized to hold them."""
    lora, rows = model.lora, getattr(model, "trained_rows", None)
    tensors = {}
    for name, t in adapter_state(model).items():
        module, key = name.rsplit(".", 1)
        name = PEFT_ROWS_KEY if name == ROWS_KEY else f"base_model.model.{module}.{key}.weight"
        tensors[name] = t.detach().to("cpu", torch.float32).contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
        # PEFT matches a module whose name ends with ".<target>"
        "target_modules": list(lora["targets"]),
        "fan_in_fan_out": True, "bias": "none", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    if rows:  # the new tokens' rows: the base must have them (resize_token_embeddings)
        config["trainable_token_indices"] = {"wte": list(rows)}
    return config, tensors
