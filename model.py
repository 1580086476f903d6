"""A GPT-2 compatible transformer in one file, read top to bottom:

1. GPTConfig and the modules (LayerNorm, CausalSelfAttention, MLP, Block, GPT).
2. KVCache: the explicit inference state, so each generated token costs one position's work.
3. Sampling (temperature, top-k, top-p, repetition penalty) and `generate`, streaming tokens as they come.
4. Loading OpenAI GPT-2 / Hugging Face GPT-2 weights (safetensors or pytorch_model.bin).
5. Checkpoints (plain dicts and tensors, loadable with torch.load(weights_only=True)) and device helpers.
"""
import json
import math
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


# ----------------------------------------------------------------------------------------------------------------
# 1. The model


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed; OpenAI weights use 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers, like GPT-2
    flash: bool = True  # attention through F.scaled_dot_product_attention; False = the manual masked softmax

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1 and we keep the GPT-2 names)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) with a faster CPU path for a few rows, which is what generation
    with the KV cache runs: for, say, 8 rows MKL's x @ W.T repacks the whole weight at every call, while W @ x.T
    streams it once (batched cached generation ~20% faster, on par with transformers' Conv1D layout; bench.py
    --mode=generate). Training and prompts (many rows) take F.linear as before."""

    FEW_ROWS = 16

    def forward(self, x):
        rows = x.numel() // max(1, x.size(-1))
        if x.device.type != "cpu" or not 0 < rows <= self.FEW_ROWS:
            return F.linear(x, self.weight, self.bias)
        columns = x.reshape(rows, x.size(-1)).t()
        out = self.weight @ columns if self.bias is None else torch.addmm(self.bias[:, None], self.weight, columns)
        return out.t().contiguous().view(*x.shape[:-1], self.out_features)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout, self.flash = config.n_head, config.n_embd, config.dropout, config.flash

    def forward(self, x, layer_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        past = 0
        if layer_cache is not None:  # append this step's keys/values and attend over everything cached so far
            past = layer_cache.length
            k, v = layer_cache.append(k, v)
        # queries sit at positions past..past+T-1 and see keys 0..their own position
        mask = None if past == 0 or T == 1 else _causal_mask(T, past + T, x.device)
        if self.flash:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=(past == 0 and T > 1))
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if T > 1:
                att = att.masked_fill(~_causal_mask(T, past + T, x.device), float("-inf"))
            y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def _causal_mask(n_query, n_key, device):
    """Boolean (n_query, n_key) mask, True where attention is allowed; queries are the last n_query positions."""
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(diagonal=n_key - n_query)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, layer_cache=None):
        x = x + self.attn(self.ln_1(x), layer_cache)
        return x + self.mlp(self.ln_2(x))


# rows of logits turned into gradients at a time: as fast as 8 rows (which fit a core's L2) on an idle CPU, and
# 4x fewer parallel regions, each of which can stall for a time slice when other processes share the cores
HEAD_CHUNK = 32


class _HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the LM head, x @ weight.T, without (N, V) fp32 logits and their gradient in memory.

    The logits' gradient, softmax - onehot, is formed in the forward pass a few rows at a time while they are in
    cache, and written over the logits: backward is then just its two matmuls (which also apply the 1/N). The same
    math as F.cross_entropy (fp32 log-softmax), but on CPU the vocabulary-sized passes of cross_entropy, its
    backward and the .float() copies cost more than the head's matmuls; this halves them (README, "Training speed"). Two
    vocabulary-sized ops per chunk: each is a parallel region, and with other processes on the cores every one
    can wait for a descheduled thread."""

    @staticmethod
    def forward(ctx, x, weight, targets, want_grad):
        logits = x @ weight.t()  # (N, V) in the compute dtype (bf16 under autocast)
        losses = torch.empty(len(x), dtype=torch.float32, device=x.device)
        for s in range(0, len(x), HEAD_CHUNK):
            part, t = logits[s:s + HEAD_CHUNK], targets[s:s + HEAD_CHUNK, None]
            logp = torch.log_softmax(part, dim=1, dtype=torch.float32)
            logp_t = logp.gather(1, t)
            losses[s:s + len(t)] = logp_t.squeeze(1).neg()
            if want_grad:
                torch.exp(logp, out=part)  # softmax, rounded to the compute dtype
                part.scatter_(1, t, (logp_t.exp() - 1).to(part.dtype))  # p - 1 from fp32, not from rounded p
        ctx.save_for_backward(x, weight, logits)
        ctx.n = max(len(x), 1)
        return losses.sum() / ctx.n

    @staticmethod
    def backward(ctx, grad):
        x, weight, grad_logits = ctx.saved_tensors
        scale = grad / ctx.n
        return (grad_logits @ weight).mul_(scale), (grad_logits.t() @ x).mul_(scale), None, None


@torch.compiler.disable  # a Python loop over a data-dependent row count: compiling it would only recompile
def head_loss(x, weight, targets):
    """Mean cross-entropy of logits x @ weight.T (N, V) against targets (N,), in the autocast dtype if on."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    want_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return _HeadLoss.apply(x.to(dtype), weight.to(dtype), targets, want_grad)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are excluded by default (the token ones are tied to the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, loss_mask=None, kv_cache=None, all_logits=False):
        """idx (B, T) token ids. Returns (logits, loss).

        With targets: (None, loss), the mean cross-entropy over the positions where loss_mask is 1 (token-weighted;
        targets of -1 are ignored too; an all-masked batch gives loss 0, not NaN).
        Without targets: (logits, None), for the last position only (what generation needs) unless all_logits.
        kv_cache: a KVCache; idx then continues the cached sequence and the cache grows by T.
        """
        B, T = idx.size()
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache.layers[i] if kv_cache is not None else None)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x if all_logits else x[:, [-1], :]), None
        return None, self._masked_loss(x.reshape(B * T, -1), targets.reshape(-1), loss_mask)

    def _masked_loss(self, x, targets, loss_mask):
        keep = targets != -1
        if loss_mask is not None:
            keep &= loss_mask.reshape(-1) > 0
        if not x.is_cuda:
            # run the head only where the loss looks: exact, and most of a small model's cost in chat data. On CUDA
            # the boolean index would cost a host sync every step, which is worth more than the saved FLOPs.
            rows = keep.nonzero().squeeze(1)
            x, targets, keep = x[rows], targets[rows], keep[rows]
            if x.device.type == "cpu":
                return head_loss(x, self.lm_head.weight, targets)
        losses = F.cross_entropy(self.lm_head(x).float(), targets.clamp(min=0), reduction="none")
        keep = keep.float()
        return (losses * keep).sum() / keep.sum().clamp(min=1.0)

    def crop_block_size(self, block_size):
        """Use a smaller context than the weights were trained with (e.g. GPT-2's 1024 -> 256 to fine-tune)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on 2-D weights (matmuls, embeddings) only; biases and norms are not decayed."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused: one pass that reads and writes each parameter once. Without it PyTorch runs, on CPU, a loop of ~7
        # elementwise passes per tensor: 18% of a bf16 124M step (README, "Training speed"); on CUDA, one launch each
        fused = device_type in ("cuda", "cpu", "mps", "xpu")  # the devices torch >= 2.4 has the fused AdamW for
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        N = self.get_num_params()
        return 6 * N + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T


# ----------------------------------------------------------------------------------------------------------------
# 2. KV cache: the inference state, kept explicit


class LayerKVCache:
    """Keys and values of one layer, preallocated for block_size positions (allocated on first use so they take
    the dtype the attention actually runs in, e.g. bf16 under autocast)."""

    def __init__(self, max_len):
        self.max_len, self.length, self.k, self.v = max_len, 0, None, None

    def append(self, k, v):
        B, H, T, D = k.shape
        if self.k is None or self.k.dtype != k.dtype or self.k.size(0) != B:
            self.k = k.new_empty(B, H, self.max_len, D)
            self.v = v.new_empty(B, H, self.max_len, D)
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class KVCache:
    def __init__(self, config):
        self.layers = [LayerKVCache(config.block_size) for _ in range(config.n_layer)]

    @property
    def length(self):
        return self.layers[0].length

    def reset(self):
        for layer in self.layers:
            layer.length = 0


# ----------------------------------------------------------------------------------------------------------------
# 3. Sampling and generation


def adjust_logits(logits, history=None, temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0):
    """The float32 logits (B, V) sampling draws from, in transformers' order: repetition penalty, temperature,
    top-k, top-p; filtered tokens are -inf. With temperature 0 only the penalty applies (greedy takes the argmax).

    history (B, L): the tokens the penalty applies to. repetition_penalty follows CTRL / transformers: a seen
    token's logit is divided by the penalty when positive and multiplied by it when negative."""
    logits = logits.float()
    if repetition_penalty != 1.0 and history is not None:
        seen = logits.gather(1, history)
        logits = logits.scatter(1, history, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if temperature == 0:
        return logits
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token is already enough
        drop_sorted[:, 0] = False  # the most likely token always stays (top_p=0 is greedy, not an empty set)
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def sample_next(logits, history=None, temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0,
                generator=None):
    """Pick the next token per row from logits (B, V): greedy when temperature is 0, else a draw from
    adjust_logits' distribution (with generator, so a seed makes it reproducible)."""
    logits = adjust_logits(logits, history, temperature, top_k, top_p, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def check_sampling(temperature, top_k, top_p, repetition_penalty):
    """Fail early, with the option's name, on values that would otherwise give NaNs or a cryptic torch error."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None = off), got {top_k}")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be between 0 and 1, got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")


def crop_start(length, start, block_size):
    """Where the context window starts. When it would exceed block_size, drop the oldest tokens so that 3/4 of
    the window is kept; cached and uncached generation share this so both see exactly the same context."""
    if length - start > block_size:
        start = length - max(1, block_size - block_size // 4)
    return start


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0,
             use_cache=True, generator=None, vocab_limit=None):
    """Yield the next token of every row, (B,), once per step, for max_new_tokens steps.

    idx (B, T): the prompt (rows generated as one batch). The caller decides when a row is done and may simply
    stop iterating. vocab_limit: never sample ids at or above it (the padded part of the embedding).
    With use_cache each step runs the model on the new token only; without, on the whole window. Both crop the
    context the same way (crop_start) and give the same tokens."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    B, T = idx.shape
    if T == 0:
        raise ValueError("empty prompt: generation needs at least one token to start from")
    block_size = model.config.block_size
    cache = KVCache(model.config) if use_cache else None
    seq = idx.new_empty(B, T + min(max_new_tokens, 1024))  # filled in place, grown by doubling: no copy per step
    seq[:, :T] = idx
    length, start, fed = T, 0, 0  # fed: how many tokens of seq the cache holds
    for _ in range(max_new_tokens):
        new_start = crop_start(length, start, block_size)
        if new_start != start and cache is not None:  # positions are absolute: rebuild the cache for the new window
            cache.reset()
            fed = new_start
        start = new_start
        if cache is None:
            logits, _ = model(seq[:, start:length])
        else:
            logits, _ = model(seq[:, fed:length], kv_cache=cache)
            fed = length
        logits = logits[:, -1, :]
        if vocab_limit is not None and vocab_limit < logits.size(-1):
            logits[:, vocab_limit:] = float("-inf")
        history = seq[:, :length] if repetition_penalty != 1.0 else None
        token = sample_next(logits, history, temperature, top_k, top_p, repetition_penalty, generator)
        if length == seq.size(1):
            seq = torch.cat([seq, torch.empty_like(seq)], dim=1)
        seq[:, length] = token
        length += 1
        yield token


# ----------------------------------------------------------------------------------------------------------------
# 4. Loading OpenAI GPT-2 / Hugging Face GPT-2 weights
#
# init_from names a Hugging Face GPT-2 checkpoint: 'gpt2' .. 'gpt2-xl', any Hub repo id of a GPT-2 model, or a local
# directory with config.json + model.safetensors (or pytorch_model.bin, or their sharded *.index.json forms). Files
# come through huggingface_hub (its cache; HF_HUB_OFFLINE=1 honoured); transformers is not needed. Hugging Face
# stores the attention and MLP matmuls as Conv1D, (in, out): they are transposed into our nn.Linear (out, in).

OPENAI_GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GPT2_VOCAB_SIZE = 50257
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
PRETRAINED_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias")  # fixed by the weights
PRETRAINED_TUNABLE_KEYS = ("dropout", "block_size", "flash")  # may differ from the checkpoint (block_size: crop)
INIT_FROM_HELP = (f"init_from takes 'scratch', 'resume', a GPT-2 name ({', '.join(OPENAI_GPT2)}), a Hugging Face "
                  f"repo id, or a local Hugging Face GPT-2 checkpoint directory")


class PretrainedError(RuntimeError):
    """A pretrained checkpoint that cannot be found or used; the message says what was tried and what to do."""


@dataclass
class PretrainedFiles:
    source: str  # for messages: "directory 'x'" or "Hub repo 'gpt2'"
    config: str  # path of config.json
    weights: list  # paths of the weight files (several when sharded)


def _local_help(name="gpt2"):
    local = f"{name.split('/')[-1]}-local"
    files = " config.json model.safetensors" if name in OPENAI_GPT2 else ""  # not the TF / Flax / ONNX copies
    return (f"To work offline, point init_from at a local directory holding config.json + model.safetensors, e.g. "
            f"made on a machine with internet by `hf download {name}{files} --local-dir {local}` (then "
            f"--init_from=/path/to/{local})")


def _weight_files(folder, source, exists=os.path.isfile):
    """The weight files of a checkpoint folder (all shards when there is an index), or None when there are none."""
    for name in HF_WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not exists(path):
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            with open(path) as f:
                shards = list(dict.fromkeys(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise PretrainedError(f"{source}: unreadable {name} ({type(e).__name__}: {e})") from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise PretrainedError(f"{source}: {name} lists shards that are missing: {', '.join(missing[:3])}")
        return [os.path.join(folder, s) for s in shards]
    return None


def _resolve_local(folder):
    source = f"directory {folder!r}"
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise PretrainedError(f"{source} has no config.json: expected a Hugging Face GPT-2 checkpoint (config.json + "
                              f"model.safetensors or pytorch_model.bin), as written by save_pretrained() or export.py")
    weights = _weight_files(folder, source)
    if weights is None:
        raise PretrainedError(f"{source} has config.json but no weights: expected one of {', '.join(HF_WEIGHT_FILES)}")
    return PretrainedFiles(source, os.path.join(folder, "config.json"), weights)


def _resolve_hub(name):
    """Download (or find in the huggingface_hub cache) config.json and the weights of a Hub repo."""
    import logging
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    offline = bool(constants.HF_HUB_OFFLINE)
    candidates = [name] + ([f"openai-community/{name}"] if name in OPENAI_GPT2 else [])  # the cache may hold either
    tried, local_only = [], offline
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # no page of retry warnings when the network is down: we explain below
    try:
        for repo in candidates:
            def fetch(filename):
                return hf_hub_download(repo, filename, local_files_only=local_only)
            try:
                config = fetch("config.json")
                weights = None
                for filename in HF_WEIGHT_FILES:
                    try:
                        path = fetch(filename)
                    except EntryNotFoundError:  # not in this repo (or not cached): try the next format
                        continue
                    if filename.endswith(".index.json"):
                        with open(path) as f:
                            shards = list(dict.fromkeys(json.load(f)["weight_map"].values()))
                        weights = [fetch(shard) for shard in shards]
                    else:
                        weights = [path]
                    break
                if weights is None:
                    tried.append(f"Hub repo {repo!r}: config.json but no {' / '.join(HF_WEIGHT_FILES)}"
                                 + (" in the local cache" if local_only else ""))
                    continue
                return PretrainedFiles(f"Hub repo {repo!r}", config, weights)
            except HFValidationError:
                tried.append(f"{repo!r} is neither a local directory nor a valid Hub repo id")
            except RepositoryNotFoundError:
                tried.append(f"Hub repo {repo!r} does not exist (or is private: log in with `hf auth login`)")
            except LocalEntryNotFoundError:
                why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
                tried.append(f"Hub repo {repo!r}: not in the Hugging Face cache and {why}")
                local_only = True  # one network timeout is enough: look only in the cache from now on
            except EntryNotFoundError:
                tried.append(f"Hub repo {repo!r} has no config.json: not a transformers model")
            except Exception as e:  # gated repos, HTTP errors, disk full, ...: keep it to one line
                tried.append(f"Hub repo {repo!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        hub_logger.setLevel(level)
    known = name in OPENAI_GPT2 or "/" in name
    raise PretrainedError(f"could not load pretrained model {name!r}. Tried: {'; '.join(tried)}. "
                          f"{_local_help(name if known else 'gpt2')}" + ("" if known else f". {INIT_FROM_HELP}"))


def resolve_pretrained(name_or_dir):
    """PretrainedFiles for a local checkpoint directory, a Hub repo id, or one of OPENAI_GPT2."""
    name = str(name_or_dir)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return _resolve_local(path)
    if os.path.exists(path):
        raise PretrainedError(f"init_from {name!r} is a file: pass the directory that holds config.json and the "
                              f"weights, not the file itself")
    looks_like_path = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
    if looks_like_path:
        raise PretrainedError(f"no such directory: {name!r}. {INIT_FROM_HELP}")
    return _resolve_hub(name)


def pretrained_config(files, overrides=None):
    """GPTConfig of a Hugging Face GPT-2 checkpoint, checked for what our GPT implements.

    overrides: dropout / flash replace the checkpoint's; block_size crops the position embeddings; n_layer, n_head,
    n_embd, vocab_size, bias must equal the checkpoint's (a pretrained model's shape cannot change)."""
    try:
        with open(files.config) as f:
            hf = json.load(f)
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{files.source}: unreadable config.json ({type(e).__name__}: {e})") from None
    src = files.source
    if hf.get("model_type") != "gpt2":
        raise PretrainedError(f"{src}: config.json has model_type {hf.get('model_type')!r}, not 'gpt2': only GPT-2 "
                              f"checkpoints can be loaded into this model")
    try:
        n_layer, n_head, n_embd = int(hf["n_layer"]), int(hf["n_head"]), int(hf["n_embd"])
        n_positions, vocab_size = int(hf.get("n_positions", hf.get("n_ctx", 1024))), int(hf.get("vocab_size", 50257))
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{src}: config.json lacks a usable {e}: not a GPT-2 config") from None
    unsupported = {  # settings of transformers' GPT2 that our GPT does not implement
        "activation_function": (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": hf.get("n_inner") in (None, 4 * n_embd),
        "layer_norm_epsilon": abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12,
        "scale_attn_weights": hf.get("scale_attn_weights", True) is True,
        "scale_attn_by_inverse_layer_idx": not hf.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": not hf.get("add_cross_attention", False),
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is True,
    }
    bad = [f"{k}={hf.get(k)!r}" for k, ok in unsupported.items() if not ok]
    if bad:
        raise PretrainedError(f"{src}: config.json sets {', '.join(bad)}, which this GPT-2 implementation does not "
                              f"support")
    if vocab_size != GPT2_VOCAB_SIZE:
        raise PretrainedError(f"{src}: vocab_size {vocab_size}, not GPT-2's {GPT2_VOCAB_SIZE}: the model must use "
                              f"the GPT-2 tokenizer this project encodes data with")
    config = GPTConfig(block_size=n_positions, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       dropout=0.0, bias=True)
    for key, value in (overrides or {}).items():
        if key in PRETRAINED_SHAPE_KEYS:
            if value != getattr(config, key):
                raise PretrainedError(f"{key}={value!r} was requested but {src} has {key}={getattr(config, key)!r}: "
                                      f"a pretrained model's shape is fixed; drop --{key} (or use --init_from=scratch)")
        elif key == "block_size":
            if value > n_positions:
                raise PretrainedError(f"block_size {value} exceeds the {n_positions} positions {src} was trained "
                                      f"with: use --block_size={n_positions} or less")
            config.block_size = value
        elif key in PRETRAINED_TUNABLE_KEYS:
            setattr(config, key, value)
        else:
            raise PretrainedError(f"cannot override {key!r} of a pretrained model")
    return config


def _hf_tensors(path):
    """Yield (name, tensor) from one weight file, one tensor at a time (memory-mapped: never a second full copy)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # the legacy (pre-zip) format cannot be mapped: read it whole
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)
    while state:
        name = next(iter(state))
        yield name, state.pop(name)


def load_pretrained_weights(model, files):
    """Copy a Hugging Face GPT-2 state into model's parameters tensor by tensor; every parameter must be filled."""
    params = dict(model.named_parameters())  # the tied head appears once, as transformer.wte.weight
    loaded = set()
    block_size = model.config.block_size
    with torch.no_grad():
        for path in files.weights:
            try:
                for hf_name, tensor in _hf_tensors(path):
                    name = hf_name[len("transformer."):] if hf_name.startswith("transformer.") else hf_name
                    if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                        continue  # causal-mask buffers of old checkpoints; the head is tied to wte
                    name = f"transformer.{name}"
                    if name not in params:
                        raise PretrainedError(f"{files.source}: unexpected tensor {hf_name!r}: not a GPT2LMHeadModel "
                                              f"checkpoint this model can load")
                    if name.endswith(HF_CONV1D):
                        tensor = tensor.t()
                    elif name == "transformer.wpe.weight":
                        tensor = tensor[:block_size]  # crop the position embeddings to a smaller block_size
                    if tensor.shape != params[name].shape:
                        raise PretrainedError(f"{files.source}: {hf_name} has shape {tuple(tensor.shape)}, expected "
                                              f"{tuple(params[name].shape)}")
                    params[name].copy_(tensor)
                    loaded.add(name)
            except PretrainedError:
                raise
            except Exception as e:
                raise PretrainedError(f"{files.source}: could not read {os.path.basename(path)} "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    missing = sorted(set(params) - loaded)
    if missing:
        raise PretrainedError(f"{files.source}: the weights lack {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    return model


def from_pretrained(name_or_dir, overrides=None):
    """A GPT holding Hugging Face GPT-2 weights (see resolve_pretrained and pretrained_config), on the CPU.

    The model is built on the meta device and filled from the memory-mapped file tensor by tensor, so loading holds
    one copy of the weights (plus one tensor), and no time goes into a random initialisation that is overwritten."""
    files = name_or_dir if isinstance(name_or_dir, PretrainedFiles) else resolve_pretrained(name_or_dir)
    config = pretrained_config(files, overrides)
    with torch.device("meta"):
        model = GPT(config)
    assert not list(model.buffers()), "GPT gained buffers: from_pretrained must initialise them"
    model.to_empty(device="cpu")
    model.transformer.wte.weight = model.lm_head.weight  # to_empty unties the shared parameter
    return load_pretrained_weights(model, files)


# ----------------------------------------------------------------------------------------------------------------
# 5. Checkpoints and devices

CKPT_PATTERN = re.compile(r"^finetuned_(\d{8}_\d{6})(_last)?\.pt$")


def save_checkpoint(path, ckpt):
    """Write atomically (temp file + rename): a crash mid-save never leaves a torn or truncated checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from None


def find_checkpoint(out_dir, last=False):
    """The newest run's best checkpoint in out_dir (or its latest state with last=True)."""
    runs = sorted(m.group(1) for m in map(CKPT_PATTERN.match, os.listdir(out_dir) if os.path.isdir(out_dir) else [])
                  if m and bool(m.group(2)) == last)
    if not runs:
        kind = "finetuned_YYYYMMDD_HHMMSS_last.pt" if last else "finetuned_YYYYMMDD_HHMMSS.pt"
        raise FileNotFoundError(f"no checkpoint {kind} in {out_dir!r}: train first, or pass --ckpt=PATH")
    return os.path.join(out_dir, f"finetuned_{runs[-1]}{'_last' if last else ''}.pt")


def clean_state_dict(state_dict):
    """Drop wrappers' prefixes (torch.compile's _orig_mod., DDP's module.) so any state dict loads into GPT."""
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in state_dict.items()}


def model_from_checkpoint(ckpt, device="cpu", **overrides):
    config = GPTConfig.from_dict({**ckpt["model_args"], **overrides})
    model = GPT(config)
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    return model.to(device)


def resolve_device(device):
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype, device, training=False):
    """'auto': bf16 on CUDA where supported, else fp16 (with a GradScaler); fp32 on MPS. On CPU: bf16 autocast for
    training where the CPU has bf16 matmul instructions (fp32 master weights; ~3x the fp32 speed with the same loss
    curve, README "Training speed"), else fp32; inference on CPU stays fp32."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "cpu" and training and cpu_has_bf16():
        return "bfloat16"
    return "float32"


def cpu_has_bf16():
    """True when this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX): there bf16 matmuls beat fp32 ones.
    Elsewhere PyTorch emulates them, slower than fp32."""
    check = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(c is not None for c in check):
        return any(c() for c in check)
    try:  # older torch: ask the kernel
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def autocast(device, dtype):
    """Mixed-precision context for the forward pass; a no-op in fp32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))
