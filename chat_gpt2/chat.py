"""The chat template, shared by the prepared data (training), the
engine's prompts (sample, eval) and export.

A template is a dict of strings (TEMPLATE_FIELDS); prepare.py picks one (--template:
human_assistant, alpaca, chatml, or a JSON file with the same fields, see load_template and
docs/data.md), and it travels in meta.json and every checkpoint. The default, human_assistant,
renders a conversation as (the exact bytes, `{...}` replaced by the message text with surrounding
whitespace stripped):

    System: {system}\\n                       <- only when the conversation has a system message
    Human: {user}\\nAssistant: {assistant}\\n\\n  <- one block per turn
    <|endoftext|>                            <- token 50256, once at the end of the conversation

`render_conversation` is the definition of the training data, ids and mask in one place, so training
and sampling can never disagree on the format: the text rendered with its learned spans marked,
encoded whole (BPE over the whole text, as a Hugging Face tokenizer encodes the export's
chat_template, multi-turn included), the spans mapped to tokens. The mask is 1 exactly on what the
assistant must learn to produce (its reply, which starts with the space after `Assistant:`, the
turn's closing `\\n\\n`, and the final `<|endoftext|>`), 0 elsewhere. User text is tokenised with
`encode_ordinary`, so a literal `<|endoftext|>` typed by a user stays text. A prompt's ids
(render_prompt) are the conversation's up to its reply. `render_batch` is the fast path prepare.py
uses (many conversations at once, numpy); tests/test_render.py checks it against the definition.

A template may declare some of its markers special tokens (`"special_tokens"`, e.g.
chatml_special's `<|im_start|>` / `<|im_end|>`): each is then one id (special_token_ids: a
trained tokenizer's own when it has the marker, else after the vocabulary, GPT-2's after one free
id), only where the template writes it (special_spans), never from a message's text; the run's
encoder has them (template_encoder, run_encoder: the one way to a run's encoder) and generation
stops on them and <|endoftext|> alone (stop_ids).
"""
import bisect
import itertools
import json
import os
import re

import numpy as np
import tiktoken

from .errors import ConfigError, MissingFileError
from .tokenizer import EOT_TEXT, GPT2, encoding

TOKENIZER = GPT2  # "gpt2"; a trained tokenizer instead: tokenizer.py
EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257  # real GPT-2 vocabulary; the model may pad its embedding beyond this
NEWLINE_TOKENS = (198, 628, 44320)  # the GPT-2 tokens that hold a newline: "\n", "\n\n", "\n\xa0"

# Stored in meta.json and every checkpoint; `export.py` turns it into a Hugging Face chat_template.
TEMPLATE = {
    "system": "System: {content}\n",
    "user": "Human: {content}\n",
    "assistant_label": "Assistant:",  # what a generation prompt ends with
    "assistant": " {content}",  # the reply, learned
    "turn_end": "\n\n",  # closes an assistant turn, learned
    "eot": "<|endoftext|>",  # closes a conversation, learned
    "default_system": "",  # the system message of a conversation that has none ("" = none)
    "input": "\n{content}",  # joins an instruction record's non-empty "input" to its instruction
    "stop": "\n",  # the default stop when every reply of the data is one line
    "stop_multiline": "\nHuman:",  # the default stop when some replies span lines
}
TEMPLATE_FIELDS = tuple(TEMPLATE)
WITH_CONTENT = ("system", "user", "assistant", "input")  # the fields holding "{content}", once
# Alpaca (Stanford's prompt, exactly); a record's input joins the instruction as its "### Input:"
# section. Several turns are successive instruction/response blocks; only the last reply is closed.
ALPACA = {
    "system": "{content}",
    "user": "\n\n### Instruction:\n{content}",
    "assistant_label": "\n\n### Response:\n",
    "assistant": "{content}",
    "turn_end": "",
    "eot": "<|endoftext|>",
    "default_system": "Below is an instruction that describes a task. "
                      "Write a response that appropriately completes the request.",
    "input": "\n\n### Input:\n{content}",
    "stop": "\n",
    "stop_multiline": "\n\n### Instruction:",
}
# ChatML's markers as plain text (GPT-2's vocabulary has no such
# special tokens: they are several tokens each).
CHATML = {
    "system": "<|im_start|>system\n{content}<|im_end|>\n",
    "user": "<|im_start|>user\n{content}<|im_end|>\n",
    "assistant_label": "<|im_start|>assistant\n",
    "assistant": "{content}",
    "turn_end": "<|im_end|>\n",
    "eot": "<|endoftext|>",
    "default_system": "",
    "input": "\n\n{content}",
    "stop": "<|im_end|>",
    "stop_multiline": "<|im_end|>",
}
# ChatML with its markers as special tokens: one id each (special_token_ids), never made from a
# message's text; generation stops on <|im_end|> (stop_ids)
CHATML_SPECIAL = {**CHATML, "special_tokens": ["<|im_start|>", "<|im_end|>"]}
BUILTIN_TEMPLATES = {"human_assistant": TEMPLATE, "alpaca": ALPACA, "chatml": CHATML,
                     "chatml_special": CHATML_SPECIAL}
# optional template fields: the markers of the template's own text that are special tokens
OPTIONAL_FIELDS = ("special_tokens",)
NEWLINE_STOP = TEMPLATE["stop"]  # default stop: the design's single-line replies
TURN_STOP = TEMPLATE["stop_multiline"]  # default stop when some training replies span lines

_encoders, _token_bytes, _declared = {}, {}, {}


def get_encoder(name=TOKENIZER):
    """tiktoken encoder, cached: GPT-2's (or another tiktoken encoding) by name, or a trained
    tokenizer's record (meta.json's / a checkpoint's "tokenizer", tokenizer.py) from its text.
    Offline, point TIKTOKEN_CACHE_DIR at a folder holding the GPT-2 BPE files."""
    if not isinstance(name, str):
        return encoding(name)
    if name not in _encoders:
        try:
            _encoders[name] = tiktoken.get_encoding(name)
        except Exception as e:  # no network and no cache: say what to do, not a long traceback
            raise MissingFileError(
                f"could not load the {name!r} tokenizer ({type(e).__name__}: {e}). Offline, export "
                f"TIKTOKEN_CACHE_DIR=/abs/path/to/tiktoken_cache "
                f"(currently {os.environ.get('TIKTOKEN_CACHE_DIR')!r})"
            ) from None
    return _encoders[name]


def special_token_ids(template, enc):
    """{marker: id} of the template's special tokens in enc's numbering: a marker enc already has
    (a tokenizer trained with it) keeps its id; the others follow the vocabulary. On GPT-2's
    vocabulary one id is left free first, the first past it, which a classifier's export takes for
    its <|pad|> (hf_gpt2.PAD_ID; <|im_start|> 50258, <|im_end|> 50259); classifiers read GPT-2's
    vocabulary only, so after a trained tokenizer's the markers follow at once."""
    ids, next_id = {}, enc.n_vocab + (enc.name == GPT2)
    for marker in (template or {}).get("special_tokens", ()):
        if marker in enc._special_tokens:
            ids[marker] = enc._special_tokens[marker]
        else:
            ids[marker], next_id = next_id, next_id + 1
    return ids


def declared_tokens(enc):
    """{marker: id} of the template-declared special tokens enc was made with (with_special_tokens):
    none for a base tokenizer, whose own specials (a trained [PAD], [UNK]) are not markers."""
    return _declared.get(enc.name, {})


def with_special_tokens(enc, ids):
    """enc with the template's special tokens ids ({marker: id}) added and declared (cached), or
    enc itself when it declares them all already; a marker a trained tokenizer has keeps its token,
    and is declared. An id that another token holds is a ConfigError."""
    ids, have = dict(ids or {}), declared_tokens(enc)
    if all(have.get(m) == i for m, i in ids.items()):
        return enc
    new = {m: i for m, i in ids.items() if enc._special_tokens.get(m) != i}
    name = f"{enc.name}+" + ",".join(f"{m}={i}" for m, i in sorted(ids.items()))
    if name not in _encoders:
        held = set(enc._mergeable_ranks.values()) | set(enc._special_tokens.values())
        taken = [f"{m}={i}" for m, i in new.items() if i in held or m in enc._special_tokens]
        if taken or len(set(ids.values())) < len(ids):
            raise ConfigError(f"special tokens {', '.join(taken) or ids} collide with the "
                              f"{enc.name!r} tokenizer's own tokens")
        _encoders[name] = tiktoken.Encoding(
            name=name, pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
            special_tokens={**enc._special_tokens, **new})
        _declared[name] = {**have, **ids}
    return _encoders[name]


def template_encoder(template, enc=None):
    """enc (default: GPT-2's) with the template's special tokens (special_token_ids); enc itself
    for a template without any, or when enc has them (a run's encoder, run_encoder)."""
    enc = enc or get_encoder()
    return with_special_tokens(enc, special_token_ids(template, enc))


def run_encoder(info):
    """The encoder of a prepared dataset's meta.json or a checkpoint: its tokenizer (get_encoder:
    GPT-2's or a trained one's record) with the template's special tokens it records (older ones
    record none). Every caller that reads a run's ids uses this one."""
    return with_special_tokens(get_encoder(info.get("tokenizer") or TOKENIZER),
                               info.get("special_tokens"))


def stop_ids(enc):
    """The ids generation stops on: <|endoftext|> and the template's declared markers
    (declared_tokens: <|im_start|>, <|im_end|>), which a reply never holds as only the template
    writes them. A trained tokenizer's other special tokens ([PAD], [UNK]) do not stop it."""
    return sorted({enc.eot_token, *declared_tokens(enc).values()})


def default_stop(multiline_replies, template=TEMPLATE):
    # .get: templates saved before these fields existed are the default template
    if multiline_replies:
        return template.get("stop_multiline", TURN_STOP)
    return template.get("stop", NEWLINE_STOP)


def fill(field, content):
    """A template field with its {content} replaced (not str.format:
    other braces in a template stay text)."""
    before, _, after = field.partition("{content}")
    return before + content + after


def load_template(name):
    """A template: a built-in one by name, or a JSON file (an object
    with exactly TEMPLATE_FIELDS, all strings)."""
    if name in BUILTIN_TEMPLATES:
        return dict(BUILTIN_TEMPLATES[name])
    if not os.path.isfile(name):
        raise ConfigError(f"--template={name}: not a built-in template "
                          f"({', '.join(BUILTIN_TEMPLATES)}) nor a file")
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
        template = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{name}: unreadable template "
                          f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(template, dict):
        raise ConfigError(f"{name}:1: a template must be a JSON object with the fields "
                          f"{', '.join(TEMPLATE_FIELDS)}")
    check_template(template, name, text)
    return template


def check_template(template, path, text=""):
    """Every field present, known and a string; {content} exactly
    where it belongs; <|endoftext|> as eot."""
    def where(key):  # file:line of the key, when it can be found
        at = text.find(json.dumps(key))
        return f"{path}:{text.count(chr(10), 0, at) + 1}" if at >= 0 else path

    for key in template:
        if key not in TEMPLATE_FIELDS + OPTIONAL_FIELDS:
            raise ConfigError(f"{where(key)}: unknown field {key!r} (a template has "
                              f"{', '.join(TEMPLATE_FIELDS)}, optionally special_tokens)")
    for key in TEMPLATE_FIELDS:
        value = template.get(key)
        if key not in template:
            raise ConfigError(f"{path}: field {key!r} is missing "
                              f"(a template has {', '.join(TEMPLATE_FIELDS)})")
        if not isinstance(value, str):
            raise ConfigError(f"{where(key)}: field {key!r} must be a string, "
                              f"got {type(value).__name__}")
        if value.count("{content}") != (key in WITH_CONTENT):
            raise ConfigError(f"{where(key)}: field {key!r} must hold {{content}} "
                              f"{'exactly once' if key in WITH_CONTENT else 'nowhere'}")
    if template["eot"] != "<|endoftext|>":
        raise ConfigError(f"{where('eot')}: field 'eot' must be \"<|endoftext|>\" "
                          "(GPT-2's end-of-text token)")
    for key in ("stop", "stop_multiline"):
        if not template[key]:
            raise ConfigError(f"{where(key)}: field {key!r} is empty: a reply needs a default stop")
    check_special_tokens(template, where("special_tokens"))


def check_special_tokens(template, where):
    """special_tokens, when present: a list of distinct non-empty strings, each written somewhere in
    the template's own text (outside {content}), none inside another."""
    markers = template.get("special_tokens", [])
    if not isinstance(markers, list) or not all(isinstance(m, str) and m for m in markers):
        raise ConfigError(f"{where}: field 'special_tokens' must be a list of non-empty strings, "
                          f"e.g. [\"<|im_start|>\", \"<|im_end|>\"]")
    own = "".join(template[key].replace("{content}", "\0") for key in TEMPLATE_FIELDS)
    for m in markers:
        if markers.count(m) > 1 or any(m != other and m in other for other in markers):
            raise ConfigError(f"{where}: special token {m!r} is listed twice or inside another")
        if m not in own:
            raise ConfigError(f"{where}: special token {m!r} appears in none of the template's "
                              f"fields")


def _segments(messages, template, add_generation_prompt):
    """Yield (text, content, learned, role) pieces of a conversation in order; content: where the
    message's text is in the piece, (start, end) in characters, or None (the template's own text).
    messages: [{'role', 'content'}]."""
    default_system = template.get("default_system", "")
    if default_system and not (messages and messages[0]["role"] == "system"):
        yield *_filled(template["system"], default_system), False, "system"
    for m in messages:
        role, content = m["role"], m["content"].strip()
        if role == "assistant":
            yield template["assistant_label"], None, False, role
            yield *_filled(template["assistant"], content), True, role
            yield template["turn_end"], None, True, role
        else:  # system or user
            yield *_filled(template[role], content), False, role
    if add_generation_prompt:
        yield template["assistant_label"], None, False, "assistant"


def _filled(field, content):
    """(fill(field, content), where content is in it)."""
    start = field.find("{content}")
    return fill(field, content), (start, start + len(content))


def _size(text):
    """Length in UTF-8 bytes (a lone surrogate counts 3, as the U+FFFD tiktoken encodes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------------------------------
# The definition of a conversation's ids and mask (render_conversation), and a prompt's ids


def marked_text(messages, template=TEMPLATE, add_generation_prompt=False):
    """(text, learned, turns) of a conversation: its text as the export's chat_template renders it
    (without the closing <|endoftext|>); the spans of it the model learns, [(start, end)]: each
    reply with its turn end, adjacent ones merged; where each user turn starts, the first at 0 (a
    system message belongs to the first turn). Offsets are UTF-8 bytes, as tokens are bytes; a lone
    surrogate counts 3, as the U+FFFD tiktoken encodes."""
    pieces, learned, turns, at = [], [], [], 0
    for text, _, is_learned, role in _segments(messages, template, add_generation_prompt):
        size = _size(text)
        if role == "user":
            turns.append(at if turns else 0)
        if is_learned and size and learned and learned[-1][1] == at:  # a turn end: its reply's span
            learned[-1] = (learned[-1][0], at + size)
        elif is_learned and size:
            learned.append((at, at + size))
        pieces.append(text)
        at += size
    return "".join(pieces), learned, turns or [0]


def token_bytes(enc):
    """The length in bytes of each token of enc, as an array indexed by token id (cached)."""
    if enc.name not in _token_bytes:
        _token_bytes[enc.name] = np.fromiter(
            (_token_size(enc, t) for t in range(enc.n_vocab)), dtype=np.int64, count=enc.n_vocab)
    return _token_bytes[enc.name]


def _token_size(enc, token):
    try:
        return len(enc.decode_single_token_bytes(token))
    except KeyError:  # an id that is no token: the free one before added special tokens
        return 0


def is_token(enc, size):
    """A boolean array of `size` ids: True where the id is a token of enc (the model's padded rows
    and the free id before added special tokens are not)."""
    real = np.zeros(max(size, enc.n_vocab), dtype=bool)
    real[list(enc._mergeable_ranks.values())] = True
    real[list(enc._special_tokens.values())] = True
    return real[:size]


def token_starts(enc, ids):
    """Where each token of ids starts, in bytes of the text they encode."""
    sizes, starts, at = token_bytes(enc), [], 0
    for t in ids:
        starts.append(at)
        at += int(sizes[t])
    return starts


def encode_text(enc, text, learned, ids=None):
    """text's ids: BPE over the whole text (`ids`, when already encoded), as a Hugging Face
    tokenizer encodes the export's chat_template. One exception: where a token would cross the edge
    of a learned span (a custom template whose label shares a token with the reply, "<bot>" and
    ".NET"), the text is cut there and the pieces encoded one by one: no token is half learned."""
    data = text.encode("utf-8", "surrogatepass")
    edges = {edge for span in learned for edge in span} - {0, len(data)}
    ids = enc.encode_ordinary(text) if ids is None else list(ids)
    cuts = set()
    # a loop: cutting at one edge may move a token onto another
    while crossed := edges - set(token_starts(enc, ids)):
        cuts |= crossed
        bounds = [0, *sorted(cuts), len(data)]
        ids = [t for a, b in zip(bounds, bounds[1:])
               for t in enc.encode_ordinary(data[a:b].decode("utf-8", "surrogatepass"))]
    return ids


def special_spans(messages, template=TEMPLATE, add_generation_prompt=False):
    """[(start, end, marker)]: where the template's special tokens are in marked_text's text, in
    UTF-8 bytes, in order. Only the template's own text is searched, never a message's: a user who
    types "<|im_end|>" gets those characters as plain text (no prompt injection)."""
    markers = template.get("special_tokens") or ()
    if not markers:
        return []
    pattern = re.compile("|".join(map(re.escape, markers)))
    spans, at = [], 0
    for text, content, _, _ in _segments(messages, template, add_generation_prompt):
        a, b = content or (len(text), len(text))
        for lo, hi in ((0, a), (b, len(text))):
            for m in pattern.finditer(text, lo, hi):
                start = at + _size(text[:m.start()])
                spans.append((start, start + _size(m.group()), m.group()))
        at += _size(text)
    return spans


def encode_marked(enc, text, learned, specials=()):
    """encode_text, with each of special_spans' markers as its one special id: the text between
    them is encoded apart, as a Hugging Face tokenizer splits a text at its added tokens."""
    if not specials:
        return encode_text(enc, text, learned)
    data, ids, at = text.encode("utf-8", "surrogatepass"), [], 0
    for start, end, marker in [*specials, (len(data), len(data), None)]:
        inner = [(max(a, at) - at, min(b, start) - at) for a, b in learned if a < start and b > at]
        ids += encode_text(enc, data[at:start].decode("utf-8", "surrogatepass"), inner)
        if marker is not None:
            if marker not in enc._special_tokens:
                raise ConfigError(f"the template's special token {marker!r} is not a token of "
                                  f"the {enc.name!r} tokenizer (see chat.template_encoder)")
            ids.append(enc._special_tokens[marker])
        at = end
    return ids


def render_conversation(messages, template=TEMPLATE, enc=None):
    """The definition of the training data: (ids, mask, turn_starts) of one conversation.

    The text is rendered with its learned spans marked (marked_text), encoded whole as the export's
    chat_template is (encode_text), and closed by <|endoftext|>; a token is learned (mask 1) when it
    starts inside a learned span, and <|endoftext|> is learned; a turn starts at the token holding
    its first byte. prepare.py renders through render_batch, the same for many conversations at
    once; tests/test_render.py checks they agree."""
    enc = template_encoder(template, enc)
    text, learned, turns = marked_text(messages, template)
    ids = encode_marked(enc, text, learned, special_spans(messages, template)) + [enc.eot_token]
    starts = token_starts(enc, ids)  # <|endoftext|> starts where the text ends
    mask = [int(any(a <= s < b for a, b in learned)) for s in starts[:-1]] + [1]
    return ids, mask, [bisect.bisect_right(starts, t) - 1 for t in turns]


def render_prompt(messages, template=TEMPLATE, enc=None):
    """Generation rendering: the conversation so far (ending with a user message) plus `Assistant:`;
    the very ids the same conversation has in training, up to where the reply starts."""
    text, learned, _ = marked_text(messages, template, add_generation_prompt=True)
    return encode_marked(template_encoder(template, enc), text, learned,
                         special_spans(messages, template, add_generation_prompt=True))


def render_text(messages, template=TEMPLATE, add_generation_prompt=False):
    """The conversation as text (without the closing <|endoftext|>):
    what the export's chat_template renders."""
    return marked_text(messages, template, add_generation_prompt)[0]


def fit_context(system, history, template, enc, budget):
    """Prompt ids for the conversation: the oldest turns are dropped until it fits budget tokens
    (the system message always stays; a single message too long to fit keeps its end). Returns (ids,
    kept history)."""
    head = [{"role": "system", "content": system}] if system else []
    while True:
        ids = render_prompt(head + history, template, enc)
        if len(ids) <= budget or len(history) == 1:
            return ids[-budget:], history
        history = history[2:]  # one user message and the assistant's reply


def chat_template(template=TEMPLATE):
    """A Jinja chat_template (for a Hugging Face tokenizer_config.json) rendering exactly what
    render_prompt and render_conversation render with `template` (contents stripped, the
    `<|endoftext|>` closing a finished conversation, `Assistant:` as the generation prompt)."""
    def lit(text):  # a Jinja string literal
        return json.dumps(text, ensure_ascii=False)

    def role_text(key, content="message['content'] | trim"):
        before, _, after = template[key].partition("{content}")  # as fill() does
        return f"{{{{ {lit(before)} + ({content}) + {lit(after)} }}}}"

    default_system = template.get("default_system", "")
    default = (  # a conversation without a system message gets the template's default one
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        f"{{{{ {lit(fill(template['system'], default_system))} }}}}{{%- endif -%}}"
        if default_system else "")
    return (
        default +
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}" + role_text("system") +
        "{%- elif message['role'] == 'user' -%}" + role_text("user") +
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{ {lit(template['assistant_label'])} }}}}" + role_text("assistant") +
        f"{{{{ {lit(template['turn_end'])} }}}}"
        "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {lit(template['assistant_label'])} }}}}"
        f"{{%- else -%}}{{{{ {lit(template['eot'])} }}}}{{%- endif -%}}"
    )


# --------------------------------------------------------------------------------------------------
# The fast path: many conversations (or documents) at once, back to back in numpy (prepare.py)

class Rendered:
    """Conversations (or documents) rendered back to back: ids (uint16; uint32 for a vocabulary
    above 65,536) and mask (uint8) of them all, tokens starts[i]:starts[i + 1] are conversation i,
    turns the offsets where a turn starts (a conversation's first turn at its start)."""

    def __init__(self, ids, mask, starts, turns):
        self.ids, self.mask, self.starts, self.turns = ids, mask, starts, turns

    def __len__(self):
        return len(self.starts) - 1

    def conversation(self, i):
        """(ids, mask, turn_starts) of conversation i, as lists;
        turn_starts relative to its start."""
        a, b = self.starts[i], self.starts[i + 1]
        turns = self.turns[np.searchsorted(self.turns, a):np.searchsorted(self.turns, b)] - a
        return self.ids[a:b].tolist(), self.mask[a:b].tolist(), turns.tolist()

    def select(self, keep):
        """Only the conversations i with keep[i]."""
        keep = np.asarray(keep, dtype=bool)
        lengths = np.diff(self.starts)
        tokens = np.repeat(keep, lengths)
        conv_of_turn = np.searchsorted(self.starts, self.turns, side="right") - 1
        # the tokens dropped before each conversation
        shift = self.starts[:-1] - np.concatenate([[0], np.cumsum(lengths * keep)[:-1]])
        return Rendered(self.ids[tokens], self.mask[tokens],
                        np.concatenate([[0], np.cumsum(lengths[keep])]),
                        (self.turns - shift[conv_of_turn])[keep[conv_of_turn]])


def documents(ids, starts):
    """Plain-text documents (encode_closed's ids and starts): every token learned."""
    return Rendered(ids, np.ones(len(ids), dtype=np.uint8), starts, starts[:-1])


def encode_closed(enc, texts, chunk=64, dtype=np.uint16, threads=8):
    """(ids in dtype (dataset.token_dtype's), starts): encode_ordinary(text) + [<|endoftext|>] for
    each text, back to back, text i at ids[starts[i]:starts[i + 1]]. Encoded `chunk` texts at a
    time, joined by <|endoftext|> (which BPE never merges across), in tiktoken's threads: a thread
    task per short text would cost more than its encoding."""
    if any(EOT_TEXT in text for text in texts):  # typed by a user, it stays text: encode one by one
        return _close(enc.encode_ordinary_batch(texts, num_threads=threads), enc.eot_token, dtype)
    joined = [EOT_TEXT.join(texts[i:i + chunk]) + EOT_TEXT for i in range(0, len(texts), chunk)]
    encoded = enc.encode_batch(joined, allowed_special={EOT_TEXT}, num_threads=threads)
    ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype,
                      count=sum(map(len, encoded)))
    return ids, np.concatenate([[0], np.flatnonzero(ids == enc.eot_token) + 1])


def _close(encoded, eot=EOT, dtype=np.uint16):
    """The token lists back to back, each followed by <|endoftext|> (eot): (ids in dtype, starts)."""
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + 1
    starts = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.fromiter(itertools.chain.from_iterable(t + [eot] for t in encoded), dtype=dtype,
                      count=starts[-1])
    return ids, starts



def render_batch(conversations, template=TEMPLATE, enc=None, dtype=np.uint16, threads=8):
    """render_conversation of many conversations at once, as one Rendered: the texts encoded in
    tiktoken's threads (encode_closed), the mask and turns found with numpy from where each token
    starts. A template with special tokens renders one conversation at a time (render_each)."""
    if template.get("special_tokens"):
        return render_each(conversations, template, enc, dtype)
    enc = enc or get_encoder()
    marked = [marked_text(messages, template) for messages in conversations]
    ids, starts = encode_closed(enc, [text for text, _, _ in marked], dtype=dtype, threads=threads)
    rendered, crossed = _assemble(ids, starts, marked, enc)
    if crossed:  # a token crosses a learned edge (a custom template): encode_text cuts it there
        encoded = [ids[a:b - 1].tolist() for a, b in zip(starts[:-1], starts[1:])]
        for i in crossed:
            encoded[i] = encode_text(enc, *marked[i][:2], encoded[i])
        rendered, _ = _assemble(*_close(encoded, enc.eot_token, dtype), marked, enc)
    return rendered


def _assemble(ids, starts, marked, enc):
    """(Rendered, []) of the conversations' ids (encode_closed's) and marked texts; (None, the
    indexes of the conversations where a token crosses a learned span's edge) if there are any."""
    sizes = token_bytes(enc)[ids]
    sizes[starts[1:] - 1] = 0  # <|endoftext|> is not part of the text
    # where each token starts, in bytes of the texts back to back
    token_at = np.cumsum(sizes) - sizes
    text_at = token_at[starts[:-1]]  # where each conversation's text starts
    # the learned spans' edges, ascending: start, end, start, ...
    bounds = np.fromiter((text_at[i] + edge for i, (_, learned, _) in enumerate(marked)
                          for span in learned for edge in span), dtype=np.int64)
    aligned = token_at[np.minimum(np.searchsorted(token_at, bounds), len(ids) - 1)] == bounds
    if not aligned.all():
        return None, sorted({int(i) for i in
                             np.searchsorted(text_at, bounds[~aligned], side="right") - 1})
    # a token inside a learned span has an odd number of edges at or before its start
    mask = (np.searchsorted(bounds, token_at, side="right") & 1).astype(np.uint8)
    mask[starts[1:] - 1] = 1  # <|endoftext|>
    turn_at = np.fromiter((text_at[i] + t for i, (_, _, turns) in enumerate(marked) for t in turns),
                          dtype=np.int64)
    return Rendered(ids, mask, starts, np.searchsorted(token_at, turn_at, side="right") - 1), []


def render_each(conversations, template=TEMPLATE, enc=None, dtype=np.uint16):
    """render_batch through render_conversation, one conversation at a time (ids in dtype)."""
    done = [render_conversation(messages, template, enc) for messages in conversations]
    starts = np.concatenate([[0], np.cumsum([len(ids) for ids, _, _ in done])]).astype(np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(d[0] for d in done), dtype=dtype,
                      count=starts[-1])
    mask = np.fromiter(itertools.chain.from_iterable(d[1] for d in done), dtype=np.uint8,
                       count=starts[-1])
    turns = np.fromiter((start + t for start, (_, _, ts) in zip(starts, done) for t in ts),
                        dtype=np.int64)
    return Rendered(ids, mask, starts, turns)
