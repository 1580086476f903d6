"""GPT-2's tokenizer in Hugging Face's files (vocab.json, merges.txt,
tokenizer.json, ...), rebuilt from tiktoken's
own ranks: an export needs no download, and AutoTokenizer.from_pretrained(DIR) loads it as it is."""
import functools

from . import chat
from .hf_gpt2 import PAD_ID
from .tokenizer import bytes_to_unicode  # noqa: F401  (vocab.json's alphabet; also imported from here)

EOT_TEXT = "<|endoftext|>"
PAD_TEXT = "<|pad|>"  # a classifier export's pad token (PAD_ID)


def _bpe_parts(token, ranks, max_rank):
    """Split token (bytes) the way BPE builds it using only the merges ranked below max_rank
    (tiktoken's algorithm: repeatedly merge the adjacent pair whose concatenation has the lowest
    rank)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


@functools.lru_cache(maxsize=2)
def gpt2_vocab_and_merges(enc):
    """(vocab: {token string: id}, merges: ["a b", ...] in priority
    order) of a tiktoken byte-level BPE encoding.

    Every multi-byte token is the merge of the two tokens BPE has built from its bytes just before
    it (using the lower-ranked merges only); ranks >= 256 are GPT-2's merges in order, so merge i
    makes token 256 + i. The result equals OpenAI's encoder.json / vocab.bpe
    (tests/test_hf_tokenizer.py). Cached: do not modify what it returns."""
    ranks = enc._mergeable_ranks  # bytes -> rank; tiktoken's public API has no accessor for it
    byte_char = bytes_to_unicode()

    def text(b):
        return "".join(byte_char[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise RuntimeError(f"cannot recover the BPE merge that makes token {rank} {token!r}: "
                               f"got {parts}")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    for name, rank in enc._special_tokens.items():
        vocab[name] = rank
    return vocab, merges


def added_token(text, normalized=True):
    """A special token's entry in tokenizer.json's added_tokens (with its id) and
    tokenizer_config.json's added_tokens_decoder; a template's markers are matched as they are
    written (not normalized)."""
    return {"content": text, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": True}


def tokenizer_json(enc, added=None):
    """The `tokenizers` serialisation (tokenizer.json) of a byte-level BPE tiktoken encoding with
    GPT-2's split (GPT-2's own, or a trained one: tokenizer.py): its vocabulary, the merges
    recovered from its ranks, its special tokens as added tokens (added: only those, by text)."""
    vocab, merges = gpt2_vocab_and_merges(enc)
    specials = {t: i for t, i in enc._special_tokens.items() if added is None or t in added}
    markers = chat.declared_tokens(enc)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, **added_token(text, text not in markers)}
                         for text, i in sorted(specials.items(), key=lambda t: t[1])],
        "normalizer": None, "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False}, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_files(enc, template, block_size, classify=False):
    """{filename: JSON-able object or text} for a GPT-2 tokenizer that AutoTokenizer loads without a
    download: a language model's, whose chat_template renders template, or with classify a
    classifier's (classify_tokenizer). enc: GPT-2's or a trained byte-level BPE (the run's encoder,
    chat.run_encoder), whose <|endoftext|> (enc.eot_token) is the bos / eos / unk / pad token. The
    added tokens are the data's special tokens: <|endoftext|> and a template's markers
    (chat.declared_tokens), each encoded as its one id wherever its text is, the chat_template's
    markers included; a trained tokenizer's others are in the vocabulary but, as in our encoding,
    never made from text."""
    vocab, merges = gpt2_vocab_and_merges(enc)
    markers = chat.declared_tokens(enc)
    added = {EOT_TEXT: enc.eot_token, **markers}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT,
        "model_max_length": block_size, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): added_token(t, t not in markers) for t, i in
                                 sorted(added.items(), key=lambda t: t[1])},
    }
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT,
               "pad_token": EOT_TEXT}
    files = {
        "vocab.json": vocab,
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": tokenizer_json(enc, added=set(added)),
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special,
    }
    if classify:
        classify_tokenizer(files)
    else:
        tokenizer_config["chat_template"] = chat.chat_template(template)
    return files


def classify_tokenizer(files):
    """Make tokenizer_files' files a classifier's, in place. A text is encoded as classify_data
    encodes it: its tokens then <|endoftext|>, the token the head reads (a TemplateProcessing
    post-processor in tokenizer.json, and add_eos_token for transformers' own GPT-2 tokenizer
    class), special tokens' text in it read as plain text (split_special_tokens: tiktoken's
    encode_ordinary); one longer than model_max_length keeps its end when truncated (truncation_side
    left); padding goes on the right with <|pad|> (PAD_ID), not <|endoftext|>:
    GPT2ForSequenceClassification reads each row's last token that is not the pad token."""
    tokenizer_json, config = files["tokenizer.json"], files["tokenizer_config.json"]
    eot = config["added_tokens_decoder"][str(chat.EOT)]  # classifiers are GPT-2's vocabulary
    pad = {**eot, "content": PAD_TEXT, "normalized": False}

    def seq(name, type_id):
        return [{"Sequence": {"id": name, "type_id": type_id}},
                {"SpecialToken": {"id": EOT_TEXT, "type_id": type_id}}]

    tokenizer_json["added_tokens"] = tokenizer_json["added_tokens"] + [{"id": PAD_ID, **pad}]
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": {EOT_TEXT: {"id": EOT_TEXT, "ids": [chat.EOT], "tokens": [EOT_TEXT]}}}
    config.update(pad_token=PAD_TEXT, add_eos_token=True, split_special_tokens=True,
                  padding_side="right", truncation_side="left",
                  added_tokens_decoder={str(chat.EOT): eot, str(PAD_ID): pad})
    files["special_tokens_map.json"]["pad_token"] = PAD_TEXT
