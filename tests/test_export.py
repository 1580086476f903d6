"""export.py: our checkpoint -> a Hugging Face GPT-2 directory that transformers loads as it is (issue 3).

Run with -s to see the round-trip parity figures (max abs logit difference)."""
import json
import os
import random
import shutil

import pytest
import torch

from chat_gpt2 import chat
import export
import helpers
from gen_helpers import tiny_model
from hf_helpers import max_logit_diff, offline, random_tokens, save_hf, tiny_hf_model
from chat_gpt2 import hf_tokenizer
from chat_gpt2.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from chat_gpt2.hf_gpt2 import from_pretrained

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    offline(monkeypatch)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{bias: (our model, export directory)} for a tiny padded-vocabulary scratch model with and without biases."""
    root = tmp_path_factory.mktemp("export")
    result = {}
    for bias in (True, False):
        model = tiny_model(seed=3, bias=bias)
        out = str(root / f"bias-{bias}")
        export.export(model, out)
        result[bias] = model, out
    return result


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


# ---------------------------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("bias", [True, False])
def test_transformers_and_init_from_match_our_checkpoint(exported, bias):
    model, out = exported[bias]
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == 50257 and hf.config.n_positions == 64
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as in GPT-2
    hf_diff = max_logit_diff(model, hf, 64)
    back = from_pretrained(out).eval()
    with torch.no_grad():
        idx = random_tokens(64)
        back_diff = (back(idx, all_logits=True)[0] - model(idx, all_logits=True)[0][..., :50257]).abs().max().item()
    print(f"\nparity export (bias={bias}): transformers vs ours {hf_diff:.3g}; init_from=DIR vs ours {back_diff:.3g}")
    assert hf_diff < 1e-5 and back_diff < 1e-5
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 50256
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == 50256


def test_pretrained_to_checkpoint_to_export_is_lossless(tmp_path):
    """A Hugging Face model loaded by init_from and exported again gives back the same logits in transformers."""
    hf = tiny_hf_model(seed=5)
    model = from_pretrained(save_hf(hf, tmp_path / "src")).eval()
    export.export(model, str(tmp_path / "again"))
    again = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "again")).eval()
    diff = max(max_logit_diff(model, again, 64), max_logit_diff(model, hf, 64))
    print(f"\nparity transformers -> init_from -> export -> transformers: {diff:.3g}")
    assert diff < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template


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


def test_chat_template_follows_a_custom_template():
    template = {**chat.TEMPLATE, "user": "<user>{content}</user>\n", "assistant_label": "<bot>"}
    import jinja2
    rendered = jinja2.Environment().from_string(chat.chat_template(template)).render(
        messages=CONVERSATIONS[2], add_generation_prompt=False)
    enc = chat.get_encoder()
    assert rendered == enc.decode(chat.render_conversation(CONVERSATIONS[2], template)[0])


# ---------------------------------------------------------------------------------------------------------------
# Writing the directory


def test_out_directory_rules(tmp_path):
    model = tiny_model(n_layer=1)
    out = tmp_path / "hf"
    export.export(model, str(out))
    export.export(model, str(out))  # a previous export is replaced
    assert sorted(os.listdir(out)) == sorted(export.EXPORT_FILES)
    assert not [n for n in os.listdir(tmp_path) if n != "hf"]  # no temporary directory left behind
    (out / "README.md").write_text("my model card")
    with pytest.raises(FileExistsError, match="does not look like a previous export"):
        export.export(model, str(out))
    export.export(model, str(out), force=True)  # writes the export files, keeps the others
    assert (out / "README.md").read_text() == "my model card" and (out / "model.safetensors").exists()
    with pytest.raises(FileExistsError, match="is a file"):
        export.export(model, str(out / "README.md"))
    (tmp_path / "empty").mkdir()
    export.export(model, str(tmp_path / "empty"))  # an empty directory is fine
    assert (tmp_path / "empty" / "config.json").exists()


def test_cli_errors(tmp_path):
    p = helpers.run([helpers.script("export.py"), f"--out_dir={tmp_path}", f"--out={tmp_path / 'hf'}"],
                    cwd=helpers.REPO, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: no checkpoint") and "Traceback" not in p.stderr
    with pytest.raises(ValueError, match="pass --out=DIR"):
        export.main([f"--ckpt={tmp_path / 'missing.pt'}"])


# ---------------------------------------------------------------------------------------------------------------
# End to end: a local Hugging Face checkpoint -> train.py -> sample.py -> export.py -> transformers


def test_finetune_sample_export_end_to_end(tiny_dataset, tmp_path, capsys):
    """train.py and sample.py run in this process (their main()), export.py as a command."""
    import sample
    src = save_hf(tiny_hf_model(seed=7), tmp_path / "gpt2-local")
    out_dir, hf_out = str(tmp_path / "out"), str(tmp_path / "hf-export")
    args = [a for a in helpers.tiny_train_args(tiny_dataset, out_dir, init_from=src, max_iters=3, eval_interval=3,
                                               eval_iters=1, sample_max_tokens=4)
            if not a.startswith(("--n_layer", "--n_head", "--n_embd"))]
    printed = helpers.train_inprocess(args)
    assert "memory estimate:" in printed and f"loading directory {src!r}" in printed
    best = find_checkpoint(out_dir)
    capsys.readouterr()
    sample.main([f"--ckpt={best}", "--prompt=What is 2 plus 3?", "--max_new_tokens=5", "--device=cpu"])
    sample.main([f"--init_from={src}", "--raw", "--prompt=Once upon", "--max_new_tokens=5", "--device=cpu"])
    assert capsys.readouterr().out.count("\n") >= 2
    p = helpers.run([helpers.script("export.py"), f"--out_dir={out_dir}", f"--out={hf_out}"], cwd=tmp_path)
    assert p.stdout.startswith(f"exported {best} -> {hf_out}")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_out).eval()
    assert hf.config.n_positions == 32  # the fine-tuned block_size
    figures = export.check_export(model_from_checkpoint(load_checkpoint(best)).eval(), hf_out)
    print(f"\nparity fine-tuned checkpoint vs its export: {figures}")
    assert set(figures) == {"init_from=DIR", "transformers"} and max(figures.values()) < 1e-5
