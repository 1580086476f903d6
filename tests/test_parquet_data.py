"""Parquet files and Hugging Face Hub datasets as prepare.py inputs (chat_gpt2/sources.py): rows streamed as
records a batch at a time, --text_column documents, chat columns through records.py's schemas, errors naming
file:row and field, and a Hub dataset prepared by name from an HF_HUB_CACHE-layout cache, offline."""
import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from chat_gpt2 import sources
from chat_gpt2.build import build_dataset
from chat_gpt2.errors import InputError, RecordError
from helpers import EOT, encode, env, rendered, script, write_records

DOCS = [f"Document {i}: " + "words of the corpus, " * (i % 13 + 1) + f"and its end {i}." for i in range(60)]


def write_parquet(path, columns, row_group_size=7):
    """A parquet file of {name: values} in row groups of row_group_size rows (several, as large files have)."""
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    assert pq.ParquetFile(str(path)).metadata.num_row_groups > 1 or len(next(iter(columns.values()))) <= 7
    return str(path)


def all_ids(out):
    from chat_gpt2 import dataset
    data, _ = dataset.load_dataset(out)
    return {s: np.asarray(data[s].ids, dtype=np.int64).tolist() for s in dataset.SPLITS}


def documents_of(out):
    """The documents of both splits, as token lists (each ends with <|endoftext|>)."""
    docs = []
    for ids in all_ids(out).values():
        cuts = [i + 1 for i, t in enumerate(ids) if t == EOT]
        docs += [ids[a:b] for a, b in zip([0] + cuts, cuts)]
    return sorted(docs)


# ---------------------------------------------------------------------------------------------------------------
# Local parquet files


def test_text_column_of_a_parquet_file_with_several_row_groups(tmp_path):
    path = write_parquet(tmp_path / "web.parquet", {"id": list(range(len(DOCS))), "url": ["u"] * len(DOCS),
                                                    "content": DOCS})
    out = str(tmp_path / "out")
    meta = build_dataset([path], out_dir=out, text_column="content", val_fraction=0.1)
    assert documents_of(out) == sorted(encode(d) + [EOT] for d in DOCS)
    assert meta["kind"] == "text" and meta["documents"] == len(DOCS) and meta["text_columns"] == ["content"]
    with open(path, "rb") as f:
        assert meta["sources"] == {path: hashlib.sha256(f.read()).hexdigest()}  # the whole file, in order


def test_two_text_columns_are_joined_by_a_newline(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", {"title": [f"Title {i}" for i in range(10)],
                                                  "body": DOCS[:10]})
    out = str(tmp_path / "out")
    build_dataset([path], out_dir=out, text_column="title,body")
    assert documents_of(out) == sorted(encode(f"Title {i}\n{d}") + [EOT] for i, d in enumerate(DOCS[:10]))


def test_rows_are_records_recognised_by_their_columns(tmp_path):
    """Without --text_column a row is a record: a text column is a document, chat columns go through the same
    schemas as .jsonl records (here messages as a list of structs, and Alpaca columns); metadata columns are ignored."""
    chats = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                           {"role": "assistant", "content": f"Answer {i}."}], "source": "x"} for i in range(12)]
    alpaca = [{"instruction": f"Double {i}.", "input": "" if i % 2 else "quickly", "output": str(2 * i)}
              for i in range(12)]
    for name, records in (("messages", chats), ("alpaca", alpaca)):
        table_path = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.Table.from_pylist(records), table_path, row_group_size=5)
        a, b = str(tmp_path / f"{name}_parquet"), str(tmp_path / f"{name}_jsonl")
        build_dataset([table_path], out_dir=a)
        build_dataset([write_records(tmp_path / f"{name}.jsonl", records)], out_dir=b)
        assert rendered(a) == rendered(b) and len(rendered(a)) == 12
    text = write_parquet(tmp_path / "docs.parquet", {"text": DOCS, "lang": ["en"] * len(DOCS)})
    out = str(tmp_path / "docs")
    assert build_dataset([text], out_dir=out)["kind"] == "text"
    assert documents_of(out) == sorted(encode(d) + [EOT] for d in DOCS)


def test_a_missing_column_names_the_file_and_the_column(tmp_path):
    path = write_parquet(tmp_path / "web.parquet", {"id": list(range(10)), "body": DOCS[:10]})
    with pytest.raises(InputError, match=r"web\.parquet: no column 'text'; its columns: id, body"):
        build_dataset([path], out_dir=str(tmp_path / "out"), text_column="text")
    with pytest.raises(InputError, match=r"web\.parquet: no text or chat column \(its columns: id, body\)"):
        build_dataset([path], out_dir=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "meta.json")


def test_a_bad_row_names_file_row_and_field_and_can_be_skipped(tmp_path, capsys):
    texts = DOCS[:20]
    texts[13] = None  # a null
    texts[15] = "   "
    path = write_parquet(tmp_path / "web.parquet", {"text": texts})
    out = str(tmp_path / "out")
    assert prepare.main([path, f"--out_dir={out}", "--text_column=text"]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}:row 13: field 'text' is null" in err and "--skip_invalid" in err
    meta = build_dataset([path], out_dir=out, text_column="text", skip_invalid=True)
    assert meta["skipped"] == {"missing field": 1, "empty content": 1} and meta["documents"] == 18
    with pytest.raises(RecordError, match=r"b\.parquet:row 1: field 'text' is empty"):
        build_dataset([write_parquet(tmp_path / "b.parquet", {"text": texts[14:]})], out_dir=out)
    chat = str(tmp_path / "chat.parquet")
    pq.write_table(pa.Table.from_pylist([{"user": "Hi", "assistant": "Hello"}] * 3 + [{"user": "Hi", "assistant": None}]),
                   chat)
    with pytest.raises(RecordError, match=r"chat\.parquet:row 3: field 'assistant' must be a string, got NoneType"):
        build_dataset([chat], out_dir=out)


def test_rows_stream_before_a_damaged_later_row_group(tmp_path, monkeypatch):
    """Rows come a record batch at a time: those of the first row groups are read before a damaged last one fails
    (which names the file and the last good row)."""
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 10)
    path = write_parquet(tmp_path / "web.parquet", {"text": DOCS}, row_group_size=20)
    meta = pq.ParquetFile(path).metadata
    last = meta.row_group(meta.num_row_groups - 1).column(0)
    with open(path, "r+b") as f:
        f.seek(last.data_page_offset)
        f.write(b"\xff" * 64)
    seen = []
    with pytest.raises(InputError, match=r"web\.parquet: unreadable parquet after row 40"):
        for where, record in sources.iter_parquet(path, hashlib.sha256(), ["text"]):
            seen.append(record["text"])
    assert seen == DOCS[:40]


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(InputError, match=r"x\.parquet: not a readable parquet file"):
        build_dataset([str(tmp_path / "x.parquet")], out_dir=str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------------------------
# Hub datasets by name, from a local cache (HF_HUB_CACHE layout, offline)


def hub_cache(root, repo="someone/webtext", revision="0" * 39 + "1"):
    """A Hub cache holding dataset repo at revision (refs/main): data/train-0000{0,1}-of-00002.parquet (DOCS[:40],
    DOCS[40:50]) and data/test-00000-of-00001.parquet (DOCS[50:])."""
    repo_dir = root / f"datasets--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision / "data"
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    for name, docs in (("train-00000-of-00002", DOCS[:40]), ("train-00001-of-00002", DOCS[40:50]),
                       ("test-00000-of-00001", DOCS[50:])):
        write_parquet(snapshot / f"{name}.parquet", {"text": docs, "score": [0.5] * len(docs)})
    return str(root)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants
    cache = hub_cache(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_name_resolves_to_the_train_split_files(offline_hub):
    files = sources.expand_inputs(["hf://datasets/someone/webtext"])
    assert [os.path.basename(f) for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert all(f.startswith(offline_hub) for f in files)
    glob = sources.expand_inputs(["hf://datasets/someone/webtext@main/data/test-*.parquet"])
    assert [os.path.basename(f) for f in glob] == ["test-00000-of-00001.parquet"]
    assert sources.parse_hub_name("hf://datasets/o/n@refs%2Fconvert%2Fparquet/default/train/*.parquet") == (
        "o/n", "refs/convert/parquet", "default/train/*.parquet")
    assert sources.train_split(["a/0.parquet", "b/1.parquet"]) == ["a/0.parquet", "b/1.parquet"]  # no split named
    assert sources.train_split(["train/0.parquet", "validation/0.parquet"]) == ["train/0.parquet"]


@pytest.mark.parametrize("name, match", [
    ("hf://datasets/someone/missing", r"hf://datasets/someone/missing: not in the Hub cache"),
    ("hf://datasets/someone/webtext/nothing/*.parquet", r"no file matches 'nothing/\*\.parquet' in someone/webtext"),
    ("hf://datasets/justaname", r"a Hub dataset is hf://datasets/OWNER/NAME"),
])
def test_hub_errors(offline_hub, tmp_path, capsys, name, match):
    assert prepare.main([name, f"--out_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(match, err), err


def test_prepare_a_hub_dataset_by_name_offline(tmp_path):
    """prepare.py as a command, HF_HUB_OFFLINE=1 and HF_HUB_CACHE set in its environment: the train files'
    documents (not the test split's), val from the test split's file by --val_file."""
    cache = hub_cache(tmp_path / "hub")
    p = subprocess.run([sys.executable, script("prepare.py"), "hf://datasets/someone/webtext", "--text_column=text",
                        "--out_dir=data/web", "--val_file=hf://datasets/someone/webtext/data/test-*.parquet"],
                       cwd=tmp_path, env={**env(), "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    assert "plain text: 60 document(s) read" in p.stdout
    ids = all_ids(str(tmp_path / "data" / "web"))
    assert ids["train"] == [t for d in DOCS[:50] for t in encode(d) + [EOT]]
    assert ids["val"] == [t for d in DOCS[50:] for t in encode(d) + [EOT]]


def test_text_column_of_jsonl_records(tmp_path):
    """--text_column reads .jsonl records the same way: those keys are the document, whatever else they hold."""
    path = write_records(tmp_path / "d.jsonl", [{"body": d, "messages": "ignored"} for d in DOCS[:8]])
    out = str(tmp_path / "out")
    assert build_dataset([path], out_dir=out, text_column="body")["documents"] == 8
    assert documents_of(out) == sorted(encode(d) + [EOT] for d in DOCS[:8])
    bad = write_records(tmp_path / "bad.jsonl", [{"body": "x"}, {"title": "no body"}])
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: field 'body' is missing"):
        build_dataset([bad], out_dir=out, text_column="body")
