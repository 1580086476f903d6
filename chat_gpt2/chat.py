"""The chat template, shared by the prepared data (training), the engine's prompts (sample, eval) and export.

A template is a dict of strings (TEMPLATE_FIELDS); prepare.py picks one (--template: human_assistant, alpaca,
chatml, or a JSON file with the same fields, see load_template and docs/data.md), and it travels in meta.json and
every checkpoint. The default, human_assistant, renders a conversation as (the exact bytes, `{...}` replaced by the
message text with surrounding whitespace stripped):

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

from .errors import ConfigError, MissingFileError

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
    "default_system": "",  # rendered as the system message of a conversation that has none ("" = nothing)
    "input": "\n{content}",  # appended to an instruction record's instruction when its "input" is not empty
    "stop": "\n",  # the default stop when every reply of the data is one line
    "stop_multiline": "\nHuman:",  # the default stop when some replies span lines
}
TEMPLATE_FIELDS = tuple(TEMPLATE)
WITH_CONTENT = ("system", "user", "assistant", "input")  # the fields that hold "{content}" (exactly once)
# Alpaca (Stanford's prompt, exactly); a record's input joins the instruction as its "### Input:" section.
# Several turns are successive instruction/response blocks; only the last reply is closed (by <|endoftext|>).
ALPACA = {
    "system": "{content}",
    "user": "\n\n### Instruction:\n{content}",
    "assistant_label": "\n\n### Response:\n",
    "assistant": "{content}",
    "turn_end": "",
    "eot": "<|endoftext|>",
    "default_system": "Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.",
    "input": "\n\n### Input:\n{content}",
    "stop": "\n",
    "stop_multiline": "\n\n### Instruction:",
}
# ChatML's markers as plain text (GPT-2's vocabulary has no such special tokens: they are several tokens each).
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
BUILTIN_TEMPLATES = {"human_assistant": TEMPLATE, "alpaca": ALPACA, "chatml": CHATML}
NEWLINE_STOP = TEMPLATE["stop"]  # default stop: the design's single-line replies
TURN_STOP = TEMPLATE["stop_multiline"]  # default stop when training replies span several lines (plus <|endoftext|>)

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


def default_stop(multiline_replies, template=TEMPLATE):
    # .get: templates saved before these fields existed are the default template
    if multiline_replies:
        return template.get("stop_multiline", TURN_STOP)
    return template.get("stop", NEWLINE_STOP)


def fill(field, content):
    """A template field with its {content} replaced (not str.format: other braces in a template stay text)."""
    before, _, after = field.partition("{content}")
    return before + content + after


def load_template(name):
    """A template: a built-in one by name, or a JSON file (an object with exactly TEMPLATE_FIELDS, all strings)."""
    if name in BUILTIN_TEMPLATES:
        return dict(BUILTIN_TEMPLATES[name])
    if not os.path.isfile(name):
        raise ConfigError(f"--template={name}: not a built-in template ({', '.join(BUILTIN_TEMPLATES)}) nor a file")
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
        template = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{name}: unreadable template ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(template, dict):
        raise ConfigError(f"{name}:1: a template must be a JSON object with the fields {', '.join(TEMPLATE_FIELDS)}")
    check_template(template, name, text)
    return template


def check_template(template, path, text=""):
    """Every field present, known and a string; {content} exactly where it belongs; <|endoftext|> as eot."""
    def where(key):  # file:line of the key, when it can be found
        at = text.find(json.dumps(key))
        return f"{path}:{text.count(chr(10), 0, at) + 1}" if at >= 0 else path

    for key in template:
        if key not in TEMPLATE_FIELDS:
            raise ConfigError(f"{where(key)}: unknown field {key!r} (a template has {', '.join(TEMPLATE_FIELDS)})")
    for key in TEMPLATE_FIELDS:
        value = template.get(key)
        if key not in template:
            raise ConfigError(f"{path}: field {key!r} is missing (a template has {', '.join(TEMPLATE_FIELDS)})")
        if not isinstance(value, str):
            raise ConfigError(f"{where(key)}: field {key!r} must be a string, got {type(value).__name__}")
        if value.count("{content}") != (key in WITH_CONTENT):
            raise ConfigError(f"{where(key)}: field {key!r} must hold {{content}} "
                              f"{'exactly once' if key in WITH_CONTENT else 'nowhere'}")
    if template["eot"] != "<|endoftext|>":
        raise ConfigError(f"{where('eot')}: field 'eot' must be \"<|endoftext|>\" (GPT-2's end-of-text token)")
    for key in ("stop", "stop_multiline"):
        if not template[key]:
            raise ConfigError(f"{where(key)}: field {key!r} is empty: a reply needs a default stop")


def _segments(messages, template, add_generation_prompt):
    """Yield (text, learned, role) pieces of a conversation in order. messages: [{'role', 'content'}]."""
    default_system = template.get("default_system", "")
    if default_system and not (messages and messages[0]["role"] == "system"):
        yield fill(template["system"], default_system), False, "system"
    for m in messages:
        role, content = m["role"], m["content"].strip()
        if role == "assistant":
            yield template["assistant_label"], False, role
            yield fill(template["assistant"], content), True, role
            yield template["turn_end"], True, role
        else:  # system or user
            yield fill(template[role], content), False, role
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
        before, _, after = template[key].partition("{content}")  # as fill() does
        return f"{{{{ {lit(before)} + ({content}) + {lit(after)} }}}}"

    default_system = template.get("default_system", "")
    default = (  # a conversation without a system message gets the template's default one
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        f"{{{{ {lit(fill(template['system'], default_system))} }}}}{{%- endif -%}}" if default_system else "")
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
