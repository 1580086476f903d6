"""chat_gpt2/hf_tokenizer.py: the GPT-2 tokenizer files of an export (conftest.py's exported) encode like tiktoken,
equal OpenAI's originals, and carry a chat_template that renders exactly our template."""
import json
import os
import random
import shutil

import pytest

from chat_gpt2 import chat, hf_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import helpers
    helpers.offline(monkeypatch)


def corpus():
    """Varied text: English, code, numbers, whitespace runs, contractions, accents, CJK, emoji, random unicode."""
    texts = [
        "Hello world! It's a test, isn't it? We'll see; they've gone, I'd say.",
        "  leading and trailing spaces   \n\n\tand tabs\r\nand CRLF \u00a0nbsp",
        "def f(x):\n    return x ** 2  # comment\n\n\nprint(f(12345678901234567890))",
        "Ünïcödé, naïve café, Привет мир, 你好世界, こんにちは, 안녕하세요, مرحبا",
        "emoji 😀🎉👍🏽 and family 👨‍👩‍👧‍👦, math ∑∫√∞ ≤ ≥, arrows → ←",
        "Human: What is 2+2?\nAssistant: 4\n\n", "<|endoftext|> inside text and <|endoftext|>",
        "", " ", "\n", "a" * 300, "1234 12,345.67 3.14159e-10 0x1F", "'s 're 've 'm 'll 'd ' S'S",
    ]
    rng = random.Random(0)
    alphabet = [chr(c) for c in list(range(32, 127)) + list(range(0xA0, 0x250)) + list(range(0x4E00, 0x4E40))
                + [0x1F600, 0x1F680, 0x200D, 0x0301]] + [" ", " ", "\n", "\t"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(200)]
    return texts


CONVERSATIONS = [
    [{"role": "user", "content": "What is 7 plus 5?"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi there\n"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "What's 2+2?"}, {"role": "assistant", "content": " 4 "}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "multi\nline"},
     {"role": "assistant", "content": "reply\nover lines"}, {"role": "user", "content": "ünïcödé 😀"}],
]


def test_tokenizer_encodes_like_tiktoken(exported, tmp_path):
    _, out = exported[True]
    enc = chat.get_encoder()
    slow_dir = tmp_path / "vocab-merges-only"  # what a loader that ignores tokenizer.json sees
    slow_dir.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(out, name), slow_dir / name)
    tokenizers = [transformers.AutoTokenizer.from_pretrained(out),
                  transformers.GPT2Tokenizer(str(slow_dir / "vocab.json"), str(slow_dir / "merges.txt"))]
    for text in corpus():
        expected = enc.encode(text, allowed_special="all")
        for tok in tokenizers:
            assert tok(text)["input_ids"] == expected, (type(tok).__name__, text)
        assert tokenizers[0].decode(expected) == enc.decode(expected)
    assert tokenizers[0].eos_token_id == 50256 and len(tokenizers[0]) == 50257


def test_vocab_and_merges_are_openais(tmp_path):
    """When tiktoken's cache holds OpenAI's original vocab files (it does wherever tiktoken ran once), ours equal
    them byte for byte."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    originals = {}
    for name in os.listdir(cache) if os.path.isdir(cache) else []:
        with open(os.path.join(cache, name), "rb") as f:
            head = f.read(20)
        if head.startswith(b"#version: 0.2"):
            originals["merges"] = os.path.join(cache, name)
        elif head.startswith(b'{"!": 0'):
            originals["vocab"] = os.path.join(cache, name)
    if len(originals) < 2:
        pytest.skip("OpenAI's encoder.json / vocab.bpe are not in the tiktoken cache")
    vocab, merges = hf_tokenizer.gpt2_vocab_and_merges(chat.get_encoder())
    with open(originals["vocab"], encoding="utf-8") as f:
        assert json.load(f) == vocab
    with open(originals["merges"], encoding="utf-8") as f:
        assert [m for m in f.read().split("\n")[1:] if m] == merges


def test_chat_template_renders_like_ours(exported):
    _, out = exported[True]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = chat.get_encoder()
    for messages in CONVERSATIONS:
        prompt = messages if messages[-1]["role"] == "user" else messages[:-1]
        assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
            enc.decode(chat.render_prompt(prompt))
        if messages[-1]["role"] == "assistant":
            assert tok.apply_chat_template(messages, tokenize=False) == \
                enc.decode(chat.render_conversation(messages)[0])
    # single-turn prompts (what sample.py sends) tokenise to the very ids we train and sample with
    for messages in CONVERSATIONS[:2]:
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == chat.render_prompt(messages)
