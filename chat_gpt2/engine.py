"""Generation, the one decode path of sample.py, eval.py, train.py, serve.py and bench.py:

1. KVCache: rows of different lengths, each in its own slot, so a new token costs one position's
   work; PromptCache: one conversation's keys and values kept from one turn to the next.
2. Completion: a reply that stops on a special token (<|endoftext|>, a template's <|im_end|>: the
   tokenizer's stop_ids) or a stop string (which may span tokens) and streams its text as it
   becomes final.
3. Decoder: requests of any prompt lengths and sampling options decoded together, one token per step
   (sampling.sample_next), each joining and leaving at any step (continuous batching: batcher.py);
   Engine.complete runs requests to their end.
The sampling options are sampling.py's; an Engine from a script's options is inference.py's."""
import torch

from . import chat
from .device import autocast
from .errors import ConfigError
from .sampling import sample_next


# --------------------------------------------------------------------------------------------------
# 1. KV cache: the inference state, kept explicit


def cache_dtype(device):
    """The dtype of a KV cache, and so of attention, on device: fp32 on a CPU, where a bf16 matrix-
    vector product over the cache (one query) is several times slower than an fp32 one
    (docs/performance.md#decoding-overhead); None elsewhere: the dtype attention runs in (bf16 under
    autocast or GPT.to_half)."""
    return torch.float32 if torch.device(device).type == "cpu" else None


class KVCache:
    """Keys and values of up to max_rows sequences: row r's tokens sit at 0..lengths[r]-1 of its
    slot, the rest is masked (zeroed: a masked key must not be NaN); allocated on first use, in
    dtype (None: the dtype of the keys written, which attention runs in). GPT.forward(idx (B, T),
    kv_cache) continues the B rows `rows` (a slice) by T tokens: a decode step every row in use by
    one, a prefill one row by its prompt. positions() starts a forward, append() is each layer's."""

    def __init__(self, config, max_rows=1, device="cpu", dtype=None):
        self.n_layer, self.max_rows, self.max_len = config.n_layer, max_rows, config.block_size
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.k, self.v = [None] * config.n_layer, [None] * config.n_layer
        self.rows = slice(0, max_rows)  # the rows the next forward continues (idx's rows, in order)
        self.pos, self.mask, self.n, self.dtype = None, None, 0, dtype
        self.start = None  # the rows' one length when they share it (writes are then a slice)

    def positions(self, T):
        """The absolute positions (B, T) of the rows' next T tokens; also what every layer's append
        needs: the keys to attend over (n) and the mask (True = visible; None when every query sees
        all keys up to its own, which SDPA's is_causal, or no mask for T = 1, gives)."""
        past = self.lengths[self.rows]
        shortest, longest = (int(x) for x in past.aminmax())
        if longest + T > self.max_len:
            raise ValueError(f"sequence of {longest + T} tokens exceeds block_size {self.max_len}")
        self.pos = past[:, None] + torch.arange(T, device=past.device)
        self.n = longest + T
        self.start = longest if shortest == longest else None
        self.mask = None
        if shortest != longest or (T > 1 and longest > 0):  # a query sees its row's keys up to it
            keys = torch.arange(self.n, device=past.device)
            self.mask = (keys <= self.pos[:, :, None])[:, None]  # (B, 1, T, n)
        return self.pos

    def append(self, layer, k, v):
        """Write one layer's new keys and values (B, H, T, D) after each row's tokens; returns the
        rows' keys and values so far, (B, H, n, D) each, and the mask."""
        self._allocate(layer, k)
        if self.start is not None:  # one length: the new tokens are one slice of every row
            end = self.start + k.size(2)
            self.k[layer][self.rows, :, self.start:end] = k
            self.v[layer][self.rows, :, self.start:end] = v
        else:
            rows = torch.arange(k.size(0), device=k.device)[:, None]
            dtype = self.k[layer].dtype  # (B, T, H, D) at row, pos:
            self.k[layer][self.rows][rows, :, self.pos] = k.transpose(1, 2).to(dtype)
            self.v[layer][self.rows][rows, :, self.pos] = v.transpose(1, 2).to(dtype)
        if layer == self.n_layer - 1:
            self.lengths[self.rows] += k.size(2)
        return self.k[layer][self.rows, :, :self.n], self.v[layer][self.rows, :, :self.n], self.mask

    def copy(self, dst, src, source=None):
        """Row dst takes row src's keys, values and length (of this cache or of source)."""
        source = self if source is None else source
        if source is self and src == dst:
            return
        n = int(source.lengths[src])
        for layer in range(self.n_layer):
            if n:
                self._allocate(layer, source.k[layer])
                self.k[layer][dst, :, :n] = source.k[layer][src, :, :n]
                self.v[layer][dst, :, :n] = source.v[layer][src, :, :n]
        self.lengths[dst] = n

    def _allocate(self, layer, like):
        dtype = self.dtype or like.dtype
        if self.k[layer] is None or self.k[layer].dtype != dtype:
            _, H, _, D = like.shape
            self.k[layer] = like.new_zeros(self.max_rows, H, self.max_len, D, dtype=dtype)
            self.v[layer] = like.new_zeros(self.max_rows, H, self.max_len, D, dtype=dtype)


class PromptCache:
    """One conversation's keys and values, kept from one turn to the next (sample.py --interactive):
    a prompt runs only its tokens after the longest prefix it shares with the last one, not the
    whole history again. A turn's prompt starts with the previous one unless the conversation was
    trimmed to fit the context (then it runs whole). Holds the last prompt's window but its last
    token, as a Decoder's rows do."""

    def __init__(self, config, device="cpu"):
        self.cache, self.ids = KVCache(config, 1, device, cache_dtype(device)), []

    def fill(self, tokens, run):
        """The one-row KVCache of tokens: the shared prefix kept, run(new, cache) adds the rest."""
        same = next((i for i, (a, b) in enumerate(zip(self.ids, tokens)) if a != b),
                    min(len(self.ids), len(tokens)))  # the length of the shared prefix
        self.ids = []  # until the run completes: a Ctrl-C midway leaves the keys of a part of them
        self.cache.lengths[0] = same
        if len(tokens) > same:
            run(tokens[same:], self.cache)
        self.ids = list(tokens)
        return self.cache


# --------------------------------------------------------------------------------------------------
# 2. Replies: text, stop strings and streaming


def held_back(text, stops):
    """Length of text that can be shown while streaming: hold back a tail that may be the start of a
    stop string and an incomplete multi-byte character (decoded as U+FFFD until its last byte
    arrives)."""
    end = len(text.rstrip("\ufffd"))
    keep = end
    for stop in stops:  # the longest proper prefix of each stop that the (complete) text ends with
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:n], 0, end):
                keep = min(keep, end - n)
                break
    return keep


class Completion:
    """One reply: its tokens, its text (cut at the first stop string), how much of it was streamed,
    and why it ended: "stop" (a special token, e.g. <|endoftext|>, or a stop string) or "length"
    (out of tokens); stop_token: the special token it stopped on. ignore_eot: special tokens are
    tokens like the others (bench.py times exactly max_new_tokens tokens)."""

    def __init__(self, enc, stops, ignore_eot=False):
        self.enc, self.stops, self.ignore_eot = enc, stops, ignore_eot
        self.stop_ids = frozenset(() if ignore_eot else chat.stop_ids(enc))
        self.tokens, self.text, self.finish_reason, self.shown = [], "", None, 0
        self.stop_token = None

    @property
    def done(self):
        return self.finish_reason is not None

    def add(self, token):
        if token in self.stop_ids:
            self.finish_reason, self.stop_token = "stop", token
            return
        self.tokens.append(token)
        self.text = self.enc.decode(self.tokens)  # whole: merges characters split over tokens
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.finish_reason = self.text[:min(cuts)], "stop"

    def new_text(self, final=False):
        """The text that became final since the last call. Leading whitespace is never shown
        (replies are returned stripped and start with the space after `Assistant:`)."""
        visible = len(self.text) if self.done or final else held_back(self.text, self.stops)
        start = max(self.shown, len(self.text) - len(self.text.lstrip()))
        if visible <= start:
            return ""
        self.shown = visible
        return self.text[start:visible]


# --------------------------------------------------------------------------------------------------
# 3. Decoding: requests, the context window, the decode loop


class Request:
    """n replies to one prompt with one SamplingParams: what a Decoder decodes. generator: the one
    its draws come from (None: params.generator(), a fresh one from the seed, or the global RNG
    without a seed). on_text(choice, text) streams each reply's text as it becomes final; replies
    holds their Completions once decoding started. prompt_cache: a PromptCache (the conversation's
    earlier turns are not run again); ignore_eot: see Completion."""

    def __init__(self, prompt, params, n=1, generator=None, on_text=None, prompt_cache=None,
                 ignore_eot=False):
        if not len(prompt):
            raise ConfigError("empty prompt: generation needs at least one token to start from")
        self.prompt, self.params, self.n, self.generator = list(prompt), params, n, generator
        self.on_text, self.prompt_cache, self.ignore_eot = on_text, prompt_cache, ignore_eot
        self.replies, self.left = [], 0  # left: its rows still decoding


def crop_start(length, start, block_size):
    """Where the context window starts. When it would exceed block_size, drop the oldest tokens so
    that 3/4 of the window is kept (the KV cache is then rebuilt for the new window)."""
    if length - start > block_size:
        start = length - max(1, block_size - block_size // 4)
    return start


class _Row:
    """One reply being decoded: its request and choice, all its tokens (prompt + generated), where
    its context window starts, and its Completion."""

    def __init__(self, request, choice, start):
        self.request, self.choice, self.start = request, choice, start
        self.reply, self.tokens = request.replies[choice], list(request.prompt)


class Decoder:
    """Continuous batching: rows of any prompt lengths and sampling options decoded together, one
    token per step. A request joins between two steps (add: its prompt runs alone in a slot of the
    KVCache, copied into a slot per further reply) and each row leaves, freeing its slot, as soon as
    it is done (step) or dropped (remove).

    A row gives the tokens it gives alone: it sees only its own keys at its own positions, a row
    whose context is full runs alone again on its cropped window (crop_start), and a seeded request
    draws with its own generator. The cache holds a row's window but its last token, which the next
    step feeds: a request that joins mid-way is decoded exactly as one that starts a batch."""

    def __init__(self, engine, max_rows):
        self.engine, self.max_rows, self.rows = engine, max_rows, []  # rows[i]: the cache's slot i
        self.block_size = engine.model.config.block_size
        self.cache = KVCache(engine.model.config, max_rows, engine.device,
                             cache_dtype(engine.device))

    @torch.inference_mode()
    def add(self, request):
        """Prefill the request's prompt and give each of its replies a row."""
        if len(self.rows) + request.n > self.max_rows:
            raise ConfigError(f"{request.n} more rows do not fit: {len(self.rows)} of "
                              f"{self.max_rows} in use")
        if request.generator is None:
            request.generator = request.params.generator(self.engine.device)
        request.replies = [Completion(self.engine.enc, request.params.stop, request.ignore_eot)
                           for _ in range(request.n)]
        request.left = request.n
        start = crop_start(len(request.prompt), 0, self.block_size)
        slots = range(len(self.rows), len(self.rows) + request.n)
        self._fill(slots, request.prompt[start:-1], request.prompt_cache)
        self.rows += [_Row(request, choice, start) for choice in range(request.n)]

    @torch.inference_mode()
    def step(self):
        """Feed every row its last token, draw its next one and stream the replies' new text.
        Returns the requests that ended (all their replies done); their rows have left.

        Rows draw together by group: a sampling request with a generator alone (its rows in choice
        order: the draws it makes alone), other rows with the same params together."""
        for slot, row in enumerate(self.rows):
            start = crop_start(len(row.tokens), row.start, self.block_size)
            if start != row.start:  # positions are absolute: the row's cache is rebuilt from start
                row.start = start
                self._fill([slot], row.tokens[start:-1])
        self.cache.rows = slice(0, len(self.rows))
        with autocast(self.engine.device, self.engine.autocast_dtype):
            ids = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.engine.device)
            logits = self.engine.model(ids, kv_cache=self.cache)[0][:, -1, :].float()
        logits.masked_fill_(self.engine.not_tokens, float("-inf"))  # padded rows: never sampled
        groups = {}
        for slot, row in enumerate(self.rows):
            own = row.request.params.temperature > 0 and row.request.generator is not None
            groups.setdefault(row.request if own else row.request.params, []).append(slot)
        for slots in groups.values():
            slots.sort(key=lambda slot: self.rows[slot].choice)
            request = self.rows[slots[0]].request
            history = self._history(slots) if request.params.repetition_penalty != 1.0 else None
            group = logits if slots == list(range(len(self.rows))) else logits[slots]  # no copy
            tokens = sample_next(group, request.params, history, request.generator).tolist()
            for slot, token in zip(slots, tokens):
                row = self.rows[slot]
                row.tokens.append(token)
                row.reply.add(token)
                _emit(row.request.on_text, row.choice, row.reply.new_text())
        ended = []
        for slot in reversed(range(len(self.rows))):
            row = self.rows[slot]
            new = len(row.tokens) - len(row.request.prompt)
            if row.reply.done or new == row.request.params.max_new_tokens:
                self._leave(slot)
                if row.request.left == 0:
                    ended.append(row.request)
        return ended

    @torch.inference_mode()
    def remove(self, request):
        """Drop a request's rows that still decode (a client that left); their replies end as
        "length"."""
        for slot in reversed(range(len(self.rows))):
            if self.rows[slot].request is request:
                self._leave(slot)

    def _leave(self, slot):
        """The row leaves; the last row moves into its slot, so that rows 0..len(rows)-1 stay the
        ones in use."""
        row = self.rows[slot]
        if not row.reply.done:  # out of tokens: the held-back tail was no stop string after all
            row.reply.finish_reason = "length"
        _emit(row.request.on_text, row.choice, row.reply.new_text(final=True))
        row.request.left -= 1
        self.cache.copy(slot, len(self.rows) - 1)
        self.rows[slot] = self.rows[-1]
        self.rows.pop()

    def _fill(self, slots, tokens, prompt_cache=None):
        """The keys and values of tokens (a row's window but its last token) into these slots: run
        alone in the first (with a PromptCache: only those after the prefix it kept, there)."""
        if prompt_cache is not None:
            source, first = prompt_cache.fill(tokens, self._prefill), 0
        else:
            source, first = self.cache, slots[0]
            self.cache.lengths[first] = 0
            self._prefill(tokens, self.cache, first)
        for slot in slots:
            if source is not self.cache or slot != first:
                self.cache.copy(slot, first, source)

    def _prefill(self, tokens, cache, row=0):
        """Append tokens' keys and values to a row of cache (the blocks only: no logits needed)."""
        if tokens:
            cache.rows = slice(row, row + 1)
            with autocast(self.engine.device, self.engine.autocast_dtype):
                ids = torch.tensor([tokens], device=self.engine.device)
                self.engine.model.hidden_states(ids, kv_cache=cache)

    def _history(self, slots):
        """The rows' tokens for the repetition penalty, (len(slots), longest); a shorter row is
        padded with its own first token (penalised once all the same)."""
        seqs = [self.rows[slot].tokens for slot in slots]
        width = max(len(seq) for seq in seqs)
        padded = [seq + seq[:1] * (width - len(seq)) for seq in seqs]
        return torch.tensor(padded, device=self.engine.device)


def _emit(on_text, row, text):
    if on_text and text:
        on_text(row, text)


def not_tokens(enc, size, device="cpu"):
    """A boolean (size,) tensor, True at the ids of the model's rows that are no token of enc (its
    padded vocabulary, the free id before added special tokens): the logits masked to -inf there."""
    return torch.from_numpy(~chat.is_token(enc, size)).to(device)


class Engine:
    """A model ready to generate: its tokenizer, device and compute dtype (the weights' own after
    GPT.to_half, otherwise autocast over fp32 weights). The per-call state (the KV cache, the rows'
    text) lives in each Decoder, so one engine serves any number of them."""

    def __init__(self, model, enc=None, device="cpu", dtype="float32"):
        self.model, self.device, self.dtype = model, device, dtype
        weights = next((p.dtype for p in model.parameters() if p.dim() == 2), torch.float32)
        self.autocast_dtype = dtype if weights == torch.float32 else "float32"  # to_half's: none
        self.enc = enc or chat.get_encoder()
        self.not_tokens = not_tokens(self.enc, model.config.vocab_size, device)

    def complete(self, requests, cancelled=None):
        """Decode the requests together to their end (one Decoder); each request's Completions are
        in its replies (reply.text.strip() is what a script prints). cancelled(): checked after
        every step; True ends them all there (a caller that gave up)."""
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
