"""Dataset format versions (chat_gpt2/dataset.py): format 2 stores ids in the dtype the vocabulary needs (uint32
round trip) and no mask for text; format 1 (no "format" key, uint16, a mask file everywhere: the committed
tests/fixtures/v1 datasets) still loads and trains the same; an unknown version is a one-line error."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from chat_gpt2 import build, chat, dataset
from chat_gpt2.build import build_dataset
from chat_gpt2.classify_data import ClassifyData, load_prepared, write_split
from chat_gpt2.errors import InputError
from chat_gpt2.evaluation import conversation_windows
from helpers import REPO, read_meta, read_metrics, train_inprocess, tiny_train_args, write_records

FIXTURES = os.path.join(REPO, "tests", "fixtures", "v1")


def batches(data, split, block_size, n=3, seed=0):
    """n (x, y, m) batches of a split, from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return [data[split].get_batch(4, block_size, gen) for _ in range(n)]


def assert_same_batches(a, b):
    for (xa, ya, ma), (xb, yb, mb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ma, mb)


def as_version_1(folder, to):
    """A copy of a prepared chat/text dataset in the version-1 layout: plain files, uint16 ids, a mask file per
    split (all ones for text), no "format" / "token_dtype" in meta.json."""
    meta = read_meta(folder)
    os.makedirs(to)
    for split in dataset.SPLITS:
        ids = np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=dataset.stored_dtype(meta))
        ids.astype(np.uint16).tofile(os.path.join(to, f"{split}.bin"))
        mask = os.path.join(folder, f"{split}_mask.bin")
        if os.path.exists(mask):
            shutil.copy(mask, os.path.join(to, f"{split}_mask.bin"))
        else:
            np.ones(len(ids), dtype=np.uint8).tofile(os.path.join(to, f"{split}_mask.bin"))
        for suffix in ("_turns.npy", "_convs.npy"):
            shutil.copy(os.path.join(folder, split + suffix), os.path.join(to, split + suffix))
    old = {k: v for k, v in meta.items() if k not in ("format", "token_dtype")}
    with open(os.path.join(to, "meta.json"), "w") as f:
        json.dump(old, f)
    return str(to)


def mask_files(folder):
    return [os.path.join(root, n) for root, _, names in os.walk(folder) for n in names if n.endswith("_mask.bin")]


def test_token_dtype_follows_the_vocabulary():
    assert dataset.token_dtype(chat.VOCAB_SIZE) == np.uint16 and dataset.token_dtype(65_536) == np.uint16
    assert dataset.token_dtype(65_537) == np.uint32 and dataset.token_dtype(200_019) == np.uint32
    assert dataset.format_fields(100_000) == {"format": 2, "token_dtype": "uint32"}


# ---------------------------------------------------------------------------------------------------------------
# Text: no mask file, the same batches


@pytest.mark.parametrize("source", ["txt", "records"])
def test_text_dataset_has_no_mask_file_and_reads_as_its_version_1_layout(tmp_path, source):
    if source == "txt":
        text = "".join(f"Line {i}: some words of the corpus, {i * 7 % 11} of them.\n" for i in range(300))
        inputs = [str(tmp_path / "corpus.txt")]
        (tmp_path / "corpus.txt").write_text(text)
    else:
        docs = [{"text": f"Document {i}. " + "More words here. " * (i % 9 + 1)} for i in range(40)]
        inputs = [write_records(tmp_path / "docs.jsonl", docs)]
    out = str(tmp_path / "out")
    meta = build_dataset(inputs, out_dir=out, val_fraction=0.2)
    assert meta["kind"] == "text" and meta["format"] == 2 and meta["token_dtype"] == "uint16"
    assert mask_files(out) == []  # nor in the build folder
    assert not any(n.startswith("all") for n in os.listdir(os.path.realpath(os.path.join(out, ".dataset"))))
    v1 = as_version_1(out, tmp_path / "v1")
    new, _ = dataset.load_dataset(out)
    old, old_meta = dataset.load_dataset(v1)
    assert "format" not in old_meta
    for split in dataset.SPLITS:
        assert new[split].mask.strides == (0,) and len(new[split].mask) == len(new[split].ids)  # no array
        assert np.array_equal(new[split].mask, old[split].mask) and np.array_equal(new[split].ids, old[split].ids)
        assert_same_batches(batches(new, split, 16), batches(old, split, 16))
        windows = [list(conversation_windows(d[split].ids, d[split].mask, d[split].convs, d[split].starts, 16))
                   for d in (new, old)]
        assert len(windows[0]) == len(windows[1]) > 1
        for (s0, t0, m0), (s1, t1, m1) in zip(*windows):
            assert s0 == s1 and np.array_equal(t0, t1) and np.array_equal(m0, m1)
    assert new["val"].first_prompt() == old["val"].first_prompt()


def test_chat_dataset_keeps_its_mask(tiny_dataset):
    meta = read_meta(tiny_dataset)
    assert meta["format"] == 2 and meta["kind"] == "chat"
    assert sorted(map(os.path.basename, mask_files(tiny_dataset))) == ["train_mask.bin"] * 2 + ["val_mask.bin"] * 2
    data, _ = dataset.load_dataset(tiny_dataset)
    assert 0 < data["train"].mask.mean() < 1


def test_text_then_chat_in_one_folder_relinks_the_mask(tmp_path):
    """A text build after a chat one in the same folder leaves no stale mask link; chat after text has one again."""
    out = str(tmp_path / "out")
    (tmp_path / "c.txt").write_text("Some plain text to learn. " * 200)
    chats = write_records(tmp_path / "c.jsonl", [{"user": f"Q{i}?", "assistant": f"A{i}."} for i in range(8)])
    build_dataset([chats], out_dir=out)
    build_dataset([str(tmp_path / "c.txt")], out_dir=out)
    assert not os.path.lexists(os.path.join(out, "train_mask.bin"))
    assert dataset.load_dataset(out)[1]["kind"] == "text"
    build_dataset([chats], out_dir=out)
    assert dataset.load_dataset(out)[0]["train"].mask.strides == (1,)


# ---------------------------------------------------------------------------------------------------------------
# uint32: ids above 65,535


def synthetic_conversations(rng, n, vocab_size):
    """[(ids, mask, turn starts)] with ids up to vocab_size - 1, the last one <|endoftext|>-like."""
    convs = []
    for _ in range(n):
        length = int(rng.integers(5, 40))
        ids = rng.integers(0, vocab_size, length)
        ids[rng.integers(0, length)] = vocab_size - 1  # the largest id, in each conversation
        mask = (rng.random(length) < 0.5).astype(np.uint8)
        mask[-1] = 1
        convs.append((ids, mask, [0, length // 2]))
    return convs


def test_uint32_round_trip_through_the_split(tmp_path):
    vocab_size, rng = 100_000, np.random.default_rng(0)
    out = tmp_path / "out"
    os.makedirs(out)
    convs = synthetic_conversations(rng, 30, vocab_size)
    stream = build.TokenWriter(str(out), "all", vocab_size)
    for i, (ids, mask, turns) in enumerate(convs):
        stream.add_batch(ids, mask, [0], turns, [str(i).encode()])  # a digest per conversation
    stream.close(str(out), "all")
    val = build.choose_val(len(convs), 0.2, 1)
    writers = {s: build.TokenWriter(str(out), s, vocab_size) for s in dataset.SPLITS}
    build.split_stream(stream, val, writers)
    for s in dataset.SPLITS:
        writers[s].close(str(out), s)
    meta = {**dataset.format_fields(vocab_size), "kind": "chat", "vocab_size": vocab_size,
            "tokens": {s: writers[s].n_tokens for s in dataset.SPLITS}}
    (out / "meta.json").write_text(json.dumps(meta))
    assert os.path.getsize(out / "train.bin") == 4 * writers["train"].n_tokens
    data, _ = dataset.load_dataset(str(out))
    for split, picked in (("train", [c for i, c in enumerate(convs) if i not in val]),
                          ("val", [c for i, c in enumerate(convs) if i in val])):
        d = data[split]
        assert d.ids.dtype == np.uint32 and d.ids.max() == vocab_size - 1
        assert np.array_equal(d.ids, np.concatenate([ids for ids, _, _ in picked]))
        assert np.array_equal(d.mask, np.concatenate([mask for _, mask, _ in picked]))
        x, y, m = d.get_batch(8, 12, torch.Generator().manual_seed(2))
        for row in range(8):  # each row is the window of the stored ids at some turn start
            starts = [s for s in d.starts if np.array_equal(x[row, :min(12, len(d.ids) - 1 - s)].numpy(),
                                                            d.ids[s:s + 12][:len(d.ids) - 1 - s])]
            assert starts, row
        assert int(x.max()) < vocab_size and x.dtype == torch.int64


def test_uint32_classification_tokens(tmp_path):
    ids = [np.array([70_000, 5, 99_999]), np.array([65_536, 1])]
    tokens = write_split(str(tmp_path), "train", ids, [0, 1], 100_000)
    assert tokens == 5 and os.path.getsize(tmp_path / "train.bin") == 20
    d = ClassifyData(str(tmp_path), "train", {**dataset.format_fields(100_000), "kind": "classify"})
    x, lengths, labels = d.batch([0, 1], 8)
    assert x[0, :3].tolist() == [70_000, 5, 99_999] and x[1, :2].tolist() == [65_536, 1]
    assert lengths.tolist() == [3, 2] and labels.tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# Version 1 (the committed fixtures, prepared before format 2) and unknown versions


@pytest.mark.parametrize("name, source", [("v1_text", "v1_text.txt"), ("v1_chat", "v1_chat.jsonl")])
def test_version_1_dataset_loads_and_trains_as_a_rebuild(tmp_path, name, source):
    v1 = shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name)  # training writes nothing there, but still
    old_meta = read_meta(v1)
    assert "format" not in old_meta and all(os.path.exists(v1 / f"{s}_mask.bin") for s in dataset.SPLITS)
    rebuilt = str(tmp_path / "rebuilt")
    build_dataset([os.path.join(FIXTURES, source)], out_dir=rebuilt, val_fraction=old_meta["val_fraction"])
    old, _ = dataset.load_dataset(str(v1))
    new, meta = dataset.load_dataset(rebuilt)
    assert meta["tokens"] == old_meta["tokens"] and bool(mask_files(rebuilt)) == (name == "v1_chat")
    for split in dataset.SPLITS:
        assert_same_batches(batches(old, split, 24), batches(new, split, 24))
    runs = [str(tmp_path / "run_v1"), str(tmp_path / "run_rebuilt")]
    for d, run in zip((str(v1), rebuilt), runs):
        train_inprocess(tiny_train_args(d, run, max_iters=4, eval_interval=2))
    kept = ("event", "iter", "loss", "train_loss", "val_loss")
    losses = [[{k: r[k] for k in kept if k in r} for r in read_metrics(run)] for run in runs]
    assert sum(r["event"] == "step" for r in losses[0]) == 4 and losses[0] == losses[1]


@pytest.mark.parametrize("change, match", [
    ({"format": 3}, r"meta\.json: field 'format': version 3 is not one"),
    ({"format": "2"}, r"meta\.json: field 'format': version '2'"),
    ({"format": 2, "token_dtype": "int8"}, r"meta\.json: field 'token_dtype': 'int8' is not one of uint16, uint32"),
    ({"format": 2}, r"meta\.json: field 'token_dtype': None"),
])
def test_unknown_format_is_a_one_line_error(tmp_path, change, match):
    folder = shutil.copytree(os.path.join(FIXTURES, "v1_chat"), tmp_path / "d")
    meta = {**read_meta(folder), **change}
    (folder / "meta.json").write_text(json.dumps(meta))
    for load in (dataset.load_dataset, load_prepared):
        with pytest.raises(InputError, match=match) as e:
            load(str(folder))
        assert "\n" not in str(e.value) and str(e.value).startswith(str(folder / "meta.json"))
