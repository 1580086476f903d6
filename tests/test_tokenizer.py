"""A trained tokenizer (chat_gpt2/tokenizer.py, prepare.py --task=tokenizer): training and its
refusals, tiktoken's ids against `tokenizers`' and transformers', the dataset and checkpoints that
carry it, the mismatch errors, bits per byte, and the export (AutoTokenizer, generate, GGUF)."""
import json
import math
import os

import numpy as np
import pytest
import tiktoken
import torch

import prepare
from chat_gpt2 import chat
from chat_gpt2 import tokenizer as tk
from chat_gpt2.dataset import load_dataset, read_meta
from chat_gpt2.errors import ConfigError, InputError
from helpers import checkpoints, load_ckpt, tiny_train_args, train_inprocess, write_records

# text that tries the split: unicode, emoji, digits, whitespace runs, contractions, special tokens
VARIED = ["héllo wörld, ça va? 日本語のテキスト 🤖🎉👍🏽 naïve café",
          "  two spaces\n\n\n\tthree newlines and a tab   \n   trailing   ",
          "digits 1234567 3.14159 2026-12-04 0x1F; I'm, you'll, they've, we'd, don't",
          "<|endoftext|>a special token in text<|im_start|> and <|im_end|>\r\n",
          "", " ", "\n", "x" * 300]
CORPUS = "".join(f"To be, or not to be, that is question {i}: café 日本 🤖 {i * 7}.\n"
                 for i in range(300))
SPECIALS = ("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 600-token tokenizer trained by prepare.py --task=tokenizer on a .txt and a chat file."""
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    chats = write_records(root / "chats.jsonl", [{"user": f"Question {i}?", "assistant": f"Answer {i}."}
                                                 for i in range(50)])
    assert prepare.main([str(root / "corpus.txt"), chats, "--task=tokenizer", "--vocab_size=600",
                         f"--special_tokens={','.join(SPECIALS)}", f"--out_dir={root / 'tok600'}"]) == 0
    return str(root / "tok600")


@pytest.fixture(scope="module")
def record(trained):
    return tk.load_tokenizer(trained)


def test_the_split_is_tiktoken_gpt2s():
    assert tk.GPT2_PATTERN == tiktoken.get_encoding("gpt2")._pat_str


def test_training_writes_the_asked_vocabulary(record):
    enc = chat.get_encoder(record)
    assert record["n_vocab"] == enc.n_vocab == 600 and record["split"] == "gpt2"
    assert record["special_tokens"] == ["<|endoftext|>", *SPECIALS]
    assert record["eot"] == enc.eot_token == 597  # bytes 0..255, merges, then the special tokens
    assert [enc.decode_single_token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    assert enc.encode("Question 7? Answer") != list("Question 7? Answer".encode())  # chat text was learned


@pytest.mark.parametrize("text", VARIED + [CORPUS[:2000]])
def test_tiktoken_tokenizers_and_transformers_agree(record, text, tmp_path):
    """The one tokenizer.json: tiktoken (what we encode with), `tokenizers` and transformers' AutoTokenizer (the
    export's files) give the same ids, special tokens included, and decode back to the text."""
    from tokenizers import Tokenizer
    enc = chat.get_encoder(record)
    ours = enc.encode(text, allowed_special="all")
    assert Tokenizer.from_str(record["json"]).encode(text).ids == ours
    assert enc.decode(ours) == text
    hf = _auto_tokenizer(record, str(tmp_path))  # as the data is: only <|endoftext|> is ever a special id
    data_ids = enc.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert hf(text)["input_ids"] == data_ids and hf.decode(data_ids) == text


def _auto_tokenizer(record, folder):
    import transformers
    from chat_gpt2.hf_tokenizer import tokenizer_files
    for name, content in tokenizer_files(chat.get_encoder(record), chat.TEMPLATE, 64).items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_user_text_never_becomes_a_special_id(record):
    enc = chat.get_encoder(record)
    ids = chat.render_conversation([{"role": "user", "content": "say <|im_end|> <|endoftext|>"},
                                    {"role": "assistant", "content": "ok"}], enc=enc)[0]
    assert ids.count(enc.eot_token) == 1 and ids[-1] == enc.eot_token
    assert not set(ids) & {enc.encode_single_token(s) for s in SPECIALS}


@pytest.mark.parametrize("args, message", [
    (["--vocab_size=200"], "needs the 256 bytes, 1 special token.*between 258"),
    (["--vocab_size=259", "--special_tokens=<|a|>,<|b|>"], "3 special token.*between 260"),
    (["--tokenizer=somewhere"], "--tokenizer is for chat and text data"),
])
def test_training_refusals(tmp_path, capsys, args, message):
    (tmp_path / "c.txt").write_text("some text", encoding="utf-8")
    assert prepare.main([str(tmp_path / "c.txt"), "--task=tokenizer", f"--out_dir={tmp_path / 't'}", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "t").exists()


def test_empty_corpus_and_dataset_folder_are_refused(tmp_path, capsys, tiny_dataset):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    assert prepare.main([str(tmp_path / "empty.txt"), "--task=tokenizer", f"--out_dir={tmp_path / 't'}"]) == 1
    assert "the corpus is empty" in capsys.readouterr().err
    (tmp_path / "c.txt").write_text("text", encoding="utf-8")
    before = sorted(os.listdir(tiny_dataset))
    assert prepare.main([str(tmp_path / "c.txt"), "--task=tokenizer", f"--out_dir={tiny_dataset}"]) == 1
    assert "holds a prepared dataset" in capsys.readouterr().err and sorted(os.listdir(tiny_dataset)) == before


# --------------------------------------------------------------------------------------------------------------
# The dataset and the checkpoints carry it


@pytest.fixture(scope="module")
def custom_data(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("custom")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    assert prepare.main([str(root / "corpus.txt"), f"--tokenizer={trained}", f"--out_dir={root / 'data'}"]) == 0
    return str(root / "data")


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory, custom_data):
    out = str(tmp_path_factory.mktemp("run") / "out")
    log = train_inprocess(tiny_train_args(custom_data, out, sample_max_tokens=4))
    return out, log


def test_the_dataset_holds_the_tokenizer(custom_data, record):
    meta = read_meta(custom_data)
    assert meta["tokenizer"]["sha256"] == record["sha256"] and meta["vocab_size"] == 600
    assert meta["tokenizer"]["json"] == record["json"]  # read back from the folder's tokenizer.json
    with open(os.path.join(custom_data, "meta.json")) as f:
        assert "json" not in json.load(f)["tokenizer"]  # meta.json names it, the file holds it
    data, _ = load_dataset(custom_data)
    ids = np.concatenate([data["train"].ids, data["val"].ids]).tolist()
    assert chat.get_encoder(record).decode(ids) == CORPUS + "<|endoftext|>" and max(ids) < 600


def test_a_tampered_tokenizer_file_is_refused(tmp_path, custom_data):
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(custom_data, copy, symlinks=False)
    os.remove(os.path.join(copy, "tokenizer.json"))
    with open(os.path.join(copy, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tk.load_tokenizer(custom_data)["json"].replace('"Question"', '"Qnestion"'))
    with pytest.raises(InputError, match="not the tokenizer the dataset was prepared with"):
        read_meta(copy)


def test_training_sizes_the_model_and_checkpoints_carry_it(custom_run, record):
    out, log = custom_run
    assert " bits/byte" in log and "sample: " in log
    for name in checkpoints(out):
        ckpt = load_ckpt(os.path.join(out, name))  # weights_only=True
        assert ckpt["tokenizer"]["json"] == record["json"] and ckpt["tokenizer"]["sha256"] == record["sha256"]
        assert ckpt["model_args"]["vocab_size"] == tk.padded_vocab(600) == 640
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["event"] == "eval"]
    assert all(r["val_bpb"] > 0 and r["train_bpb"] > 0 for r in evals)


def test_sample_needs_no_flag(custom_run, capsys):
    import sample
    out, _ = custom_run
    sample.main([f"--out_dir={out}", "--prompt=To be", "--raw=True", "--max_new_tokens=5", "--device=cpu",
                 "--dtype=float32"])
    assert capsys.readouterr().out.strip()


def test_mismatches_are_one_line_errors(tmp_path, custom_data, custom_run, tiny_dataset):
    out, _ = custom_run
    best = os.path.join(out, [n for n in checkpoints(out) if not n.endswith("_last.pt")][0])
    # fine-tuning the trained-tokenizer model on GPT-2-tokenized data, and GPT-2 weights on trained-tokenizer data
    with pytest.raises(ConfigError, match=r"tokenized with gpt2, but --init_from=.* was trained with tok600 \(600"):
        train_inprocess([a for a in tiny_train_args(tiny_dataset, str(tmp_path / "a"), init_from=best)
                         if not a.startswith(("--n_layer", "--n_head", "--n_embd"))])
    from helpers import tiny_model
    from chat_gpt2.checkpoint import save_checkpoint
    gpt2_ckpt = str(tmp_path / "gpt2.pt")
    save_checkpoint(gpt2_ckpt, {"model": tiny_model().state_dict(), "model_args": {
        **tiny_model().config.__dict__}, "tokenizer": "gpt2", "template": chat.TEMPLATE})
    with pytest.raises(ConfigError, match=r"tokenized with tok600 .* but --init_from=.* was trained with gpt2"):
        train_inprocess([a for a in tiny_train_args(custom_data, str(tmp_path / "b"), init_from=gpt2_ckpt)
                         if not a.startswith(("--n_layer", "--n_head", "--n_embd"))])
    # resuming a run whose dataset was prepared again with another tokenizer
    import shutil
    run = str(tmp_path / "resume")
    shutil.copytree(out, run)
    last = load_ckpt(os.path.join(run, [n for n in checkpoints(run) if n.endswith("_last.pt")][0]))
    with pytest.raises(ConfigError, match="tokenized with gpt2, but the run being resumed was trained with tok600"):
        train_inprocess(["--init_from=resume", f"--out_dir={run}", f"--dataset={tiny_dataset}"])
    assert last["iter_num"] == 6
    # eval.py --dataset with another tokenizer's data
    import eval as eval_script
    with pytest.raises(ConfigError, match="is tokenized with gpt2, but the model was trained with tok600"):
        eval_script.main([f"--out_dir={out}", f"--dataset={tiny_dataset}"])


def test_gpt2_datasets_and_checkpoints_keep_their_name(tiny_dataset, tiny_ckpt):
    assert read_meta(tiny_dataset)["tokenizer"] == "gpt2" and load_ckpt(tiny_ckpt)["tokenizer"] == "gpt2"
    assert tk.padded_vocab(chat.VOCAB_SIZE) == 50304


# --------------------------------------------------------------------------------------------------------------
# Bits per byte


def test_bits_per_byte_by_hand(tmp_path, custom_run, trained, record):
    """eval.py's bpb on a val text shorter than one window, against a hand computation: the summed loss of every
    target in nats / ln 2 over the UTF-8 bytes of the targets' text (the closing <|endoftext|> is scored but is no
    text: 0 bytes)."""
    import torch.nn.functional as F
    from chat_gpt2.checkpoint import model_from_checkpoint
    from chat_gpt2.evaluation import val_scores
    (tmp_path / "train.txt").write_text(CORPUS, encoding="utf-8")
    (tmp_path / "val.txt").write_text("To be, or not: café 🤖 42.\n", encoding="utf-8")
    data = str(tmp_path / "data")
    assert prepare.main([str(tmp_path / "train.txt"), f"--val_file={tmp_path / 'val.txt'}", f"--tokenizer={trained}",
                         f"--out_dir={data}"]) == 0
    out, _ = custom_run
    ckpt = load_ckpt(os.path.join(out, [n for n in checkpoints(out) if not n.endswith("_last.pt")][0]))
    model = model_from_checkpoint(ckpt).eval()
    scores = val_scores(model, data, 4, "cpu", "float32", ckpt["tokenizer"])
    val = torch.as_tensor(load_dataset(data)[0]["val"].ids.astype(np.int64))
    assert len(val) <= model.config.block_size + 1  # one window: the whole text in context
    with torch.no_grad():
        logits = model(val[None, :-1], all_logits=True)[0][0]
    nats = F.cross_entropy(logits.float(), val[1:], reduction="sum").item()
    first = chat.get_encoder(record).decode(val[:1].tolist())  # the first token is no target
    assert first == "To" and val[-1] == record["eot"]
    n_bytes = len(" be, or not: café 🤖 42.\n".encode("utf-8"))
    assert scores["tokens"] == len(val) - 1 and scores["bytes"] == n_bytes
    assert scores["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Out into the world: the export, and generation that stops on the tokenizer's own <|endoftext|>


def eot_model(record):
    """A tiny GPT (bias) for the trained tokenizer whose every next token is its <|endoftext|>: ln_f outputs a
    constant vector, which the tied head scores highest on the <|endoftext|> row."""
    from helpers import tiny_model
    model = tiny_model(vocab_size=tk.padded_vocab(record["n_vocab"]), bias=True)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[record["eot"]] = 10.0
        model.transformer.wte.weight[record["n_vocab"]:] = 100.0  # padding rows: never a token
    return model


def test_engine_and_sample_stop_on_the_trained_eot(tmp_path, record, capsys):
    from chat_gpt2.checkpoint import save_checkpoint
    from chat_gpt2.engine import Engine, Request
    from chat_gpt2.sampling import SamplingParams
    model, enc = eot_model(record), chat.get_encoder(record)
    request = Request(enc.encode("To be"), SamplingParams(temperature=0.0, max_new_tokens=8))
    Engine(model, enc).complete([request])
    assert request.replies[0].finish_reason == "stop" and request.replies[0].tokens == []
    path = str(tmp_path / "eot.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model.config.__dict__, "tokenizer": record,
                           "template": chat.TEMPLATE, "default_stop": None, "multiline_replies": False})
    import sample
    sample.main([f"--ckpt={path}", "--prompt=To be", "--raw=True", "--max_new_tokens=8", "--device=cpu",
                 "--dtype=float32"])
    assert capsys.readouterr().out.strip() == ""


def test_export_tokenizer_and_generate(tmp_path, record):
    """export.py's directory: AutoTokenizer encodes and decodes as we do (special tokens whole), config and
    generation_config name the trained <|endoftext|>, transformers' generate stops on it, and the logits match."""
    import export
    import transformers
    model, enc = eot_model(record).eval(), chat.get_encoder(record)
    out = str(tmp_path / "hf")
    export.export(model, out, chat.CHATML, record)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in VARIED:
        ids = enc.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
        assert tok(text)["input_ids"] == ids and tok.decode(ids) == text
    assert tok.eos_token_id == record["eot"]
    # ChatML's markers are text here (the template does not declare them special): the very ids we train on
    messages = [{"role": "user", "content": "hi <|im_end|>"}, {"role": "assistant", "content": "To be"},
                {"role": "user", "content": "café 🤖"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == chat.render_text(messages, chat.CHATML, True)
    assert tok(rendered)["input_ids"] == chat.render_prompt(messages, chat.CHATML, enc)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == 600 and hf.generation_config.eos_token_id == record["eot"]
    prompt = torch.tensor([enc.encode("To be")])
    generated = hf.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.size(1):].tolist()
    assert generated == [record["eot"]]  # it stopped on the first <|endoftext|>
    assert export.check_export(model, out, tokenizer=record)["transformers"] < 1e-4


def test_gguf_export_with_the_trained_tokenizer(tmp_path, record):
    """llama.cpp's `gpt-2` pre-tokenizer and the trained vocabulary and merges: llama.cpp tokenizes as we do."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from chat_gpt2.gguf_export import export_gguf
    path = export_gguf(eot_model(record).eval(), str(tmp_path / "gg"), chat.TEMPLATE, record, ("\n",))
    llm = llama_cpp.Llama(path, verbose=False, n_ctx=64)
    enc = chat.get_encoder(record)
    for text in VARIED[:3]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == enc.encode_ordinary(text)
    assert llm.token_eos() == record["eot"]
    # with special tokens parsed (as llama.cpp's chat endpoint does), ChatML's markers stay text: our training ids
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == enc.encode_ordinary(text)


def test_a_vocabulary_above_65536_makes_a_uint32_dataset(tmp_path):
    """70,000 tokens (made of 40,000 distinct random words): the dataset stores uint32 ids (format 2) and reads back
    the text exactly, ids above 65,535 included."""
    import random
    import string
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(7)) for _ in range(40000)]
    (tmp_path / "words.txt").write_text(" ".join(words * 2), encoding="utf-8")
    assert prepare.main([str(tmp_path / "words.txt"), "--task=tokenizer", "--vocab_size=70000",
                         f"--out_dir={tmp_path / 'big'}"]) == 0
    assert prepare.main([str(tmp_path / "words.txt"), f"--tokenizer={tmp_path / 'big'}",
                         f"--out_dir={tmp_path / 'data'}"]) == 0
    data, meta = load_dataset(str(tmp_path / "data"))
    assert meta["token_dtype"] == "uint32" and meta["vocab_size"] == 70000 and data["train"].ids.dtype == np.uint32
    ids = np.concatenate([data["train"].ids, data["val"].ids])
    assert ids.max() >= 1 << 16
    assert chat.get_encoder(meta["tokenizer"]).decode(ids.tolist()) == " ".join(words * 2) + "<|endoftext|>"


def test_chat_data_with_the_trained_tokenizer(tmp_path, trained, record):
    """Chat records prepared with --tokenizer: the fast path (render_batch) gives each conversation exactly the ids,
    mask and turn starts of the definition (render_conversation) with the trained encoding."""
    from helpers import chat_records
    records = chat_records(40)
    src = write_records(tmp_path / "chats.jsonl", records)
    assert prepare.main([src, f"--tokenizer={trained}", f"--out_dir={tmp_path / 'data'}", "--val_fraction=0.25"]) == 0
    enc = chat.get_encoder(record)
    conversations = [[{"role": "user", "content": r["user"]}, {"role": "assistant", "content": r["assistant"]}]
                     if "user" in r else r["messages"] for r in records]
    rendered = chat.render_batch(conversations, chat.TEMPLATE, enc)
    for i, messages in enumerate(conversations):
        assert rendered.conversation(i) == chat.render_conversation(messages, chat.TEMPLATE, enc)
    data, meta = load_dataset(str(tmp_path / "data"))
    assert meta["kind"] == "chat" and meta["tokenizer"]["sha256"] == record["sha256"]
    ids = np.concatenate([data[s].ids for s in ("train", "val")])
    assert (ids == enc.eot_token).sum() == len(records) and ids.max() < record["n_vocab"]
    texts = {chat.render_text(messages) for messages in conversations}
    val = enc.decode(data["val"].ids.tolist()).split("<|endoftext|>")  # whole conversations, each closed
    assert val[-1] == "" and len(val) - 1 == meta["conversations"]["val"] == 10 and set(val[:-1]) <= texts


def test_resume_and_finetune_with_the_same_tokenizer(tmp_path, custom_run, custom_data, record):
    """The same tokenizer (its sha256) on both sides: a run resumes, and a new run starts from its checkpoint."""
    import shutil
    out, _ = custom_run
    run = str(tmp_path / "resume")
    shutil.copytree(out, run)
    assert "resuming" in train_inprocess(["--init_from=resume", f"--out_dir={run}", "--max_iters=7"])
    best = os.path.join(out, [n for n in checkpoints(out) if not n.endswith("_last.pt")][0])
    args = [a for a in tiny_train_args(custom_data, str(tmp_path / "ft"), init_from=best, max_iters=2)
            if not a.startswith(("--n_layer", "--n_head", "--n_embd"))]
    assert "starting a new run" in train_inprocess(args)
    ckpt = load_ckpt(os.path.join(str(tmp_path / "ft"), checkpoints(str(tmp_path / "ft"))[0]))
    assert ckpt["tokenizer"]["sha256"] == record["sha256"] and ckpt["model_args"]["vocab_size"] == 640


def test_bench_prepare_with_the_trained_tokenizer(tmp_path, trained, capsys):
    """bench.py --mode=prepare --prepare_tokenizer: prepare.py and the bare loop both encode with it (the same chat
    tokens; the bare text loop has no closing <|endoftext|>), fewer tokens than GPT-2's on this text."""
    import bench
    chat_src = write_records(tmp_path / "pc.jsonl", [{"prompt": f"Question {i}?", "completion": f"Answer {i}."}
                                                     for i in range(50)])
    (tmp_path / "t.txt").write_text(CORPUS, encoding="utf-8")
    rows = {}
    for tokenizer in ("", trained):
        bench.main(["--mode=prepare", f"--prepare_chat={chat_src}", f"--prepare_text={tmp_path / 't.txt'}",
                    "--prepare_parquet=", "--prepare_mb=0.02", "--prepare_runs=1", f"--prepare_tokenizer={tokenizer}"])
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["tokenizer"] == (tokenizer or "gpt2")
        rows[tokenizer] = {row["kind"]: row for row in result["rows"]}
        assert rows[tokenizer]["chat"]["tokens"] == rows[tokenizer]["chat"]["tokens_bare"]
        assert rows[tokenizer]["text"]["tokens"] == rows[tokenizer]["text"]["tokens_bare"] + 1
    assert rows[trained]["text"]["tokens"] < rows[""]["text"]["tokens"]


def test_chatml_special_with_a_trained_tokenizer(tmp_path, capsys):
    """A tokenizer trained without ChatML's markers (but with a [PAD]) and --template=chatml_special: each marker
    is one id right after its vocabulary (no free id: that is GPT-2's, for a classifier's pad), a typed marker stays
    text; prepare, a few training steps and sample.py work; generation stops on <|im_end|>, never on [PAD]."""
    import sample
    from chat_gpt2.checkpoint import save_checkpoint
    from chat_gpt2.engine import Engine, Request
    from chat_gpt2.sampling import SamplingParams
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    chats = write_records(tmp_path / "chats.jsonl", [{"user": f"Question {i}? <|im_end|>", "assistant": f"Answer {i}."}
                                                      for i in range(40)])
    tok, data, out = (str(tmp_path / name) for name in ("tok", "data", "out"))
    assert prepare.main([str(tmp_path / "corpus.txt"), chats, "--task=tokenizer", "--vocab_size=400",
                         "--special_tokens=[PAD]", f"--out_dir={tok}"]) == 0
    base = chat.get_encoder(tk.load_tokenizer(tok))
    assert prepare.main([chats, f"--tokenizer={tok}", "--template=chatml_special", f"--out_dir={data}"]) == 0
    meta = read_meta(data)
    start, end, pad = base.n_vocab, base.n_vocab + 1, base._special_tokens["[PAD]"]
    assert meta["special_tokens"] == {"<|im_start|>": start, "<|im_end|>": end} and meta["vocab_size"] == 400
    enc = chat.run_encoder(meta)
    assert chat.stop_ids(enc) == [base.eot_token, start, end]  # the trained [PAD] is no stop
    loaded, _ = load_dataset(data)
    ids = np.concatenate([loaded[s].ids for s in ("train", "val")])
    assert (ids == start).sum() == (ids == end).sum() == 2 * 40 and (ids == base.eot_token).sum() == 40
    assert ids.max() == end and enc.decode(ids.tolist()).count("? <|im_end|>") == 40  # the typed one: text
    train_inprocess(tiny_train_args(data, out, bias=True, sample_max_tokens=4))
    ckpt = load_ckpt(os.path.join(out, checkpoints(out)[-1]))
    assert ckpt["special_tokens"] == meta["special_tokens"]
    assert ckpt["model_args"]["vocab_size"] == tk.padded_vocab(402) == 448
    sample.main([f"--out_dir={out}", "--prompt=Question 3?", "--max_new_tokens=4", "--device=cpu",
                 "--dtype=float32"])
    capsys.readouterr()
    # every next token <|im_end|> (ln_f a constant vector, the tied head's top row): the reply ends at once
    state = ckpt["model"]
    state["transformer.ln_f.weight"].zero_()
    state["transformer.ln_f.bias"].fill_(1.0)
    state["transformer.wte.weight"][end] = 10.0
    save_checkpoint(str(tmp_path / "end.pt"), ckpt)
    sample.main([f"--ckpt={tmp_path / 'end.pt'}", "--prompt=Question 3?", "--max_new_tokens=8", "--device=cpu",
                 "--dtype=float32"])
    assert capsys.readouterr().out.strip() == ""
    from chat_gpt2.checkpoint import model_from_checkpoint
    state["transformer.wte.weight"][end] = 0.0
    state["transformer.wte.weight"][pad] = 10.0  # now [PAD] is every next token: it does not stop
    request = Request(chat.render_prompt([{"role": "user", "content": "Question 3?"}], chat.CHATML_SPECIAL, enc),
                      SamplingParams(temperature=0.0, max_new_tokens=3))
    Engine(model_from_checkpoint(ckpt).eval(), enc).complete([request])
    reply = request.replies[0]
    assert reply.finish_reason == "length" and reply.tokens == [pad] * 3 and reply.stop_token is None


def test_a_trained_tokenizers_own_markers_keep_their_ids(record):
    """A tokenizer trained with ChatML's markers: chatml_special declares its own ids (no row added), generation
    stops on them only once the template declares them, and the HF export adds them as tokens (others: not)."""
    from chat_gpt2.hf_tokenizer import tokenizer_files
    base = chat.get_encoder(record)
    ids = chat.special_token_ids(chat.CHATML_SPECIAL, base)
    assert ids == {m: base._special_tokens[m] for m in SPECIALS} == {"<|im_start|>": 598, "<|im_end|>": 599}
    enc = chat.template_encoder(chat.CHATML_SPECIAL, base)
    assert enc.n_vocab == 600 and chat.declared_tokens(enc) == ids and chat.declared_tokens(base) == {}
    assert chat.stop_ids(base) == [597] and chat.stop_ids(enc) == [597, 598, 599]
    assert chat.run_encoder({"tokenizer": record, "special_tokens": ids}) is enc
    assert chat.template_encoder(chat.CHATML_SPECIAL, enc) is enc  # idempotent on a run's encoder
    added = {name: [t["content"] for t in tokenizer_files(e, chat.CHATML_SPECIAL, 64)["tokenizer.json"]["added_tokens"]]
             for name, e in (("base", base), ("declared", enc))}
    assert added == {"base": ["<|endoftext|>"], "declared": ["<|endoftext|>", *SPECIALS]}


@pytest.mark.parametrize("template", [chat.CHATML, chat.CHATML_SPECIAL])
def test_gguf_markers_are_control_tokens_only_when_declared(tmp_path, record, template):
    """GGUF of the trained tokenizer (with ChatML's markers): declared by the template, they are control tokens and
    <|im_end|> the end of turn; not declared, they are unused placeholders (never read from a prompt's text)."""
    import gguf
    from chat_gpt2.gguf_export import write_gguf
    path = str(tmp_path / "m.gguf")
    write_gguf(eot_model(record).eval(), path, template, record, gguf_type="f32")
    reader = gguf.GGUFReader(path)

    def field(key):
        return reader.get_field(key).contents()

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    declared = bool(template.get("special_tokens"))
    assert len(tokens) == 600 and tokens[597] == "<|endoftext|>" and types[597] == gguf.TokenType.CONTROL
    want = gguf.TokenType.CONTROL if declared else gguf.TokenType.UNUSED
    assert [types[598], types[599]] == [want, want]
    assert tokens[598:] == (list(SPECIALS) if declared else ["<|unused_598|>", "<|unused_599|>"])
    assert field("tokenizer.ggml.eot_token_id") == (599 if declared else 597)
    assert field("tokenizer.ggml.eos_token_id") == 597
