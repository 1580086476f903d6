"""A GPT-2 compatible transformer in one file, read top to bottom: GPTConfig, then the modules
(LayerNorm, Linear, CausalSelfAttention, MLP, Block), the fused LM-head loss, and GPT with its
optimizer groups and FLOP count.

Generation and its KV cache live in engine.py, Hugging Face weights in
hf_gpt2.py, checkpoints in checkpoint.py.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024
    # GPT-2's 50257 padded up to a multiple of 64 for speed; OpenAI weights use 50257
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers, like GPT-2
    # attention through F.scaled_dot_product_attention; False = the manual masked softmax
    flash: bool = True

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False
    before 2.1 and we keep the GPT-2 names)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) with a faster CPU path for the few rows that
    cached generation multiplies: for, say, 8 rows MKL's x @ W.T repacks the whole weight at every
    call, while W @ x.T streams it once (docs/performance.md). Beyond PACKED_ROWS rows without a
    gradient (a batch of decoded rows: serve.py, bench.py's batch 8), and for any rows with bf16
    weights, oneDNN's matmul over a copy of the weight laid out for it once (packed_weight: at most
    one extra copy per Linear) beats both (docs/performance.md#batched-decoding). Training and prompts (many rows) take F.linear. After
    quantize(), an int8 weight with per-channel scales (int8_matmul)."""

    FEW_ROWS = 16
    PACKED_ROWS = 2
    _packed = None  # (the weight's storage, version and dtype, its oneDNN copy)
    # GPT.to_half(upcast=True): half-precision weights multiplied in fp32 beyond FEW_ROWS rows
    upcast = False

    def forward(self, x):
        if self.weight.dtype == torch.int8:
            return self._int8_forward(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != self.weight.dtype and not autocast:
            # half-precision weights (GPT.to_half) under the fp32 residual stream
            x = x.to(self.weight.dtype)
        rows = x.numel() // max(1, x.size(-1))
        if self.upcast and rows > self.FEW_ROWS:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        if x.device.type != "cpu" or not 0 < rows <= self.FEW_ROWS:
            return F.linear(x, self.weight, self.bias)
        fp32 = self.weight.dtype == torch.float32  # bf16 gains for any rows, fp32 from 3
        if ((rows > self.PACKED_ROWS or not fp32)
                and not (torch.is_grad_enabled() or autocast or self.upcast)):
            packed = self.packed_weight()
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        columns = x.reshape(rows, x.size(-1)).t()
        out = (self.weight @ columns if self.bias is None
               else torch.addmm(self.bias[:, None], self.weight, columns))
        return out.t().contiguous().view(*x.shape[:-1], self.out_features)

    def packed_weight(self):
        """The weight laid out for oneDNN's matmul, made again only when the weight changed (None
        without oneDNN)."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype)
        if self._packed is None or self._packed[0] != key:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(),
                                                                 self.FEW_ROWS)
            except (AttributeError, RuntimeError):  # a build without oneDNN
                packed = None
            self._packed = (key, packed)
        return self._packed[1]

    def __getstate__(self):  # copy.deepcopy, pickle: the oneDNN copy has no storage to copy
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}

    def quantize(self, keep_dense=False):
        """The weight in int8 with a bf16 scale per output channel (quantize_int8), the bias in
        bf16: what GPT.to_half(torch.int8) does to every Linear. The Parameter keeps its identity,
        so the tied embedding (wte) shares the int8 weight. keep_dense: the fp32 weight stays too
        (the LM head's: dense_weight's rows, a few per token, are then exact)."""
        if self.weight.dtype == torch.int8:
            return
        if keep_dense:
            self.register_buffer("dense", self.weight.detach().float().clone(), persistent=False)
        weight, scales = quantize_int8(self.weight.detach())
        self._packed = None
        self.weight.requires_grad_(False)
        self.weight.data = weight
        self.register_buffer("scales", scales)
        if self.bias is not None:
            self.bias.data = self.bias.data.to(scales.dtype)

    def _int8_forward(self, x):
        """x @ (weight * scales).T + bias in bf16, whatever the number of rows."""
        rows = x.to(self.scales.dtype).reshape(-1, x.size(-1))
        out = int8_matmul(rows, self.weight, self.scales)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def dense_weight(self, rows=None):
        """The weight (or its rows `rows`, a tensor of indices) as a floating-point tensor: itself,
        or dequantised to fp32 where int8 (the tied embedding's lookup, the LM head's refined
        logits and its loss; quantize(keep_dense=True) kept the fp32 weight: that)."""
        if getattr(self, "dense", None) is not None:
            return self.dense if rows is None else self.dense[rows]
        weight = self.weight if rows is None else self.weight[rows]
        if weight.dtype != torch.int8:
            return weight
        scales = self.scales if rows is None else self.scales[rows]
        return weight.float() * scales.float().unsqueeze(-1)


def quantize_int8(weight):
    """(int8 weight, bf16 scales) of a (out, in) weight: symmetric, one scale per output channel
    (its largest magnitude maps to 127). The scale is rounded to bf16 before the weights are
    divided by it, so that weight * scale is what the bf16 kernel multiplies."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    quantized = torch.round(weight / scales.float().unsqueeze(1)).clamp(-127, 127)
    return quantized.to(torch.int8), scales


# device types where torch._weight_int8pack_mm is missing (or refuses these shapes and dtypes)
_NO_INT8_KERNEL = set()


def int8_matmul(x, weight, scales):
    """x (M, K) @ (weight * scales[:, None]).T for an int8 weight (N, K), in x's dtype: torch's
    int8 weight-only kernel (which reads the int8 bytes, not a dequantised copy), else
    int8_matmul_dense."""
    device = x.device.type
    if device not in _NO_INT8_KERNEL:
        try:
            return torch._weight_int8pack_mm(x, weight, scales)
        except (RuntimeError, NotImplementedError):
            _NO_INT8_KERNEL.add(device)
    return int8_matmul_dense(x, weight, scales)


def int8_matmul_dense(x, weight, scales):
    """int8_matmul where the kernel is missing: the weight converted to x's dtype for each call,
    the scales applied to the (M, N) product, not to the weight."""
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.layer = layer  # its index among the blocks: where its keys and values go in a KV cache
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout, self.flash = (config.n_head, config.n_embd,
                                                              config.dropout, config.flash)

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # q, k, v: (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # None: causal among these T tokens, the only keys (with T = 1: the one key, or all cached)
        mask = None
        # append the new keys/values, attend over all the row's cached ones
        if kv_cache is not None:
            # mask: True = visible (None: all / causal); q in the cache's dtype (fp32 on CPU)
            k, v, mask = kv_cache.append(self.layer, k, v)
            if k.dtype != q.dtype:
                with torch.autocast(x.device.type, enabled=False):
                    return self.resid_dropout(self.c_proj(self._attend(q.to(k.dtype), k, v, mask)))
        return self.resid_dropout(self.c_proj(self._attend(q, k, v, mask)))

    def _attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(hs)) v over the heads (B, nh, T, hs), mask None: causal (all keys
        for T = 1); re-joined: (B, T, C)."""
        B, _, T, _ = q.shape
        if self.flash:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=(mask is None and T > 1))
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if mask is None and T > 1:
                mask = causal_mask(T, T, q.device)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        return y.transpose(1, 2).contiguous().view(B, T, self.n_embd)


def causal_mask(n_query, n_key, device):
    """Boolean (n_query, n_key) mask, True where attention is allowed;
    queries are the last n_query positions."""
    return torch.ones(n_query, n_key, dtype=torch.bool,
                      device=device).tril(diagonal=n_key - n_query)


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
    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


# the largest half-precision logits computed again in fp32 (GPT.logits): enough
# to hold every token that rounding could have put ahead of the true top one
REFINE_TOP = 16

# rows of logits turned into gradients at a time: as fast as 8 rows (which fit a core's L2) on an
# idle CPU, and fewer parallel regions, each of which can stall when other processes share the cores
HEAD_CHUNK = 32


class _HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the LM head, x @ weight.T, without (N, V)
    fp32 logits and their gradient in memory.

    The logits' gradient, softmax - onehot, is formed in the forward pass a few rows at a time while
    they are in cache, and written over the logits: backward is then just its two matmuls (which
    also apply the 1/N). The same math as F.cross_entropy (fp32 log-softmax), but on CPU the
    vocabulary-sized passes of cross_entropy, its backward and the .float() copies cost more than
    the head's matmuls; this halves them (docs/performance.md). Two vocabulary-sized ops per chunk:
    each is a parallel region, and with other processes on the cores every one can wait for a
    descheduled thread."""

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
                # p - 1 from fp32, not from rounded p
                part.scatter_(1, t, (logp_t.exp() - 1).to(part.dtype))
        ctx.save_for_backward(x, weight, logits)
        ctx.n = max(len(x), 1)
        return losses.sum() / ctx.n

    @staticmethod
    def backward(ctx, grad):
        x, weight, grad_logits = ctx.saved_tensors
        scale = grad / ctx.n
        # a frozen head (LoRA, trainable_layers) skips its (V, C) gradient: a third of its matmuls
        grad_weight = (grad_logits.t() @ x).mul_(scale) if ctx.needs_input_grad[1] else None
        grad_x = (grad_logits @ weight).mul_(scale) if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, None, None


# torch.compiler.disable imports torch._dynamo where it decorates, ~2 s at the start of every script
# (sample.py, serve.py); torch's own lazy variant (what its optimizers use) imports it at the first
# call, in training only
_disable_compile = getattr(torch, "_disable_dynamo", torch.compiler.disable)


# a Python loop over a data-dependent row count: compiling it would only recompile
@_disable_compile
def head_loss(x, weight, targets):
    """Mean cross-entropy of logits x @ weight.T (N, V) against
    targets (N,), in the autocast dtype if on."""
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
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings, as in GPT-2
        # recompute each block's activations in backward, not keep them (--grad_checkpointing)
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def init_token_rows(self, ids, n_real):
        """Rows `ids` of the tied token embedding / LM head (new tokens) set to the mean of rows
        0..n_real-1 (the real vocabulary's), the vocabulary grown first when an id does not fit
        (padded to a multiple of 64; every new row starts from the same mean)."""
        weight = self.lm_head.weight
        mean = weight[:n_real].float().mean(0).to(weight.dtype)
        size = -(-(max(ids) + 1) // 64) * 64
        if size > weight.size(0):
            grown = torch.cat([weight.detach(), mean.expand(size - weight.size(0), -1)])
            self.lm_head.weight = nn.Parameter(grown, requires_grad=weight.requires_grad)
            self.transformer.wte.weight = self.lm_head.weight  # tied, as in __init__
            self.lm_head.out_features = self.transformer.wte.num_embeddings = size
            self.config.vocab_size = size
        self.lm_head.weight[list(ids)] = mean

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are excluded by
        default (the token ones are tied to the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, loss_mask=None, kv_cache=None, all_logits=False):
        """idx (B, T) token ids. Returns (logits, loss).

        With targets: (None, loss), the mean cross-entropy over the positions where loss_mask is 1
        (token-weighted; targets of -1 are ignored too; an all-masked batch gives loss 0, not NaN).
        Without targets: (logits, None), for the last position only (what generation needs) unless
        all_logits.
        kv_cache: see hidden_states.
        """
        B, T = idx.size()
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return self.logits(x if all_logits else x[:, [-1], :]), None
        return None, self._masked_loss(x.reshape(B * T, -1), targets.reshape(-1), loss_mask)

    def hidden_states(self, idx, kv_cache=None):
        """The final-LayerNorm hidden state of every position of idx (B, T): (B, T, n_embd).
        kv_cache: an engine.KVCache; idx continues its rows (each at its own length) by T tokens."""
        T = idx.size(1)
        if kv_cache is not None:
            pos = kv_cache.positions(T)  # (B, T): each row's next positions
        elif T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        else:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        wte = self.transformer.wte
        # an int8 wte is the LM head's weight (to_half quantises Linears, and it is tied)
        tokens = self.lm_head.dense_weight(idx) if wte.weight.dtype == torch.int8 else wte(idx)
        x = self.transformer.drop(tokens + self.transformer.wpe(pos))
        for block in self.transformer.h:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # keeps x only; dropout masks are replayed exactly
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache)
        return self.transformer.ln_f(x)

    def logits(self, x):
        """The LM head's logits for hidden states x (..., C), in fp32 whenever the head runs in half
        precision (to_half, autocast). There the matmul's sums are rounded to bf16, whose steps can
        exceed the gap between the top two tokens, so greedy decoding would flip on rounding: the
        REFINE_TOP largest are computed again in fp32 from the same weights, which settles the top
        token (and top-k / top-p's candidates) as fp32 arithmetic would; the rest keep their small
        rounding (figures: docs/inference.md#half-precision)."""
        logits = self.lm_head(x)
        if logits.dtype == torch.float32:
            return logits
        logits = logits.float()
        with torch.autocast(x.device.type, enabled=False):
            top = logits.topk(min(REFINE_TOP, logits.size(-1)), dim=-1).indices  # (..., k)
            rows = self.lm_head.dense_weight(top).float()  # (..., k, C)
            exact = (rows @ x.float().unsqueeze(-1)).squeeze(-1)
        return logits.scatter_(-1, top, exact)

    def to_half(self, dtype, upcast=False):
        """Weights for inference at the memory limit (batch-1 decoding reads every weight once per
        token): the matmul weights (the blocks' Linears and the tied embedding / LM head) in dtype
        (torch.bfloat16 / float16), and with them the attention and its KV cache. The residual
        stream, the norms and the position embeddings stay fp32 (Linear casts its input, a few
        (B, C) casts per layer): adding each block's rounded output to a bf16 residual would
        compound the rounding over the layers.

        upcast: for a CPU that multiplies half-precision numbers in software, where decoding one
        sequence gains from reading half the bytes but a compute-bound prompt loses: beyond FEW_ROWS
        rows each weight is converted to fp32 and multiplied there. A few rows (a batch of decoded
        sequences) stay in half precision, since converting every weight at every step costs more
        than it saves. Figures: docs/inference.md and docs/performance.md.

        dtype torch.int8: the same, with each Linear's weight in int8 and a bf16 scale per output
        channel (Linear.quantize), multiplied in bf16: a quarter of fp32's bytes per token. The LM
        head keeps its fp32 weight beside (a few rows per token: the embedding lookup and the
        refined top logits), since its rounding is what flips most greedy tokens."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if dtype == torch.int8:
                    module.quantize(keep_dense=module is self.lm_head)
                else:
                    module.to(dtype)
                    module._packed = None  # a copy of the fp32 weight, if any
                if upcast:
                    module.upcast = True
        return self

    def _masked_loss(self, x, targets, loss_mask):
        keep = targets != -1
        if loss_mask is not None:
            keep &= loss_mask.reshape(-1) > 0
        if not x.is_cuda:
            # run the head only where the loss looks: exact, and most of a small model's cost in
            # chat data. On CUDA the boolean index would cost a host sync every step, which is worth
            # more than the saved FLOPs.
            rows = keep.nonzero().squeeze(1)
            x, targets, keep = x[rows], targets[rows], keep[rows]
            if x.device.type == "cpu":
                return head_loss(x, self.lm_head.dense_weight(), targets)
        losses = F.cross_entropy(self.lm_head(x).float(), targets.clamp(min=0), reduction="none")
        keep = keep.float()
        return (losses * keep).sum() / keep.sum().clamp(min=1.0)

    def crop_block_size(self, block_size):
        """Use a smaller context than the weights were trained with
        (e.g. GPT-2's 1024 -> 256 to fine-tune)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on 2-D weights (matmuls,
        embeddings) only; biases and norms are not decayed."""
        params = [p for p in self.parameters() if p.requires_grad]
        # a weight that trains only some rows (lora.train_rows) is not decayed: decay would move
        # the frozen ones
        rows_only = self.lm_head.weight if getattr(self, "trained_rows", None) else None
        decayed = [p for p in params if p.dim() >= 2 and p is not rows_only]
        groups = [
            {"params": decayed, "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2 or p is rows_only], "weight_decay": 0.0},
        ]
        # fused: one pass that reads and writes each parameter once, instead of ~7 elementwise
        # passes per tensor on CPU (docs/performance.md) or a kernel launch each on CUDA
        # the devices torch >= 2.4 has the fused AdamW for
        fused = device_type in ("cuda", "cpu", "mps", "xpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T,
        the output head counted on every token (train_flops counts what a step runs)."""
        return self.train_flops(1, seq_len or self.config.block_size, 1)

    def train_flops(self, tokens, seq_len, head_tokens):
        """Training FLOPs (forward + backward) of `tokens` tokens in sequences of seq_len (a mean is
        fine), the output head run on head_tokens of them: 2 per weight and token forward, 2
        backward for the input gradient and 2 for the weight's own (matmul_weights), 4 * L * C * T
        per token for attention forward and 8 backward (PaLM appendix B: 6N + 12 * L * H * Q * T in
        all). A frozen weight (LoRA, trainable_layers) has no weight gradient, and below the lowest
        block that trains nothing runs backward at all."""
        cfg = self.config
        body, head = self.matmul_weights()
        frozen_body, head_trains = self._frozen_weights()
        trains = [any(p.requires_grad for p in block.parameters()) for block in self.transformer.h]
        # backward stops below this block
        first = trains.index(True) if any(trains) else cfg.n_layer
        below = sum(p.numel() for block in self.transformer.h[:first] for p in block.parameters())
        attention = 4 * cfg.n_embd * seq_len  # a layer's, forward, per token
        forward = 2 * body * tokens + 2 * head * head_tokens + attention * cfg.n_layer * tokens
        input_grads = (2 * (body - below) * tokens + 2 * head * head_tokens
                       + 2 * attention * (cfg.n_layer - first) * tokens)
        weight_grads = (2 * (body - frozen_body) * tokens
                        + (2 * head * head_tokens if head_trains else 0))
        return forward + input_grads + weight_grads

    def _frozen_weights(self):
        """(frozen weights among matmul_weights' body, whether the output head trains)."""
        head = self.head_weight()
        skip = {id(self.transformer.wpe.weight), id(self.transformer.wte.weight), id(head)}
        frozen = sum(p.numel() for p in self.parameters()
                     if not p.requires_grad and id(p) not in skip)
        return frozen, head.requires_grad

    def head_weight(self):
        """The output head's weight (the LM head, tied to wte)."""
        return self.lm_head.weight

    def matmul_weights(self):
        """(weights every token runs through, the output head's): the LM head is wte (tied),
        which counts once, as a matmul; biases and norms count like nanoGPT's 6N."""
        head = self.lm_head.weight.numel()
        return self.get_num_params() - head, head
