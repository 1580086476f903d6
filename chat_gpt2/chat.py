"""The one chat template, shared by the prepared data (training), the engine's prompts (sample, eval) and export.

A conversation renders as (the exact bytes, `{...}` replaced by the message text with surrounding whitespace
stripped):

    System: {system}\\n                       <- only when the conversation has a system message
    Human: {user}\\nAssistant: {assistant}\\n\\n  <- one block per turn
    <|endoftext|>                            <- token 50256, once at the end of the conversation

`render_conversation` returns the token ids *and* the loss mask in one pass, so training and sampling can never
disagree on the format: the mask is 1 exactly on what the assistant must learn to produce (its reply, which starts
with the space after `Assistant:`, the turn's closing `\\n\\n`, and the final `<|endoftext|>`), 0 elsewhere.
User-supplied text is tokenised with `encode_ordinary`, so a literal `<|endoftext|>` typed by a user stays text.
"""
import json
import os

import tiktoken

from .errors import MissingFileError

TOKENIZER = "gpt2"
EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257  # real GPT-2 vocabulary; the model may pad its embedding beyond this
NEWLINE_TOKENS = (198, 628, 44320)  # every GPT-2 token that contains a newline: "\n", "\n\n", "\n\xa0"

# Stored in meta.json and every checkpoint; `export.py` turns it into a Hugging Face chat_template.
TEMPLATE = {
    "system": "System: {content}\n",
    "user": "Human: {content}\n",
    "assistant_label": "Assistant:",  # what a generation prompt ends with
    "assistant": " {content}",  # the reply, learned
    "turn_end": "\n\n",  # closes an assistant turn, learned
    "eot": "<|endoftext|>",  # closes a conversation, learned
}
NEWLINE_STOP = "\n"  # default stop: the design's single-line replies
TURN_STOP = "\nHuman:"  # default stop when training replies span several lines (plus <|endoftext|>)

_encoders = {}


def get_encoder(name=TOKENIZER):
    """tiktoken encoder, cached. Offline, point TIKTOKEN_CACHE_DIR at a folder holding the GPT-2 BPE files."""
    if name not in _encoders:
        try:
            _encoders[name] = tiktoken.get_encoding(name)
        except Exception as e:  # no network and no cache: say what to do instead of a long traceback
            raise MissingFileError(
                f"could not load the {name!r} tokenizer ({type(e).__name__}: {e}). Offline, export "
                f"TIKTOKEN_CACHE_DIR=/abs/path/to/tiktoken_cache (currently {os.environ.get('TIKTOKEN_CACHE_DIR')!r})"
            ) from None
    return _encoders[name]


def default_stop(multiline_replies):
    return TURN_STOP if multiline_replies else NEWLINE_STOP


def _segments(messages, template, add_generation_prompt):
    """Yield (text, learned, role) pieces of a conversation in order. messages: [{'role', 'content'}]."""
    for m in messages:
        role, content = m["role"], m["content"].strip()
        if role == "assistant":
            yield template["assistant_label"], False, role
            yield template["assistant"].format(content=content), True, role
            yield template["turn_end"], True, role
        else:  # system or user
            yield template[role].format(content=content), False, role
    if add_generation_prompt:
        yield template["assistant_label"], False, "assistant"


def render_conversations(conversations, template=TEMPLATE, enc=None):
    """Training rendering of many conversations at once (tiktoken's batch encoder uses threads).

    Returns one (ids, mask, turn_starts) per conversation. turn_starts are the offsets of each user turn (the
    first is 0: a system message belongs to the first turn) so training windows can start on a turn boundary."""
    enc = enc or get_encoder()
    pieces = [list(_segments(messages, template, False)) for messages in conversations]
    encoded = iter(enc.encode_ordinary_batch([text for conv in pieces for text, _, _ in conv]))
    rendered = []
    for conv in pieces:
        ids, mask, turn_starts = [], [], []
        for _, learned, role in conv:
            if role == "user":
                turn_starts.append(len(ids) if turn_starts else 0)
            toks = next(encoded)
            ids += toks
            mask += [int(learned)] * len(toks)
        rendered.append((ids + [EOT], mask + [1], turn_starts or [0]))
    return rendered


def render_conversation(messages, template=TEMPLATE, enc=None):
    return render_conversations([messages], template, enc)[0]


def render_prompt(messages, template=TEMPLATE, enc=None):
    """Generation rendering: the conversation so far (ending with a user message) plus `Assistant:`."""
    enc = enc or get_encoder()
    ids = []
    for text, _, _ in _segments(messages, template, True):
        ids += enc.encode_ordinary(text)
    return ids


def fit_context(system, history, template, enc, budget):
    """Prompt ids for the conversation: the oldest turns are dropped until it fits budget tokens (the system
    message always stays; a single message too long to fit keeps its end). Returns (ids, kept history)."""
    head = [{"role": "system", "content": system}] if system else []
    while True:
        ids = render_prompt(head + history, template, enc)
        if len(ids) <= budget or len(history) == 1:
            return ids[-budget:], history
        history = history[2:]  # one user message and the assistant's reply


def chat_template(template=TEMPLATE):
    """A Jinja chat_template (for a Hugging Face tokenizer_config.json) rendering exactly what render_prompt and
    render_conversation render with `template` (contents stripped, the
    `<|endoftext|>` closing a finished conversation, `Assistant:` as the generation prompt)."""
    def lit(text):  # a Jinja string literal
        return json.dumps(text, ensure_ascii=False)

    def role_text(key, content="message['content'] | trim"):
        before, _, after = template[key].partition("{content}")
        return f"{{{{ {lit(before)} + ({content}) + {lit(after)} }}}}"

    return (
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
