"""A tokenizer of one's own: a byte-level BPE trained on a corpus (prepare.py --task=tokenizer),
kept in a folder as a Hugging Face tokenizer.json and used through tiktoken, so that everything
that takes a tiktoken Encoding (rendering, prepare.py's batch encoding, the engine, the exports)
takes it as it takes GPT-2's: chat.get_encoder(record) is its Encoding (encoding, below).

Training (build.train_bpe, over build.corpus_texts): the `tokenizers` library's BPE trainer over GPT-2's pre-tokenisation (its split regex,
byte-level alphabet); its merges are then renumbered as GPT-2's are: the 256 bytes are ids 0..255,
merge i makes id 256 + i, the special tokens follow (<|endoftext|> first). In that order a token's
id is its merge rank, which is what tiktoken's encoder reads (mergeable_ranks), and the
tokenizer.json written is the one export.py writes (hf_tokenizer.tokenizer_json), so transformers,
`tokenizers` and tiktoken give the same ids (tests/test_tokenizer.py).

What travels (`tokenizer` in meta.json and every checkpoint): "gpt2" (tiktoken's GPT-2, the
default, as before) or a record {"name", "sha256" (of the tokenizer.json text), "n_vocab", "eot",
"special_tokens", "split"}; a dataset folder holds the tokenizer.json beside meta.json, a
checkpoint its text under "json" (a plain string: torch.load(weights_only=True) reads it).
"""
import hashlib
import json
import os

import tiktoken

from .errors import ConfigError, InputError, MissingFileError
from .files import atomic_write

GPT2 = "gpt2"  # GPT-2's tokenizer, by its tiktoken name: the default (chat.TOKENIZER)
EOT_TEXT = "<|endoftext|>"  # every tokenizer's end token (chat.EOT_TEXT)

# tiktoken's GPT-2 split (tiktoken_ext.openai_public's r50k pattern; tests check they agree)
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)"""
                r"""|\s""")
FILE = "tokenizer.json"  # in a tokenizer folder and a dataset folder
VOCAB_MULTIPLE = 64  # a model's embedding rows: the vocabulary rounded up to this (GPT-2: 50304)
MAX_VOCAB = 1 << 20  # a sanity bound on --vocab_size
_encodings = {}


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable
    unicode characters (vocab.json's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def padded_vocab(n_vocab):
    """The embedding rows of a model for an n_vocab tokenizer: rounded up to VOCAB_MULTIPLE."""
    return -(-n_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_training(vocab_size, special_tokens):
    """The special tokens to train with (<|endoftext|> first, once each): vocab_size must hold the
    256 bytes, them, and at least one merge."""
    specials = list(dict.fromkeys([EOT_TEXT, *special_tokens]))
    if any(not s for s in specials):
        raise ConfigError("--special_tokens: an empty name (comma-separated names, e.g. "
                          "--special_tokens='<|im_start|>,<|im_end|>')")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"--vocab_size must be an integer, got {vocab_size!r}")
    smallest = 256 + len(specials) + 1
    if not smallest <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"--vocab_size={vocab_size}: a byte-level BPE needs the 256 bytes, "
                          f"{len(specials)} special token(s) and at least one merge: between "
                          f"{smallest} and {MAX_VOCAB:,}")
    return specials


def write_tokenizer(text, out_dir):
    """Write tokenizer.json's text into out_dir (atomically, the folder made when missing)."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, FILE), "w") as f:
        f.write(text)
    return os.path.join(out_dir, FILE)


# --------------------------------------------------------------------------------------------------
# Reading: the record that travels, and its tiktoken Encoding


def encoding_from_json(text, name="trained"):
    """A tiktoken Encoding of tokenizer.json's text: a byte-level BPE with GPT-2's split whose ids
    are its merge ranks (what train_bpe and export.py write); other tokenizers are refused."""
    try:
        data = json.loads(text)
        model, pre = data["model"], data.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get(
                "use_regex", True) or pre.get("add_prefix_space"):
            raise ValueError("not a byte-level BPE with GPT-2's split (model BPE, pre_tokenizer "
                             "ByteLevel with use_regex and no prefix space)")
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t["special"]}
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        ranks = {bytes(byte_of[c] for c in token): i for token, i in model["vocab"].items()
                 if token not in specials}  # the vocabulary lists the special tokens too
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{name}: not a tokenizer this project reads ({type(e).__name__}: "
                         f"{e})") from None
    ids = sorted([*ranks.values(), *specials.values()])
    if ids != list(range(len(ids))) or EOT_TEXT not in specials:
        raise InputError(f"{name}: its ids are not 0..{len(ids) - 1} or it has no "
                         f"{EOT_TEXT}: train it with prepare.py --task=tokenizer")
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials, explicit_n_vocab=len(ids))


def record_of(text, name):
    """The record of a tokenizer (see the module docstring) whose tokenizer.json text is text,
    with the text itself under "json"."""
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    enc = encoding({"sha256": sha, "json": text, "name": name})
    return {"name": name, "sha256": sha, "n_vocab": enc.n_vocab, "eot": enc.eot_token,
            "special_tokens": sorted(enc.special_tokens_set, key=enc._special_tokens.get),
            "split": "gpt2", "json": text}


def load_tokenizer(path):
    """--tokenizer=PATH: "gpt2" (GPT-2's), a tokenizer folder or its tokenizer.json -> its record
    ("gpt2" or a record with the text)."""
    if path in ("", "gpt2"):
        return GPT2
    file = os.path.join(path, FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise MissingFileError(f"--tokenizer={path}: no tokenizer folder (with a {FILE}) nor file "
                               f"there: train one with `python prepare.py CORPUS.txt "
                               f"--task=tokenizer --out_dir={path}`, or pass gpt2")
    with open(file, encoding="utf-8") as f:
        text = f.read()
    name = os.path.basename(os.path.dirname(os.path.abspath(file))) or "tokenizer"
    return record_of(text, name)


def stored(record):
    """What meta.json says of a tokenizer: the record without its text (the file holds it)."""
    return record if isinstance(record, str) else {
        **{k: v for k, v in record.items() if k != "json"}, "file": FILE}


def attach(record, folder):
    """A dataset's meta.json record with its tokenizer.json text read from folder, checked against
    the sha256 it was prepared with (a name such as "gpt2" comes back as it is)."""
    if not isinstance(record, dict):
        return record
    path = os.path.join(folder, record.get("file", FILE))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InputError(f"{path}: the dataset's tokenizer is unreadable ({type(e).__name__}: "
                         f"{e}): run prepare.py again") from None
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != record.get("sha256"):
        raise InputError(f"{path}: not the tokenizer the dataset was prepared with (its sha256 "
                         f"differs from meta.json's): run prepare.py again")
    return {**record, "json": text}


def encoding(record):
    """The tiktoken Encoding of a trained tokenizer's record (from its text), cached by its sha256:
    chat.get_encoder's way to a record (GPT-2's comes from tiktoken by name)."""
    key = record["sha256"]
    if key not in _encodings:
        _encodings[key] = encoding_from_json(record["json"], f"bpe-{key[:16]}")
    return _encodings[key]


def identity(record):
    """What makes two tokenizers the same: GPT-2's name, or a trained one's sha256."""
    return record if record is None or isinstance(record, str) else record["sha256"]


def describe(record):
    """A tokenizer for messages: gpt2, or shakespeare-8k (8,192 tokens, sha256 0123456789ab)."""
    if record is None or isinstance(record, str):
        return record or GPT2
    return f"{record['name']} ({record['n_vocab']:,} tokens, sha256 {record['sha256'][:12]})"


def check_same(ours, theirs, what):
    """A one-line ConfigError when two tokenizers differ: what says whose they are, e.g. "the
    dataset data/x is tokenized with {ours}, but the checkpoint y with {theirs}"."""
    if identity(ours or GPT2) != identity(theirs or GPT2):
        raise ConfigError(what.format(ours=describe(ours), theirs=describe(theirs))
                          + ": a model reads only the tokenizer it was trained with (prepare the "
                          "data again with --tokenizer=... the model's)")
