"""Generation: the one engine that sample.py, eval.py, train.py's eval-time sample reply and a server call.

1. KVCache: the explicit inference state, so each generated token costs one position's work; RowsKVCache: the
   same for rows of different lengths (a slot per row, a mask per row).
2. SamplingParams: temperature, top-k, top-p, repetition penalty, length, stop strings and seed, validated once.
3. adjust_logits / sample_next / generate: token-level sampling, streaming one token per row and step (rows of one
   prompt length, one generator: the plain reference loop, which bench.py times).
4. Request / Decoder / Engine: replies that stop per row on <|endoftext|> or a stop string (which may span several
   tokens) and stream their text as it becomes final. A Decoder decodes requests of any prompt lengths and
   sampling options together, each joining and leaving at any step (continuous batching: batcher.py); an Engine
   (a model with its tokenizer, device and dtype) runs one to completion for a script.
"""
from dataclasses import dataclass, field

import torch

from . import chat
from .checkpoint import load_model
from .device import autocast, cpu_has_bf16, resolve_device, resolve_dtype
from .errors import ConfigError
from model import causal_mask


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
        past = self.length
        self.k[:, :, past:past + T] = k
        self.v[:, :, past:past + T] = v
        self.length += T
        # the queries sit at positions past..past+T-1 and see the keys up to their own (None: all, or causal at 0)
        mask = None if past == 0 or T == 1 else causal_mask(T, past + T, k.device)
        return self.k[:, :, :self.length], self.v[:, :, :self.length], mask


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


class RowsLayerKVCache:
    """One layer's keys and values for rows of different lengths: row r's tokens sit at 0..lengths[r]-1 of its
    slot (max_rows slots of max_len positions, zeroed: a masked key must not be NaN); the mask hides the rest."""

    def __init__(self, max_rows, max_len, device):
        self.max_rows, self.max_len = max_rows, max_len
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.k = self.v = None

    def _allocate(self, like):  # on first use, in the dtype the attention runs in (as LayerKVCache)
        if self.k is None or self.k.dtype != like.dtype:
            _, H, _, D = like.shape
            self.k = like.new_zeros(self.max_rows, H, self.max_len, D)
            self.v = like.new_zeros(self.max_rows, H, self.max_len, D)

    def put(self, slot, layer):
        """The slot takes the keys and values of a one-row LayerKVCache."""
        n = layer.length
        if n:
            self._allocate(layer.k)
            self.k[slot, :, :n] = layer.k[0, :, :n]
            self.v[slot, :, :n] = layer.v[0, :, :n]
        self.lengths[slot] = n

    def move(self, src, dst):
        n = int(self.lengths[src])
        if n and src != dst:
            self.k[dst, :, :n] = self.k[src, :, :n]
            self.v[dst, :, :n] = self.v[src, :, :n]
        self.lengths[dst] = n

    def append(self, k, v):
        """One new token per row (k, v: (B, H, 1, D)), each written at its row's own length."""
        B, _, T, _ = k.shape
        if T != 1:
            raise ValueError(f"rows of different lengths continue one token at a time, got {T}")
        self._allocate(k)
        lengths = self.lengths[:B]
        rows = torch.arange(B, device=k.device)
        self.k[rows, :, lengths] = k[:, :, 0]
        self.v[rows, :, lengths] = v[:, :, 0]
        lengths += 1
        shortest, n = (int(x) for x in lengths.aminmax())
        if shortest == n:  # rows of one length (one row, say) see every key: no mask, as in LayerKVCache
            return self.k[:B, :, :n], self.v[:B, :, :n], None
        mask = torch.arange(n, device=k.device) < lengths[:, None]  # (B, n): each row sees its own tokens only
        return self.k[:B, :, :n], self.v[:B, :, :n], mask[:, None, None, :]


class RowsKVCache:
    """The cache of a Decoder's rows, which hold sequences of different lengths: one slot per row, rows 0..rows-1
    in use. A row is prefilled alone in a KVCache and put in its slot; then all rows continue one token per step
    together (GPT.forward with idx (rows, 1): each at its own position, its keys masked to its own)."""

    def __init__(self, config, max_rows, device):
        self.layers = [RowsLayerKVCache(max_rows, config.block_size, device) for _ in range(config.n_layer)]
        self.rows = 0

    @property
    def length(self):
        """Each row's length, (rows, 1)."""
        return self.layers[0].lengths[:self.rows, None]

    def put(self, slot, cache):
        """A row (an existing slot, or the next free one) takes a one-row KVCache's keys and values."""
        for mine, theirs in zip(self.layers, cache.layers):
            mine.put(slot, theirs)
        self.rows = max(self.rows, slot + 1)

    def remove(self, slot):
        """Free a row's slot: the last row moves into it, so that rows 0..rows-1 stay the ones in use."""
        self.rows -= 1
        for layer in self.layers:
            layer.move(self.rows, slot)


class PromptCache:
    """One conversation's keys and values, kept from one turn to the next (sample.py --interactive): a prompt runs
    only its tokens after the longest prefix it shares with the last one, not the whole history again. A turn's
    prompt starts with the previous one unless the conversation was trimmed to fit the context (then it runs
    whole). Holds the last prompt's window but its last token, as a Decoder's rows do."""

    def __init__(self, config):
        self.cache, self.ids = KVCache(config), []

    def fill(self, tokens, run):
        """The KVCache of tokens: the shared prefix kept, the rest run(new_tokens, cache) after it."""
        same = 0
        for mine, theirs in zip(self.ids, tokens):
            if mine != theirs:
                break
            same += 1
        self.ids = []  # until the run completes: a Ctrl-C midway leaves layers of different lengths
        for layer in self.cache.layers:
            layer.length = same
        if len(tokens) > same:
            run(tokens[same:], self.cache)
        self.ids = list(tokens)
        return self.cache


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


class Request:
    """n replies to one prompt with one SamplingParams: what a Decoder decodes. generator: the one its draws come
    from (None: params.generator(), a fresh one from the seed, or the global RNG without a seed). on_text(choice,
    text) streams each reply's text as it becomes final; replies holds their Completions once decoding started."""

    def __init__(self, prompt, params, n=1, generator=None, on_text=None, prompt_cache=None):
        if not len(prompt):
            raise ConfigError("empty prompt: generation needs at least one token to start from")
        self.prompt, self.params, self.n, self.generator, self.on_text = list(prompt), params, n, generator, on_text
        self.prompt_cache = prompt_cache  # a PromptCache: the conversation's earlier turns are not run again
        self.replies, self.left = [], 0  # left: its rows still decoding


class _Row:
    """One reply being decoded: its request and choice, all its tokens (prompt + generated), where its context
    window starts, and its Completion."""

    def __init__(self, request, choice, start):
        self.request, self.choice, self.start = request, choice, start
        self.reply, self.tokens = request.replies[choice], list(request.prompt)


class Decoder:
    """Continuous batching: rows of any prompt lengths and sampling options decoded together, one token per step.
    A request joins between two steps (add: its prompt runs alone, then its keys and values are copied into a slot
    per reply) and each row leaves, freeing its slot, as soon as it is done (step) or dropped (remove).

    A row gives the tokens it gives alone: it sees only its own keys at its own positions (RowsKVCache), a row
    whose context is full runs alone again on its cropped window (crop_start, as in generate), and a seeded
    request draws with its own generator. The cache holds a row's window but its last token, which the next step
    feeds: a request that joins mid-way is decoded exactly as one that starts a batch."""

    def __init__(self, engine, max_rows):
        self.engine, self.max_rows, self.rows = engine, max_rows, []  # rows[i] is in the cache's slot i
        self.block_size = engine.model.config.block_size
        self.cache = RowsKVCache(engine.model.config, max_rows, engine.device) if engine.use_cache else None

    @torch.inference_mode()
    def add(self, request):
        """Prefill the request's prompt and give each of its replies a row."""
        if len(self.rows) + request.n > self.max_rows:
            raise ConfigError(f"{request.n} more rows do not fit: {len(self.rows)} of {self.max_rows} in use")
        if request.generator is None:
            request.generator = request.params.generator(self.engine.device)
        request.replies = [Completion(self.engine.enc, request.params.stop) for _ in range(request.n)]
        request.left = request.n
        start = crop_start(len(request.prompt), 0, self.block_size)
        slots = range(len(self.rows), len(self.rows) + request.n)
        self._fill(slots, request.prompt[start:-1], request.prompt_cache)
        self.rows += [_Row(request, choice, start) for choice in range(request.n)]

    @torch.inference_mode()
    def step(self):
        """Feed every row its last token, draw its next one and stream the replies' new text. Returns the
        requests that ended (all their replies done); their rows have left."""
        for slot, row in enumerate(self.rows):
            start = crop_start(len(row.tokens), row.start, self.block_size)
            if start != row.start:  # positions are absolute: the row's cache is rebuilt for the new window
                row.start = start
                self._fill([slot], row.tokens[start:-1])
        if self.cache is not None:
            logits = self._logits([[row.tokens[-1]] for row in self.rows], self.cache)
        else:  # no cache: every row runs its whole window, alone
            logits = torch.cat([self._logits([row.tokens[row.start:]], None) for row in self.rows])
        for row, token in zip(self.rows, self._sample(logits)):
            row.tokens.append(token)
            row.reply.add(token)
            _emit(row.request.on_text, row.choice, row.reply.new_text())
        ended = []
        for slot in reversed(range(len(self.rows))):
            row = self.rows[slot]
            if row.reply.done or len(row.tokens) - len(row.request.prompt) == row.request.params.max_new_tokens:
                self._leave(slot)
                if row.request.left == 0:
                    ended.append(row.request)
        return ended

    @torch.inference_mode()
    def remove(self, request):
        """Drop a request's rows that still decode (a client that left); their replies end as "length"."""
        for slot in reversed(range(len(self.rows))):
            if self.rows[slot].request is request:
                self._leave(slot)

    def _leave(self, slot):
        row = self.rows[slot]
        if not row.reply.done:  # out of tokens: the held-back tail was no stop string after all
            row.reply.finish_reason = "length"
        _emit(row.request.on_text, row.choice, row.reply.new_text(final=True))
        row.request.left -= 1
        if self.cache is not None:
            self.cache.remove(slot)
        self.rows[slot] = self.rows[-1]
        self.rows.pop()

    def _fill(self, slots, tokens, prompt_cache=None):
        """Run tokens (a row's window but its last token) alone and put their keys and values in these slots;
        with a PromptCache, only those after the prefix it shares with its last prompt."""
        if self.cache is None:
            return
        if prompt_cache is not None:
            cache = prompt_cache.fill(tokens, self._prefill)
        else:
            cache = KVCache(self.engine.model.config)
            if tokens:
                self._prefill(tokens, cache)
        for slot in slots:
            self.cache.put(slot, cache)

    def _prefill(self, tokens, cache):
        """Append tokens' keys and values to a one-row KVCache (the blocks only: nobody reads these logits)."""
        with autocast(self.engine.device, self.engine.autocast_dtype):
            self.engine.model.hidden_states(torch.tensor([tokens], device=self.engine.device), kv_cache=cache)

    def _logits(self, ids, cache):
        """The float32 next-token logits (B, V) after rows of ids; the padded vocabulary is never sampled."""
        with autocast(self.engine.device, self.engine.autocast_dtype):
            logits, _ = self.engine.model(torch.tensor(ids, device=self.engine.device), kv_cache=cache)
        logits = logits[:, -1, :].float()
        logits[:, chat.VOCAB_SIZE:] = float("-inf")
        return logits

    def _sample(self, logits):
        """The next token of every row. Rows draw together by group: a sampling request with a generator alone
        (its rows in choice order: the draws it makes alone), other rows with the same params together."""
        groups = {}
        for slot, row in enumerate(self.rows):
            request = row.request
            own = request.params.temperature > 0 and request.generator is not None
            groups.setdefault(request if own else request.params, []).append(slot)
        tokens = [0] * len(self.rows)
        for slots in groups.values():
            slots.sort(key=lambda slot: self.rows[slot].choice)
            request = self.rows[slots[0]].request
            history = self._history(slots) if request.params.repetition_penalty != 1.0 else None
            rows = logits if slots == list(range(len(self.rows))) else logits[slots]  # one group: no copy
            for slot, token in zip(slots, sample_next(rows, request.params, history, request.generator).tolist()):
                tokens[slot] = token
        return tokens

    def _history(self, slots):
        """The rows' tokens for the repetition penalty, (len(slots), longest); a shorter row is padded with its own
        first token (penalised once all the same)."""
        seqs = [self.rows[slot].tokens for slot in slots]
        width = max(len(seq) for seq in seqs)
        return torch.tensor([seq + seq[:1] * (width - len(seq)) for seq in seqs], device=self.engine.device)


class Engine:
    """A model ready to generate: its tokenizer, device and compute dtype (the weights' own after GPT.to_half,
    otherwise autocast over fp32 weights). The per-call state (the KV cache, the rows' text) lives in each call (or
    Decoder), so one engine serves any number of them."""

    def __init__(self, model, enc=None, device="cpu", dtype="float32", use_cache=True):
        self.model, self.device, self.dtype, self.use_cache = model, device, dtype, use_cache
        weights = next((p.dtype for p in model.parameters() if p.dim() == 2), torch.float32)
        self.autocast_dtype = dtype if weights == torch.float32 else "float32"  # to_half's weights: no autocast
        self.enc = enc or chat.get_encoder()

    def complete(self, requests, cancelled=None):
        """Decode the requests together to their end (a Decoder); their Completions are in request.replies.
        cancelled(): checked after every step; True ends them all there (a caller that gave up)."""
        decoder = Decoder(self, sum(request.n for request in requests))
        was_training = self.model.training
        self.model.eval()
        try:
            for request in requests:
                decoder.add(request)
            while decoder.rows and not (cancelled is not None and cancelled()):
                decoder.step()
        finally:
            for request in requests:
                decoder.remove(request)
            self.model.train(was_training)

    def complete_batch(self, prompts, params, on_text=None, generator=None, cancelled=None):
        """One Completion per prompt (of any lengths), generated as one batch. Each row stops on its own at
        <|endoftext|> or at the first of params.stop, which is cut off. on_text(row, new_text) streams text as it
        becomes final. generator: the draws of every row (default params.generator()). cancelled: see complete."""
        generator = generator if generator is not None else params.generator(self.device)
        requests = [Request(prompt, params, 1, generator, _for_row(on_text, i)) for i, prompt in enumerate(prompts)]
        self.complete(requests, cancelled)
        return [request.replies[0] for request in requests]

    def generate_batch(self, prompts, params, on_text=None, generator=None):
        """The replies (stripped text) to prompts, generated as one batch; see complete_batch."""
        return [row.text.strip() for row in self.complete_batch(prompts, params, on_text, generator)]

    def replies(self, prompt_ids, params, num_samples=1, on_text=None, generator=None):
        """num_samples replies to one prompt (prefilled once), generated as one batch."""
        request = Request(prompt_ids, params, num_samples, generator, on_text)
        self.complete([request])
        return [row.text.strip() for row in request.replies]


def _for_row(on_text, row):
    return None if on_text is None else lambda choice, text: on_text(row, text)


def _emit(on_text, row, text):
    if on_text and text:
        on_text(row, text)


# ----------------------------------------------------------------------------------------------------------------
# From a script's options


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def load_engine(cfg, one_row=False):
    """(Engine, checkpoint info) for a script's options: out_dir, ckpt, init_from (see checkpoint.load_model),
    device, dtype, use_cache. In bfloat16 / float16 the matmul weights themselves are converted (and with them the
    KV cache), not just autocast: batch-1 decoding is bound by reading the weights once per token (GPT.to_half).
    one_row: the script decodes one sequence at a time (dtype auto: see resolve_dtype)."""
    device = resolve_device(cfg["device"])
    model, info = load_model(cfg["out_dir"], cfg["ckpt"], cfg.get("init_from", ""), device)
    dtype = resolve_dtype(cfg["dtype"], device, one_row)
    if dtype != "float32":
        to_half(model, dtype, device)
    enc = chat.get_encoder(info.get("tokenizer", chat.TOKENIZER))
    return Engine(model, enc, device, dtype, cfg.get("use_cache", True)), info


def to_half(model, dtype, device):
    """GPT.to_half for inference on device ("bfloat16" / "float16"). On a CPU without that dtype's instructions,
    prompts (more than Linear.FEW_ROWS rows) multiply in fp32 (upcast); decoding steps keep the half-precision
    bytes."""
    native = device != "cpu" or (dtype == "bfloat16" and cpu_has_bf16())
    return model.to_half(getattr(torch, dtype), upcast=not native)


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
