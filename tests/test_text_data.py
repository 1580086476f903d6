"""Plain-text data: .txt documents and {"text"} records, chunked reading, the split, random windows, sampling."""
import hashlib
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import prepare
from chat_gpt2 import chat, records
from chat_gpt2.build import build_dataset
from chat_gpt2.dataset import load_dataset
from chat_gpt2.errors import InputError
from helpers import EOT, SHARED_DATA, conversations, read_meta, read_split, snapshot, write_records

SHAKESPEARE = os.path.join(SHARED_DATA, "tinyshakespeare-text", "input.txt")


def enc():
    return chat.get_encoder()


def write_text(path, text):
    path.write_bytes(text.encode("utf-8"))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Reading a .txt in pieces: never a split character, never a token merged or split across a cut

ALPHABET = st.sampled_from(list("ab Z9'.,:!") + ["\n", "\r", "\t", "\u00e9", "\u4e2d", "\U0001F600", "\xa0",
                                                    "  ", "\n\n", "\r\n", "'s", " the"])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(ALPHABET, max_size=40).map("".join))
def test_a_safe_cut_tokenises_like_the_whole(text):
    whole = enc().encode_ordinary(text)
    for i in range(len(text) + 1):
        if records.safe_cut(text, i):
            assert enc().encode_ordinary(text[:i]) + enc().encode_ordinary(text[i:]) == whole, (text, i)


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 64])
def test_iter_text_pieces_tokenise_like_the_whole_file(tmp_path, chunk_bytes):
    text = ("First line, caf\u00e9 \u4e2d\u6587 \U0001F600.\nSecond  line\n\n  indented\r\nCRLF line\n"
            "\tTabbed: 'quoted' words\n" * 5)
    path = write_text(tmp_path / "t.txt", text)
    hasher = hashlib.sha256()
    pieces = list(records.iter_text(path, hasher, chunk_bytes=chunk_bytes))
    assert "".join(pieces) == text and len(pieces) > 1
    assert [t for p in pieces for t in enc().encode_ordinary(p)] == enc().encode_ordinary(text)
    assert hasher.hexdigest() == hashlib.sha256(text.encode()).hexdigest()


def test_iter_text_without_newlines_is_bounded(tmp_path):
    text = "word " * 2000
    path = write_text(tmp_path / "t.txt", text)
    pieces = list(records.iter_text(path, hashlib.sha256(), chunk_bytes=100, max_carry=500))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 600


def test_iter_text_bom_and_invalid_utf8(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\n")
    assert "".join(records.iter_text(str(path), hashlib.sha256())) == "hello\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two\nbro\xffken\n")
    with pytest.raises(InputError, match=r"bad\.txt:3: invalid UTF-8"):
        list(records.iter_text(str(bad), hashlib.sha256()))


# ---------------------------------------------------------------------------------------------------------------
# Building a text dataset


def test_one_txt_is_split_by_position(tmp_path):
    text = "".join(f"Line {i} of the corpus, with some words.\n" for i in range(200))
    out = str(tmp_path / "out")
    meta = build_dataset([write_text(tmp_path / "corpus.txt", text)], out_dir=out, val_fraction=0.1)
    want = enc().encode_ordinary(text) + [EOT]
    train, val = read_split(out, "train"), read_split(out, "val")
    assert train["ids"].tolist() + val["ids"].tolist() == want
    assert len(val["ids"]) == round(len(want) * 0.1)
    assert train["mask"].all() and val["mask"].all()  # every token learned
    assert train["convs"].tolist() == [0] and val["convs"].tolist() == [0]
    assert meta["kind"] == "text" and meta["default_stop"] is None and meta["documents"] == 1
    assert meta["learned_token_share"] == 1.0


def test_val_fraction_moves_the_cut(tmp_path):
    text = "".join(f"Sentence number {i}.\n" for i in range(100))
    out = str(tmp_path / "out")
    build_dataset([write_text(tmp_path / "c.txt", text)], out_dir=out, val_fraction=0.25)
    n = len(enc().encode_ordinary(text)) + 1
    assert len(read_split(out, "val")["ids"]) == round(n * 0.25)


def test_several_txt_files_split_by_document(tmp_path):
    docs = [f"Document {i}: " + "some text here. " * (i + 1) for i in range(10)]
    paths = [write_text(tmp_path / f"d{i}.txt", d) for i, d in enumerate(docs)]
    out = str(tmp_path / "out")
    meta = build_dataset(paths, out_dir=out, val_fraction=0.2)
    got = sorted(ids for split in ("train", "val") for ids, _ in conversations(out, split))
    assert got == sorted(enc().encode_ordinary(d) + [EOT] for d in docs)
    assert meta["conversations"] == {"train": 8, "val": 2} and meta["documents"] == 10
    for split in ("train", "val"):
        assert all(all(mask) for _, mask in conversations(out, split))


@pytest.mark.parametrize("ext", ["jsonl", "json"])
def test_text_records_are_documents(tmp_path, ext):
    docs = [f"Record {i} says <|endoftext|> literally." for i in range(6)]
    out = str(tmp_path / "out")
    meta = build_dataset([write_records(tmp_path / f"d.{ext}", [{"text": d, "id": i} for i, d in enumerate(docs)])],
                         out_dir=out, val_fraction=0.3)
    got = sorted(ids for split in ("train", "val") for ids, _ in conversations(out, split))
    assert got == sorted(enc().encode_ordinary(d) + [EOT] for d in docs)  # a literal <|endoftext|> stays text
    assert meta["kind"] == "text" and meta["conversations"]["val"] == 2


def test_text_records_and_txt_files_in_input_order(tmp_path):
    """{"text"} records, then a .txt file, then records again: every document in input order (a batch of records
    still being tokenised is written before the .txt file); a val copy of the .txt counts as a copy of train."""
    whole = "A whole file.\nOf text.\n"
    txt = write_text(tmp_path / "t.txt", whole)
    inputs = [write_records(tmp_path / "a.jsonl", [{"text": f"Record {i}."} for i in range(3)]), txt,
              write_records(tmp_path / "b.jsonl", [{"text": f"Record {i}."} for i in range(3, 5)])]
    out = str(tmp_path / "out")
    meta = build_dataset(inputs, out_dir=out, val_file=write_records(tmp_path / "v.jsonl", [{"text": whole}]))
    texts = [f"Record {i}." for i in range(3)] + [whole] + [f"Record {i}." for i in range(3, 5)]
    assert [ids for ids, _ in conversations(out, "train")] == [enc().encode_ordinary(t) + [EOT] for t in texts]
    assert meta["documents"] == 7 and meta["duplicates"]["val_in_train"] == 1


def test_text_val_file(tmp_path):
    out = str(tmp_path / "out")
    build_dataset([write_text(tmp_path / "a.txt", "Train text.\n")], out_dir=out,
                  val_file=write_records(tmp_path / "v.jsonl", [{"text": "Val text."}]))
    assert read_split(out, "val")["ids"].tolist() == enc().encode_ordinary("Val text.") + [EOT]


@pytest.mark.parametrize("inputs, where", [
    ((("a.txt", "Some text.\n"), ("b.jsonl", [{"user": "hi", "assistant": "ho"}])), "b.jsonl:1"),
    ((("b.jsonl", [{"user": "hi", "assistant": "ho"}]), ("a.txt", "Some text.\n")), "a.txt"),
    ((("c.jsonl", [{"text": "doc"}, {"prompt": "p", "completion": "c"}]),), "c.jsonl:2"),
])
def test_mixing_text_and_chat_is_refused(tmp_path, inputs, where):
    out = tmp_path / "out"
    build_dataset([write_text(tmp_path / "keep.txt", "An existing dataset.\n" * 20)], out_dir=str(out))
    before = snapshot(out)
    paths = [write_text(tmp_path / name, content) if name.endswith(".txt") else
             write_records(tmp_path / name, content) for name, content in inputs]
    with pytest.raises(InputError, match="cannot be mixed") as e:
        build_dataset(paths, out_dir=str(out))
    assert where in str(e.value) and "\n" not in str(e.value)
    assert snapshot(out) == before


@pytest.mark.parametrize("content, message", [("", "empty file"), ("x", "too short to split")])
def test_unusable_text_is_a_clear_error(tmp_path, content, message):
    with pytest.raises(InputError, match=message):
        build_dataset([write_text(tmp_path / "e.txt", content)], out_dir=str(tmp_path / "out"))


def test_bad_text_record_names_file_line_and_field(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": 3}])
    with pytest.raises(InputError, match=r"d\.jsonl:2: field 'text' must be a string"):
        build_dataset([path], out_dir=str(tmp_path / "out"))


def test_prepare_cli_summary(tmp_path, capsys):
    src = write_text(tmp_path / "c.txt", "Hello there.\n" * 50)
    assert prepare.main([src, f"--out_dir={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    assert "plain text: 1 document(s)" in out and "every token learned" in out


# ---------------------------------------------------------------------------------------------------------------
# Reading it back: windows start anywhere


def test_text_windows_start_anywhere(tmp_path):
    text = "".join(f"w{i} " for i in range(3000))
    out = str(tmp_path / "out")
    build_dataset([write_text(tmp_path / "c.txt", text)], out_dir=out)
    data, meta = load_dataset(out)
    train = data["train"]
    assert train.kind == "text" and meta["kind"] == "text"
    x, y, m = train.get_batch(64, 16, torch.Generator().manual_seed(0))
    ids = np.asarray(train.ids, dtype=np.int64)
    starts = set()
    for row in range(64):
        hits = [s for s in range(len(ids) - 16) if (ids[s:s + 16] == x[row].numpy()).all()]
        assert hits and (ids[hits[0] + 1:hits[0] + 17] == y[row].numpy()).all()
        starts.add(hits[0])
    assert len(starts) > 50 and m.all()  # many different starts, all learned
    assert train.first_prompt() == ids[:8].tolist()


def test_chat_datasets_keep_turn_starts(tiny_dataset):
    data, meta = load_dataset(tiny_dataset)
    assert meta["kind"] == "chat" and data["train"].kind == "chat"
    x, _, _ = data["train"].get_batch(32, 16, torch.Generator().manual_seed(0))
    starts = set(np.asarray(data["train"].starts).tolist())
    ids = np.asarray(data["train"].ids, dtype=np.int64)
    for row in x.numpy():
        assert any((ids[s:s + 16] == row[:len(ids[s:s + 16])]).all() for s in starts)


@pytest.mark.skipif(not os.path.isfile(SHAKESPEARE), reason="shared tinyshakespeare not present")
def test_real_shakespeare(tmp_path):
    out = str(tmp_path / "out")
    meta = build_dataset([SHAKESPEARE], out_dir=out)
    with open(SHAKESPEARE, encoding="utf-8") as f:
        want = enc().encode_ordinary(f.read()) + [EOT]
    assert read_split(out, "train")["ids"].tolist() + read_split(out, "val")["ids"].tolist() == want
    assert read_meta(out)["tokens"]["val"] == round(len(want) * 0.1) and meta["kind"] == "text"


# ---------------------------------------------------------------------------------------------------------------
# Training on it


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    src = root / "corpus.txt"
    src.write_text("".join(f"To be or not to be, line {i}.\n" for i in range(400)), encoding="utf-8")
    build_dataset([str(src)], out_dir=str(root / "data"))
    return str(root / "data")


def test_train_and_evaluate_on_text(tmp_path, text_dataset):
    from chat_gpt2.evaluation import val_loss
    from helpers import checkpoints, load_ckpt, tiny_train_args, train_inprocess
    out = str(tmp_path / "out")
    log = train_inprocess(tiny_train_args(text_dataset, out, sample_max_tokens=4))
    assert "sample: " in log and "val loss" in log
    ckpt = load_ckpt(os.path.join(out, checkpoints(out)[0]))
    assert ckpt["default_stop"] is None
    from chat_gpt2.checkpoint import model_from_checkpoint
    loss, n = val_loss(model_from_checkpoint(ckpt).eval(), text_dataset, 4, "cpu", "float32")
    assert n == read_meta(text_dataset)["tokens"]["val"] - 1 and np.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------------
# The two-stage recipe: pretrain on text, then a new run on chat data from that checkpoint

SHAPE_FLAGS = ("--n_layer=", "--n_head=", "--n_embd=")


def finetune_args(dataset, out_dir, init_from, **overrides):
    from helpers import tiny_train_args
    args = tiny_train_args(dataset, out_dir, init_from=init_from, **overrides)
    return [a for a in args if not a.startswith(SHAPE_FLAGS)]  # the shape comes from the checkpoint


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, text_dataset):
    from helpers import tiny_train_args, train_inprocess
    out = str(tmp_path_factory.mktemp("pre") / "out")
    train_inprocess(tiny_train_args(text_dataset, out, n_layer=1, n_head=2, n_embd=16, block_size=48))
    return out


def _weights(path):
    from helpers import load_ckpt
    return load_ckpt(path)["model"]


@pytest.mark.parametrize("by", ["folder", "file"])
def test_finetune_starts_a_new_run_from_our_checkpoint(tmp_path, tiny_dataset, pretrained, by):
    from helpers import checkpoints, load_ckpt, train_inprocess
    best = os.path.join(pretrained, [n for n in checkpoints(pretrained) if not n.endswith("_last.pt")][0])
    out = str(tmp_path / "ft")
    log = train_inprocess(finetune_args(tiny_dataset, out, pretrained if by == "folder" else best,
                                        learning_rate=0, min_lr=0, block_size=32, dropout=0.2, max_iters=3))
    assert "starting a new run (fresh optimizer, iter 0) from " + best in log
    assert "eval iter 0:" in log  # iter 0, not the pretraining run's iter
    names = checkpoints(out)
    ckpt = load_ckpt(os.path.join(out, [n for n in names if n.endswith("_last.pt")][0]))
    assert ckpt["iter_num"] == 3 and ckpt["model_args"]["n_embd"] == 16 and ckpt["model_args"]["block_size"] == 32
    assert ckpt["model_args"]["dropout"] == 0.2 and ckpt["config"]["n_layer"] == 1
    assert ckpt["default_stop"] == "\n" and ckpt["template"] == chat.TEMPLATE  # the chat data's, not the text's
    before = _weights(best)
    for name, tensor in ckpt["model"].items():  # learning rate 0: the pretrained weights, cropped to block 32
        want = before[name][:, :, :32, :32] if name.endswith(".attn.bias") else before[name]
        want = want[:32] if name == "transformer.wpe.weight" else want
        assert torch.equal(tensor, want), name


@pytest.mark.parametrize("flag", ["--n_layer=2", "--n_embd=32", "--bias=False", "--n_head=4"])
def test_finetune_refuses_a_shape_change(tmp_path, tiny_dataset, pretrained, flag):
    from chat_gpt2.errors import ConfigError
    from helpers import train_inprocess
    with pytest.raises(ConfigError, match=f"{flag[2:].split('=')[0]}=.*the checkpoint has"):
        train_inprocess(finetune_args(tiny_dataset, str(tmp_path / "ft"), pretrained) + [flag])


def test_finetune_accepts_the_same_shape_and_refuses_a_longer_block(tmp_path, tiny_dataset, pretrained):
    from chat_gpt2.errors import ConfigError
    from helpers import train_inprocess
    train_inprocess(finetune_args(tiny_dataset, str(tmp_path / "a"), pretrained, max_iters=1) +
                    ["--n_layer=1", "--n_embd=16", "--bias=True"])
    with pytest.raises(ConfigError, match="block_size 64 exceeds the model's 48"):
        train_inprocess(finetune_args(tiny_dataset, str(tmp_path / "b"), pretrained, block_size=64))


def test_init_from_a_missing_checkpoint(tmp_path, tiny_dataset):
    from chat_gpt2.errors import MissingFileError
    from helpers import train_inprocess
    with pytest.raises(MissingFileError, match="nope.pt"):
        train_inprocess(finetune_args(tiny_dataset, str(tmp_path / "a"), str(tmp_path / "nope.pt")))


# ---------------------------------------------------------------------------------------------------------------
# Sampling a text model: --raw, --interactive --raw, no default stop


class Capture:
    """Engine.complete's stand-in (helpers.fake_complete): records each prompt's text and stop strings, gives
    canned continuations (kept as they come: --interactive --raw keeps a continuation's leading whitespace)."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def __call__(self, engine, request):
        self.calls.append((chat.get_encoder().decode(request.prompt), request.params.stop))
        return self.replies.pop(0)


@pytest.fixture
def capture(monkeypatch):
    import helpers

    def install(replies):
        fake = Capture(replies)
        helpers.fake_complete(monkeypatch, fake)
        return fake
    return install


def text_checkpoint(tmp_path, default_stop):
    import helpers
    return helpers.save_tiny_checkpoint(tmp_path / "tiny.pt", default_stop=default_stop)


def test_interactive_raw_continues_the_text(tmp_path, capture):
    import io

    import sample
    from chat_gpt2.checkpoint import load_model
    from chat_gpt2.engine import Engine
    fake = capture([" but soft!", "\n what light"])
    model, ckpt = load_model(ckpt=text_checkpoint(tmp_path, "\n"))  # even a chat checkpoint's stop is not used
    lines = iter(["ROMEO:", "/set temperature=0.5", "JULIET:"])

    def read(prompt):
        item = next(lines, None)
        if item is None:
            raise EOFError
        return item
    out = io.StringIO()
    sample.chat_loop(Engine(model), ckpt, {**sample.DEFAULTS, "raw": True}, read, out)
    assert fake.calls == [("ROMEO:", ()), ("ROMEO: but soft!\nJULIET:", ())]  # the continuation kept as it came
    assert out.getvalue().startswith("text: each line continues the text")
    assert " but soft!\n" in out.getvalue() and "Human:" not in out.getvalue()


def test_interactive_raw_keeps_the_newest_text(tmp_path, capture):
    import io

    import sample
    from chat_gpt2.checkpoint import load_model
    from chat_gpt2.engine import Engine
    fake = capture(["x"] * 3)
    model, ckpt = load_model(ckpt=text_checkpoint(tmp_path, None))
    lines = iter(["word " * 100, "last line"])

    def read(prompt):
        item = next(lines, None)
        if item is None:
            raise EOFError
        return item
    sample.chat_loop(Engine(model), ckpt, {**sample.DEFAULTS, "raw": True, "max_new_tokens": 8}, read, io.StringIO())
    assert fake.calls[-1][0].endswith("word wordx\nlast line")  # typed lines are stripped
    assert len(chat.get_encoder().encode_ordinary(fake.calls[-1][0])) == 64 - 8  # block_size - room for the reply


@pytest.mark.parametrize("raw, default_stop, want", [
    (True, "\n", ()),  # --raw: no stop string
    (False, None, ()),  # a text-data checkpoint: no default stop even with the template
    (False, "\n", ("\n",)),
])
def test_sample_default_stop(tmp_path, capture, raw, default_stop, want):
    import sample
    fake = capture(["continued"])
    sample.main([f"--ckpt={text_checkpoint(tmp_path, default_stop)}", "--prompt=Once upon", f"--raw={raw}",
                 "--device=cpu"])
    prompt, stop = fake.calls[0]
    assert stop == want
    assert (prompt == "Once upon") == raw


def test_raw_with_system_is_refused(tmp_path):
    import sample
    from chat_gpt2.errors import ConfigError
    with pytest.raises(ConfigError, match="--system"):
        sample.main([f"--ckpt={text_checkpoint(tmp_path, None)}", "--prompt=x", "--raw=True", "--system=Be nice."])


# ---------------------------------------------------------------------------------------------------------------
# Chat windows with nothing to learn are never drawn


def test_windows_that_cannot_reach_a_reply_are_skipped(tmp_path):
    long_question = " ".join(["word"] * 60)
    records = [{"messages": msgs} for msgs in (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
         {"role": "user", "content": long_question}, {"role": "assistant", "content": "Short."}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    )] * 4
    out = str(tmp_path / "out")
    build_dataset([write_records(tmp_path / "d.jsonl", records)], out, val_fraction=0.25)
    train = load_dataset(out)[0]["train"]
    mask = np.asarray(train.mask)
    for block_size in (8, 16, 32, 128):
        useful = train.useful_starts(block_size)
        want = [s for s in train.starts if mask[s + 1:s + block_size + 1].any()]
        assert list(useful) == want
        x, y, m = train.get_batch(64, block_size, torch.Generator().manual_seed(1))
        assert (m.sum(1) > 0).all()  # every window has something to learn
    assert len(train.useful_starts(8)) < len(train.starts) == len(train.useful_starts(128))


def test_interactive_raw_with_a_real_model_keeps_whitespace(tmp_path):
    import io

    import sample
    from chat_gpt2.checkpoint import load_model
    from chat_gpt2.engine import Engine
    model, ckpt = load_model(ckpt=text_checkpoint(tmp_path, None))
    lines = iter(["Once upon", "a time"])

    def read(prompt):
        item = next(lines, None)
        if item is None:
            raise EOFError
        return item
    cfg = {**sample.DEFAULTS, "raw": True, "max_new_tokens": 6, "temperature": 0.0}
    history = sample.chat_loop(Engine(model), ckpt, cfg, read, io.StringIO())
    from chat_gpt2.engine import Request
    from chat_gpt2.sampling import SamplingParams
    request = Request(chat.get_encoder().encode_ordinary("Once upon"),
                      SamplingParams(temperature=0.0, max_new_tokens=6))
    Engine(model).complete([request])
    want = request.replies[0].text
    assert history[1]["content"] == want  # as generated: not stripped
