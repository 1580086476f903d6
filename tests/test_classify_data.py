"""Labelled text for classification: readers (header detection, quoting, several text columns, int/str labels, BOM,
CRLF), the stratified split and --balance, the prepared dataset and its batches, and every bad input."""
import contextlib
import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

import helpers
import prepare
from chat_gpt2.classify_data import (ClassifyData, as_targets, load_prepared, read_examples, sort_labels,
                                     stratified_split)
from chat_gpt2.dataset import load_dataset
from chat_gpt2.errors import ConfigError, InputError, RecordError

SMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                   "sms-spam-collection", "SMSSpamCollection.tsv")


def write(tmp_path, name, text, encoding="utf-8", newline=""):
    path = tmp_path / name
    with open(path, "w", encoding=encoding, newline=newline) as f:
        f.write(text)
    return str(path)


def run_prepare(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = prepare.main(argv)
    return rc, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Readers


def test_csv_header_quotes_bom_crlf(tmp_path):
    text = '\ufeffId,Text,LABEL\r\n1,"hello, world",pos\r\n2,"two\r\nlines ""quoted""",neg\r\n3,plain,pos\r\n'
    examples, columns, _ = read_examples(write(tmp_path, "a.csv", text))
    assert examples == [("hello, world", "pos"), ('two\r\nlines "quoted"', "neg"), ("plain", "pos")]
    assert columns["text"] == ["Text"] and columns["label"] == "LABEL" and columns["header"]


def test_headerless_two_columns_are_label_then_text(tmp_path):
    examples, columns, _ = read_examples(write(tmp_path, "a.csv", "spam,buy now\nham,see you\n"))
    assert examples == [("buy now", "spam"), ("see you", "ham")]
    assert not columns["header"] and columns["label"] == "0"


def test_header_with_only_a_label_name_makes_the_other_column_the_text(tmp_path):
    examples, _, _ = read_examples(write(tmp_path, "a.tsv", 'Label\tSMS\nham\t"quoted" start\nspam\twin\n'))
    assert examples == [('"quoted" start', "ham"), ("win", "spam")]  # .tsv: no quoting


def test_several_text_columns_by_name_and_by_index(tmp_path):
    path = write(tmp_path, "a.csv", "title,body,y\nHi,there,1\n")
    assert read_examples(path, "title,body", "y")[0] == [("Hi\nthere", "1")]
    headerless = write(tmp_path, "b.csv", "Hi,there,1\n")
    assert read_examples(headerless, "1,0", "2")[0] == [("there\nHi", "1")]


def test_jsonl_int_and_str_labels(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"Text": "a", "Label": 10}\n{"Text": "b", "Label": 2}\n')
    assert read_examples(path)[0] == [("a", "10"), ("b", "2")]
    assert sort_labels(["10", "2", "1"]) == ["1", "2", "10"] and sort_labels(["b", "a"]) == ["a", "b"]
    path = write(tmp_path, "b.json", json.dumps([{"q": "x", "a": "y", "cls": "yes"}]))
    assert read_examples(path, "q,a", "cls")[0] == [("x\ny", "yes")]


@pytest.mark.parametrize("name, text, kw, where, says", [
    ("a.csv", "text,label\nhello,pos\nshort\n", {}, "a.csv:3", "column 'label': missing"),
    ("a.csv", "text,label\nhello,pos\n  ,neg\n", {}, "a.csv:3", "column 'text': empty text"),
    ("a.csv", "text,label\nhello,pos\nbye,maybe\n", {"labels": ["pos", "neg"]}, "a.csv:3", "'maybe' is not one of"),
    ("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', {}, "a.jsonl:2", "column 'label': missing"),
    ("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1.5}\n', {}, "a.jsonl:2", "string or an integer"),
])
def test_bad_rows_name_file_line_and_column(tmp_path, name, text, kw, where, says):
    path = write(tmp_path, name, text)
    with pytest.raises(RecordError) as e:
        read_examples(path, **kw)
    assert str(e.value).startswith(str(tmp_path / where) + ": ") and says in str(e.value)
    stats = {"skipped": Counter(), "rows": 0}
    examples, _, _ = read_examples(path, skip_invalid=True, stats=stats, **kw)
    assert len(examples) == 1 and sum(stats["skipped"].values()) == 1 and stats["rows"] == 2


@pytest.mark.parametrize("name, text, kw, error, says", [
    ("a.csv", "x,y\nhello,pos\n", {"text_column": "text"}, InputError, "a.csv:1: no header row naming 'text'"),
    ("a.csv", "text,label\nhello,pos\n", {"text_column": "body"}, InputError, "a.csv:1: no column 'body'"),
    ("a.csv", "a,b,c\n", {}, InputError, "a.csv:1: which column is the text?"),
    ("a.csv", "a,b\n", {"text_column": "5", "label_column": "0"}, InputError, "a.csv:1: column 5 does not exist"),
    ("a.jsonl", '{"text": "a", "label": 1}\n', {"text_column": "0"}, ConfigError, "name their keys"),
    ("a.xml", "<a/>", {}, InputError, "unsupported extension"),
    ("a.csv", "", {}, InputError, "empty file"),
])
def test_bad_files_and_flags(tmp_path, name, text, kw, error, says):
    with pytest.raises(error, match=says):
        read_examples(write(tmp_path, name, text), **kw)


def test_not_utf8(tmp_path):
    with pytest.raises(InputError, match="not UTF-8"):
        read_examples(write(tmp_path, "a.csv", "text,label\ncafé,x\n", encoding="latin-1"))


# ---------------------------------------------------------------------------------------------------------------
# Split, balance, the prepared dataset


def test_stratified_split_and_balance_counts():
    labels = [0] * 100 + [1] * 20
    parts = stratified_split(labels, 0.1, 0.2, seed=3)
    counts = {s: np.bincount(np.asarray(labels)[p], minlength=2).tolist() for s, p in parts.items()}
    assert counts == {"train": [70, 14], "val": [10, 2], "test": [20, 4]}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(120))
    assert all((parts[s] == stratified_split(labels, 0.1, 0.2, seed=3)[s]).all() for s in parts)
    assert any((parts[s] != stratified_split(labels, 0.1, 0.2, seed=4)[s]).any() for s in parts)
    balanced = stratified_split(labels, 0.1, 0.2, seed=3, balance=True)
    counts = {s: np.bincount(np.asarray(labels)[p], minlength=2).tolist() for s, p in balanced.items()}
    assert counts == {"train": [14, 14], "val": [2, 2], "test": [4, 4]}


def labelled_csv(tmp_path, n=60):
    rows = ["text,label"] + [f"{'good great fine' if i % 3 else 'bad awful'} number {i},{'pos' if i % 3 else 'neg'}"
                             for i in range(n)]
    return write(tmp_path, "data.csv", "\n".join(rows) + "\n")


def test_prepare_cli_writes_a_classify_dataset_and_batches(tmp_path):
    out = str(tmp_path / "out")
    rc, stdout, _ = run_prepare([labelled_csv(tmp_path), "--task=classify", f"--out_dir={out}", "--balance"])
    assert rc == 0 and "rows: 60 read, 60 used, skipped: none" in stdout and "train: " in stdout
    data, meta = load_prepared(out)
    assert meta["kind"] == "classify" and meta["labels"] == ["neg", "pos"] and meta["balanced"]
    assert {s: sum(c.values()) for s, c in meta["class_counts"].items()} == {"train": 28, "val": 4, "test": 8}
    assert all(len(set(c.values())) == 1 for c in meta["class_counts"].values())
    x, lengths, labels = data["train"].batch([0, 1], block_size=4)
    assert x.shape == (2, 4) and lengths.tolist() == [4, 4] and (x[:, -1] == 50256).all()  # the end is kept
    x, y, m = as_targets(torch.tensor([[5, 6, 7], [8, 50256, 50256]]), torch.tensor([3, 1]), torch.tensor([1, 0]))
    assert y.tolist() == [[-1, -1, 1], [0, -1, -1]] and m.tolist() == [[0, 0, 1], [1, 0, 0]]


def test_a_classify_build_replaces_a_chat_one_and_the_other_way(tmp_path):
    out = str(tmp_path / "out")
    chat_file = helpers.write_records(tmp_path / "c.jsonl", helpers.chat_records(20))
    assert run_prepare([chat_file, f"--out_dir={out}"])[0] == 0
    assert run_prepare([labelled_csv(tmp_path), "--task=classify", f"--out_dir={out}"])[0] == 0
    assert not os.path.lexists(os.path.join(out, "train_mask.bin"))
    assert len(ClassifyData(out, "test")) == 12
    assert run_prepare([chat_file, f"--out_dir={out}"])[0] == 0
    assert not os.path.lexists(os.path.join(out, "test_labels.npy"))
    assert run_prepare([labelled_csv(tmp_path), "--task=classify", f"--out_dir={out}"])[0] == 0
    with pytest.raises(InputError, match="classification dataset"):
        load_dataset(out)


def test_prepare_cli_bad_row_is_one_line_and_writes_nothing(tmp_path):
    path = write(tmp_path, "a.csv", "text,label\nhi,a\nthere,b\n,a\n")
    out = tmp_path / "out"
    rc, _, err = run_prepare([path, "--task=classify", f"--out_dir={out}"])
    assert rc == 1 and err.startswith(f"error: {path}:4: column 'text': empty text")
    assert not (out / "meta.json").exists()
    rc, _, err = run_prepare([path, "--task=classify", f"--out_dir={out}", "--labels=a"])
    assert rc == 1 and "a.csv:3: column 'label': label 'b' is not one of --labels a" in err


@pytest.mark.skipif(not os.path.exists(SMS), reason="the SMS spam data is not here")
def test_sms_spam_collection(tmp_path):
    rc, stdout, _ = run_prepare([SMS, "--task=classify", f"--out_dir={tmp_path}"])
    meta = json.load(open(tmp_path / "meta.json"))
    assert rc == 0 and meta["rows"] == {"read": 5574, "used": 5574} and meta["labels"] == ["ham", "spam"]
    assert sum(meta["class_counts"][s]["spam"] for s in meta["class_counts"]) == 747
