"""Sampling: every option declared once, in SamplingParams (its default, its help and its bounds,
checked here), from which the scripts' DEFAULTS (sampling_defaults) and --help (sampling_help),
sample.py's /set and the server's request model are derived; and the token-level math
(adjust_logits, sample_next) the engine's decode step calls."""
import operator
from dataclasses import dataclass, field, fields

import torch

from .errors import ConfigError


def option(default, help, **bounds):
    """A SamplingParams field: its default, its help (the scripts' --help, sample.py's /set, the
    server's schema) and its bounds (ge, gt, le), checked by SamplingParams and by the server's
    request model."""
    return field(default=default, metadata=dict(help=help, bounds=bounds))


BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le)}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Checked once, here, with the option's name in the
    error."""
    temperature: float = option(0.8, "0 = greedy; higher = more varied", ge=0)
    top_k: int = option(0, "sample from the k most likely tokens (0 = all)", ge=0)
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens reaching this "
                               "probability (1 = off)", ge=0, le=1)
    repetition_penalty: float = option(
        1.0, "> 1 discourages tokens already in the context (1 = off)", gt=0)
    max_new_tokens: int = option(150, "the longest reply, in tokens", ge=1)
    stop: tuple = option((), "a string or a list of strings that end a reply (cut off); None = the "
                             "checkpoint's default stop; <|endoftext|> always ends one")
    seed: int | None = option(None, "makes sampling reproducible (None = fresh draws)",
                              ge=-2**63, le=2**64 - 1)  # what torch.Generator.manual_seed takes
    logit_bias: tuple = option((), "token id -> a bias in [-100, 100] added to its logit before "
                                   "sampling (-100 bans the token, +100 all but forces it)")

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        object.__setattr__(self, "top_k", self.top_k or 0)
        object.__setattr__(self, "logit_bias", logit_bias_pairs(self.logit_bias))
        for f in fields(self):
            value = getattr(self, f.name)
            for bound, limit in f.metadata["bounds"].items():
                sign, holds = BOUNDS[bound]
                if value is not None and not holds(value, limit):
                    raise ConfigError(f"{f.name} must be {sign} {limit}, got {value} "
                                      f"({f.metadata['help']})")

    def generator(self, device="cpu"):
        """A torch.Generator seeded with seed, or None (the global RNG) when there is no seed."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def logit_bias_pairs(bias):
    """logit_bias ({token id: bias} or (id, bias) pairs) as sorted (int id, float bias) pairs: a
    tuple, so that SamplingParams stays hashable (the engine groups rows by their params)."""
    pairs = bias.items() if isinstance(bias, dict) else bias or ()
    try:
        pairs = tuple(sorted((int(token), float(value)) for token, value in pairs))
    except (TypeError, ValueError):
        raise ConfigError(f"logit_bias must map token ids to numbers, got {bias!r}") from None
    for token, value in pairs:
        if token < 0 or not -100 <= value <= 100:
            raise ConfigError(f"logit_bias must map token ids >= 0 to biases in [-100, 100], got "
                              f"{token}: {value}")
    return pairs


# the options only the server's requests take (a per-token map: no script option of its own)
SERVER_ONLY = ("logit_bias",)
# the options sample.py's /set changes
SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams)
                      if f.name not in ("stop", "seed", *SERVER_ONLY))


def sampling_help():
    """{option: its help}: for a script's --help (configurator.load's help) and sample.py's
    /help."""
    return {f.name: f.metadata["help"] for f in fields(SamplingParams) if f.name not in SERVER_ONLY}


def sampling_defaults(leave_out=(), **overrides):
    """The sampling options as a script's DEFAULTS entries, {option: default}, with the script's own
    defaults (overrides) and without the options it does not take."""
    defaults = {f.name: overrides.pop(f.name, f.default) for f in fields(SamplingParams)
                if f.name not in (*leave_out, *SERVER_ONLY)}
    if overrides:
        raise TypeError(f"not sampling options: {sorted(overrides)}")
    return defaults


# --------------------------------------------------------------------------------------------------
# Token-level sampling


def adjust_logits(logits, params, history=None):
    """The float32 logits (B, V) sampling draws from, in transformers' order: logit bias, repetition
    penalty, temperature, top-k, top-p; filtered tokens are -inf. With temperature 0 only the bias
    and the penalty apply (greedy takes the argmax).

    history (B, L): the tokens the penalty applies to. repetition_penalty follows CTRL /
    transformers: a seen token's logit is divided by the penalty when positive and multiplied by it
    when negative."""
    logits = logits.float()
    if params.logit_bias:  # OpenAI's logit_bias: added to the raw logits (ids checked by the caller)
        tokens, biases = zip(*params.logit_bias)
        logits = logits.index_add(1, torch.tensor(tokens, device=logits.device),
                                  torch.tensor(biases, device=logits.device).expand(len(logits), -1))
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
    if params.top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p  # the mass before it is enough
        drop_sorted[:, 0] = False  # the top token stays (top_p=0 is greedy, not an empty set)
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def sample_next(logits, params, history=None, generator=None):
    """Pick the next token per row from logits (B, V): greedy when temperature is 0, else a draw
    from adjust_logits' distribution (with generator, so a seed makes it reproducible)."""
    logits = adjust_logits(logits, params, history)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
