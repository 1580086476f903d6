"""GPT-2's tokenizer in Hugging Face's files (vocab.json, merges.txt, tokenizer.json, ...), rebuilt from tiktoken's
own ranks: an export needs no download, and AutoTokenizer.from_pretrained(DIR) loads it as it is."""
import functools

from . import chat

EOT_TEXT = "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (vocab.json's alphabet)."""
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


def _bpe_parts(token, ranks, max_rank):
    """Split token (bytes) the way BPE builds it using only the merges ranked below max_rank (tiktoken's algorithm:
    repeatedly merge the adjacent pair whose concatenation has the lowest rank)."""
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
    """(vocab: {token string: id}, merges: ["a b", ...] in priority order) of a tiktoken byte-level BPE encoding.

    Every multi-byte token is the merge of the two tokens BPE has built from its bytes just before it (using the
    lower-ranked merges only); ranks >= 256 are GPT-2's merges in order, so merge i makes token 256 + i. The result
    equals OpenAI's encoder.json / vocab.bpe (tests/test_hf_tokenizer.py). Cached: do not modify what it returns."""
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
            raise RuntimeError(f"cannot recover the BPE merge that makes token {rank} {token!r}: got {parts}")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    for name, rank in enc._special_tokens.items():
        vocab[name] = rank
    return vocab, merges


def tokenizer_files(enc, template, block_size):
    """{filename: JSON-able object or text} for a GPT-2 tokenizer that AutoTokenizer loads without a download."""
    vocab, merges = gpt2_vocab_and_merges(enc)
    eot = {"content": EOT_TEXT, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
           "special": True}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {  # the `tokenizers` serialisation of GPT-2's fast tokenizer
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": chat.EOT, **eot}],
        "normalizer": None, "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False}, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT,
        "model_max_length": block_size, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(chat.EOT): eot},
        "chat_template": chat.chat_template(template),
    }
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT}
    return {
        "vocab.json": vocab,
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special,
    }

