"""Generation: the one engine that sample.py, eval.py, train.py's eval-time sample reply and a server call.

1. KVCache: the explicit inference state, so each generated token costs one position's work.
2. SamplingParams: temperature, top-k, top-p, repetition penalty, length, stop strings and seed, validated once.
3. adjust_logits / sample_next / generate: token-level sampling, streaming one token per row and step.
4. Engine: a model with its tokenizer, device and dtype; batched replies that stop per row on <|endoftext|> or a
   stop string (which may span several tokens) and stream their text as it becomes final.
"""
from dataclasses import dataclass, field

import torch

from . import chat
from .checkpoint import load_model
from .device import autocast, resolve_device, resolve_dtype
from .errors import ConfigError


# ----------------------------------------------------------------------------------------------------------------
# 1. KV cache: the inference state, kept explicit


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
    """One LayerKVCache per transformer block; GPT.forward(idx, kv_cache=...) appends to it."""

    def __init__(self, config):
        self.layers = [LayerKVCache(config.block_size) for _ in range(config.n_layer)]

    @property
    def length(self):
        return self.layers[0].length

    def reset(self):
        for layer in self.layers:
            layer.length = 0


# ----------------------------------------------------------------------------------------------------------------
# 2. Sampling parameters


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Checked once, here, with the option's name in the error."""
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens; None or 0 = off
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p; 1 = off
    repetition_penalty: float = 1.0  # CTRL / transformers; 1 = off
    max_new_tokens: int = 150
    stop: tuple = field(default=())  # strings that end a reply (cut off); <|endoftext|> always ends one
    seed: int | None = None  # a fixed seed makes sampling reproducible

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 or None = off), got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise ConfigError(f"top_p must be between 0 and 1, got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        object.__setattr__(self, "top_k", self.top_k or None)

    def generator(self, device="cpu"):
        """A torch.Generator seeded with seed, or None (the global RNG) when there is no seed."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


# ----------------------------------------------------------------------------------------------------------------
# 3. Token-level sampling and generation


def adjust_logits(logits, params, history=None):
    """The float32 logits (B, V) sampling draws from, in transformers' order: repetition penalty, temperature,
    top-k, top-p; filtered tokens are -inf. With temperature 0 only the penalty applies (greedy takes the argmax).

    history (B, L): the tokens the penalty applies to. repetition_penalty follows CTRL / transformers: a seen
    token's logit is divided by the penalty when positive and multiplied by it when negative."""
    logits = logits.float()
    penalty = params.repetition_penalty
    if penalty != 1.0 and history is not None:
        seen = logits.gather(1, history)
        logits = logits.scatter(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p  # the mass before this token is already enough
        drop_sorted[:, 0] = False  # the most likely token always stays (top_p=0 is greedy, not an empty set)
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def sample_next(logits, params, history=None, generator=None):
    """Pick the next token per row from logits (B, V): greedy when temperature is 0, else a draw from
    adjust_logits' distribution (with generator, so a seed makes it reproducible)."""
    logits = adjust_logits(logits, params, history)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def crop_start(length, start, block_size):
    """Where the context window starts. When it would exceed block_size, drop the oldest tokens so that 3/4 of
    the window is kept; cached and uncached generation share this so both see exactly the same context."""
    if length - start > block_size:
        start = length - max(1, block_size - block_size // 4)
    return start


@torch.inference_mode()
def generate(model, idx, params, use_cache=True, generator=None, vocab_limit=None):
    """Yield the next token of every row, (B,), once per step, for params.max_new_tokens steps.

    idx (B, T): the prompt (rows generated as one batch). The caller decides when a row is done and may simply
    stop iterating. vocab_limit: never sample ids at or above it (the padded part of the embedding).
    With use_cache each step runs the model on the new token only; without, on the whole window. Both crop the
    context the same way (crop_start) and give the same tokens."""
    B, T = idx.shape
    if T == 0:
        raise ConfigError("empty prompt: generation needs at least one token to start from")
    block_size = model.config.block_size
    cache = KVCache(model.config) if use_cache else None
    seq = idx.new_empty(B, T + min(params.max_new_tokens, 1024))  # filled in place, grown by doubling
    seq[:, :T] = idx
    length, start, fed = T, 0, 0  # fed: how many tokens of seq the cache holds
    for _ in range(params.max_new_tokens):
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
        history = seq[:, :length] if params.repetition_penalty != 1.0 else None
        token = sample_next(logits, params, history, generator)
        if length == seq.size(1):
            seq = torch.cat([seq, torch.empty_like(seq)], dim=1)
        seq[:, length] = token
        length += 1
        yield token


# ----------------------------------------------------------------------------------------------------------------
# 4. Replies: text, stop strings and streaming


def held_back(text, stops):
    """Length of text that can be shown while streaming: hold back a tail that may be the start of a stop string
    and an incomplete multi-byte character (decoded as U+FFFD until its last byte arrives)."""
    end = len(text.rstrip("\ufffd"))
    keep = end
    for stop in stops:  # the longest proper prefix of each stop that the (complete) text ends with
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:n], 0, end):
                keep = min(keep, end - n)
                break
    return keep


class Completion:
    """One row of a batch: its tokens, its text (cut at the first stop string), how much of it was streamed, and
    why it ended: "stop" (<|endoftext|> or a stop string) or "length" (out of tokens)."""

    def __init__(self, enc, stops):
        self.enc, self.stops = enc, stops
        self.tokens, self.text, self.finish_reason, self.shown = [], "", None, 0

    @property
    def done(self):
        return self.finish_reason is not None

    def add(self, token):
        if token == chat.EOT:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        self.text = self.enc.decode(self.tokens)  # whole-text decode: merges multi-byte characters split over tokens
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.finish_reason = self.text[:min(cuts)], "stop"

    def new_text(self, final=False):
        """The text that became final since the last call. Leading whitespace is never shown (replies are
        returned stripped and start with the space after `Assistant:`)."""
        visible = len(self.text) if self.done or final else held_back(self.text, self.stops)
        start = max(self.shown, len(self.text) - len(self.text.lstrip()))
        if visible <= start:
            return ""
        self.shown = visible
        return self.text[start:visible]


class Engine:
    """A model ready to generate: its tokenizer, device and compute dtype (autocast). The per-call state (the KV
    cache, the rows' text) lives in each call, so one engine serves any number of calls."""

    def __init__(self, model, enc=None, device="cpu", dtype="float32", use_cache=True):
        self.model, self.device, self.dtype, self.use_cache = model, device, dtype, use_cache
        self.enc = enc or chat.get_encoder()

    def complete_batch(self, prompts, params, on_text=None, generator=None, cancelled=None):
        """One Completion per prompt, generated as one batch (the prompts must have the same length: there is no
        padding). Each row stops on its own at <|endoftext|> or at the first of params.stop, which is cut off.
        on_text(row, new_text) streams text as it becomes final. generator: defaults to params.generator().
        cancelled(): checked after every step; True ends the batch there (a server whose clients all left)."""
        if not prompts or len({len(p) for p in prompts}) != 1 or not prompts[0]:
            raise ConfigError("generation needs non-empty prompts of one length")
        generator = generator if generator is not None else params.generator(self.device)
        rows = [Completion(self.enc, params.stop) for _ in prompts]
        idx = torch.tensor(prompts, dtype=torch.long, device=self.device)
        was_training = self.model.training
        self.model.eval()
        steps = generate(self.model, idx, params, self.use_cache, generator, vocab_limit=chat.VOCAB_SIZE)
        try:
            with autocast(self.device, self.dtype):
                for step in steps:
                    for i, (row, token) in enumerate(zip(rows, step.tolist())):
                        if not row.done:
                            row.add(token)
                            _emit(on_text, i, row.new_text())
                    if all(row.done for row in rows) or (cancelled is not None and cancelled()):
                        break
        finally:
            steps.close()
            self.model.train(was_training)
        for i, row in enumerate(rows):  # out of tokens: the held-back tail was no stop string after all
            if not row.done:
                row.finish_reason = "length"
            _emit(on_text, i, row.new_text(final=True))
        return rows

    def generate_batch(self, prompts, params, on_text=None, generator=None):
        """The replies (stripped text) to prompts of one length, generated as one batch; see complete_batch."""
        return [row.text.strip() for row in self.complete_batch(prompts, params, on_text, generator)]

    def replies(self, prompt_ids, params, num_samples=1, on_text=None, generator=None):
        """num_samples replies to one prompt, generated as one batch."""
        return self.generate_batch([list(prompt_ids)] * num_samples, params, on_text, generator)


def _emit(on_text, row, text):
    if on_text and text:
        on_text(row, text)


# ----------------------------------------------------------------------------------------------------------------
# From a script's options


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def load_engine(cfg):
    """(Engine, checkpoint info) for a script's options: out_dir, ckpt, init_from (see checkpoint.load_model),
    device, dtype, use_cache. In bfloat16 / float16 the weights themselves are converted (and with them the KV
    cache), not just autocast: batch-1 decoding is bound by reading the weights once per token."""
    device = resolve_device(cfg["device"])
    model, info = load_model(cfg["out_dir"], cfg["ckpt"], cfg.get("init_from", ""), device)
    dtype = resolve_dtype(cfg["dtype"], device)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    enc = chat.get_encoder(info.get("tokenizer", chat.TOKENIZER))
    return Engine(model, enc, device, dtype, cfg.get("use_cache", True)), info


def unescape(text):
    """`\\n` typed on a command line means a newline (other non-ASCII text is kept as it is)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def sampling_params(cfg, default_stop=None):
    """SamplingParams from a script's options (SAMPLING_KEYS, stop, seed). stop None: default_stop (the
    checkpoint's; None for no stop string); a string or a list of strings, with `\\n` unescaped, otherwise."""
    stop = cfg["stop"]
    if stop is None:
        stops = (default_stop,) if default_stop else ()
    else:
        if not isinstance(stop, (list, tuple)):  # --stop=5 arrives as an int: a number is a stop string too
            stop = [stop]
        stops = tuple(unescape(str(s)) for s in stop)
    return SamplingParams(**{k: cfg[k] for k in SAMPLING_KEYS}, stop=stops, seed=cfg["seed"])
