"""The prepared dataset: building it (chat_gpt2/build.py: token offsets, the split, meta.json, the val file, an
interrupted build) and reading it (chat_gpt2/dataset.py: turn-aligned training windows, load errors); real data
in ../shared/data."""
import glob
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from chat_gpt2 import build, chat, dataset
from chat_gpt2.build import build_dataset
from chat_gpt2.errors import ConfigError, InputError
from helpers import (EOT, GOOD, SHARED_DATA, all_texts, chat_records, conversations, decode, expected, make_legacy,
                     numbered, prepared, read_meta, read_split, records_file, snapshot, state,
                     write_records)

# ---------------------------------------------------------------------------------------------------------------
# Building: the text and offsets


def test_literal_endoftext_in_user_text_stays_text(tmp_path):
    records = [{"user": "Say <|endoftext|> now", "assistant": "I said <|endoftext|>"}, GOOD]
    out, _ = prepared(tmp_path, records)
    convs = conversations(out, "train") + conversations(out, "val")
    text_conv = [ids for ids, _ in convs if "Say" in decode(ids)]
    assert len(text_conv) == 1
    ids = text_conv[0]
    assert ids.count(EOT) == 1 and ids[-1] == EOT  # only the real end of the conversation
    assert decode(ids).count("<|endoftext|>") == 3


def test_turn_and_conversation_offsets(tmp_path):
    out, _ = prepared(tmp_path, chat_records(12), val_fraction=0.25)
    for split in ("train", "val"):
        d = read_split(out, split)
        assert set(d["convs"].tolist()) <= set(d["turns"].tolist())
        assert d["convs"][0] == 0 and np.all(np.diff(d["turns"]) > 0)
        for t in d["turns"]:
            assert decode(d["ids"][t:t + 3]).startswith(("Human:", "System:"))
        # turns start at each conversation and at every "Human:" that follows a finished turn
        convs = set(d["convs"].tolist())
        human = {i for i in range(1, len(d["ids"])) if decode(d["ids"][i:i + 2]) == "Human:"
                 and i not in convs and decode(d["ids"][i - 2:i]).endswith("\n\n")}
        assert sorted(human | convs) == d["turns"].tolist()
        assert len(human) == sum(1 for ids, _ in conversations(out, split) if "And double" in decode(ids))


# ---------------------------------------------------------------------------------------------------------------
# Building: the split


def test_split_by_conversation_with_val_fraction(tmp_path):
    out, meta = prepared(tmp_path, numbered(20), val_fraction=0.25)
    train, val = ({decode(ids) for ids, _ in conversations(out, s)} for s in ("train", "val"))
    assert len(val) == 5 and len(train) == 15 and not train & val
    assert train | val == {expected([("user", f"Question number {i}?"), ("assistant", f"Answer {i}.")])[0]
                           for i in range(20)}
    assert meta["conversations"] == {"train": 15, "val": 5}


def test_split_is_deterministic_by_seed(tmp_path):
    src = write_records(tmp_path / "d.jsonl", numbered(20))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        build_dataset([src], out_dir=str(tmp_path / name), val_fraction=0.25, seed=seed)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert set(all_texts(tmp_path / "a")) == set(all_texts(tmp_path / "c"))
    val_a = {decode(i) for i, _ in conversations(tmp_path / "a", "val")}
    val_c = {decode(i) for i, _ in conversations(tmp_path / "c", "val")}
    assert val_a != val_c


@pytest.mark.parametrize("n", [2, 3])
def test_tiny_dataset_still_gets_a_val_conversation(tmp_path, n):
    _, meta = prepared(tmp_path, numbered(n), val_fraction=0.1)
    assert meta["conversations"]["val"] >= 1 and meta["conversations"]["train"] >= 1
    assert meta["conversations"]["val"] + meta["conversations"]["train"] == n


def test_single_conversation_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="at least 2"):
        prepared(tmp_path, numbered(1))
    assert not os.listdir(tmp_path / "out")


def test_val_file(tmp_path):
    train_src = write_records(tmp_path / "train.jsonl", numbered(4))
    val_src = write_records(tmp_path / "val.json", [{"question": "Q?", "answer": "A."}])
    out = str(tmp_path / "out")
    meta = build_dataset([train_src], out_dir=out, val_file=val_src)
    assert meta["conversations"] == {"train": 4, "val": 1}
    assert [decode(ids) for ids, _ in conversations(out, "val")] == ["Human: Q?\nAssistant: A.\n\n<|endoftext|>"]
    assert meta["val_fraction"] is None
    assert set(meta["sources"]) == {train_src, val_src}


# ---------------------------------------------------------------------------------------------------------------
# Building: meta.json, and an interrupted build


def test_meta_json(tmp_path):
    records = numbered(6) + [{"user": "List two.", "assistant": "one\ntwo"}]
    src = write_records(tmp_path / "d.jsonl", records)
    out = str(tmp_path / "out")
    returned = build_dataset([src], out_dir=out, val_fraction=0.3, seed=5)
    meta = read_meta(out)
    assert meta == returned
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert meta["template"] == chat.TEMPLATE
    assert meta["template"]["user"] == "Human: {content}\n" and meta["template"]["assistant_label"] == "Assistant:"
    assert meta["multiline_replies"] is True and meta["default_stop"] == "\nHuman:"
    with open(src, "rb") as f:
        assert meta["sources"] == {src: hashlib.sha256(f.read()).hexdigest()}
    assert meta["conversations"] == {"train": 5, "val": 2} and meta["seed"] == 5 and meta["skipped"] == {}
    learned = 0
    for split in ("train", "val"):
        d = read_split(out, split)
        assert meta["tokens"][split] == len(d["ids"]) == len(d["mask"]) == os.path.getsize(
            os.path.join(out, f"{split}.bin")) // 2
        assert len(d["convs"]) == meta["conversations"][split]
        learned += int(d["mask"].sum())
    assert meta["learned_token_share"] == round(learned / sum(meta["tokens"].values()), 4)


def test_single_line_replies_are_recorded(tmp_path):
    _, meta = prepared(tmp_path, numbered(3) + [{"user": "x", "assistant": "trailing newline only\n"}])
    assert meta["multiline_replies"] is False and meta["default_stop"] == "\n"


def test_interrupted_run_leaves_existing_dataset(tmp_path, existing_dataset, monkeypatch):
    out, before = existing_dataset
    src = write_records(tmp_path / "new.jsonl", numbered(8))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "split_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_dataset([src], out_dir=out)
    assert state(out) == before  # the same names (no temporary folder left) and the same files


def test_a_mixed_dataset_is_refused(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build_dataset([records_file(tmp_path / "a.jsonl", 10, "a")], out_dir=a)
    build_dataset([records_file(tmp_path / "b.jsonl", 10, "b")], out_dir=b)
    make_legacy(a)
    make_legacy(b)
    shutil.copy(f"{b}/train_turns.npy", f"{a}/train_turns.npy")  # sizes may match: the copy is still refused
    os.remove(f"{a}/train_turns.npy")
    os.symlink(f"{b}/train_turns.npy", f"{a}/train_turns.npy")
    with pytest.raises(InputError, match="different builds"):
        dataset.load_dataset(a)


def test_a_live_runs_build_folder_is_kept(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    live, dead = out / f".prepare-{os.getpid()}-abc", out / ".prepare-999999999-abc"
    live.mkdir(), dead.mkdir()
    (out / "notes.tmp999999999").write_text("a user's file, not ours")
    assert build.clean_out_dir(str(out)) == [dead.name]
    assert live.is_dir() and (out / "notes.tmp999999999").exists()


# ---------------------------------------------------------------------------------------------------------------
# Reading: training windows and load errors


def check_windows(split, x, y, m):
    """Every row is the window of block_size + 1 tokens at some turn start, padded past the end of the split.
    Returns each row's start."""
    ids, mask = np.asarray(split.ids, dtype=np.int64), np.asarray(split.mask)
    B, T = x.shape
    starts = []
    for row in range(B):
        matches = []
        for s in split.starts:
            n = min(T, len(ids) - 1 - s)
            if (np.array_equal(x[row, :n], ids[s:s + n]) and np.array_equal(y[row, :n], ids[s + 1:s + 1 + n])
                    and np.array_equal(m[row, :n], mask[s + 1:s + 1 + n])  # the mask of the target token
                    and (x[row, n:] == EOT).all() and (y[row, n:] == -1).all() and (m[row, n:] == 0).all()):
                matches.append(s)
        assert matches, f"row {row} is not a turn-aligned window"
        assert decode(x[row, :2].tolist()) in ("Human:", "System:")
        starts.append(matches[0])
    return starts


def test_get_batch_windows_start_at_turns_and_masks_follow_targets(tiny_dataset):
    data, meta = dataset.load_dataset(tiny_dataset)
    split = data["train"]
    gen = torch.Generator().manual_seed(0)
    seen, batches = set(), []
    for block_size in (24, 24, 24, 120):  # 120: windows near the end of the split are padded
        x, y, m = split.get_batch(8, block_size, gen)
        assert x.shape == y.shape == m.shape == (8, block_size)
        assert x.dtype == y.dtype == torch.int64 and m.dtype == torch.float32
        seen |= set(check_windows(split, x.numpy(), y.numpy(), m.numpy()))
        batches.append(x[:, :3].numpy().tobytes())
    # the generator moves on: each call draws new windows, from many turn starts (conversation starts and later
    # turns of multi-turn conversations), not the same few
    assert len(set(batches)) == len(batches)
    assert len(seen) >= 12 and seen <= set(split.starts.tolist())
    assert seen & set(split.convs.tolist()) and seen - set(split.convs.tolist())
    # the mask marks exactly the reply tokens of the targets: decoding them gives only replies
    x, y, m = split.get_batch(4, 24, torch.Generator().manual_seed(1))
    learned = decode([t for t, k in zip(y.flatten().tolist(), m.flatten().tolist()) if k and t != EOT])
    assert "Human" not in learned and "Assistant" not in learned and "System" not in learned
    assert any(s != 0 and s not in set(split.convs) for s in split.starts)  # multi-turn data has mid-turn starts


def test_get_batch_on_val_split_shorter_than_block_size(tiny_val_dataset):
    data, meta = dataset.load_dataset(tiny_val_dataset)
    val = data["val"]
    n = len(val.ids)
    assert n < 16 and meta["tokens"]["val"] == n
    x, y, m = val.get_batch(3, 64, torch.Generator().manual_seed(0))
    check_windows(val, x.numpy(), y.numpy(), m.numpy())
    assert (y[:, n - 1:] == -1).all() and m[:, :n - 1].sum() > 0
    assert decode(val.first_prompt()) == "Human: Hi\nAssistant:"


def test_load_dataset_errors(tmp_path, tiny_dataset):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        dataset.load_dataset(str(tmp_path / "nothing"))
    broken = shutil.copytree(tiny_dataset, tmp_path / "broken")
    with open(broken / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(broken / "train.bin") - 2)
    with pytest.raises(ValueError, match="incomplete"):
        dataset.load_dataset(str(broken))


@pytest.fixture
def legacy_dataset(tmp_path):
    out = tmp_path / "data"
    build_dataset([records_file(tmp_path / "a.jsonl", 10, "a")], out_dir=str(out))
    make_legacy(str(out))
    return out


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "meta.json").write_text(""), "meta.json: not a prepared dataset"),
    (lambda d: (d / "meta.json").write_text('{"template": {}}'), "meta.json: not a prepared dataset"),
    (lambda d: (d / "train.bin").write_bytes(b"\x00" * 3), r"train.bin: unreadable .*multiple of 2"),
    (lambda d: (d / "val_turns.npy").write_bytes(b"garbage"), "val_turns.npy: unreadable"),
    (lambda d: (d / "val.bin").write_bytes(b""), r"val.bin: 0 tokens"),
])
def test_broken_prepared_files_are_named(legacy_dataset, damage, match):
    damage(legacy_dataset)
    with pytest.raises(InputError, match=match):
        dataset.load_dataset(str(legacy_dataset))


def test_dataset_given_as_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no prepared dataset at 'data/x'"):
        dataset.load_dataset("data/x")  # not data/data/x
    with pytest.raises(FileNotFoundError, match=r"no prepared dataset at 'data/chat'"):
        dataset.load_dataset("chat")


# ---------------------------------------------------------------------------------------------------------------
# Real data in ../shared/data


def _count_records(path):
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    with open(path, encoding="utf-8") as f:
        return len(json.load(f))


REAL_FILES = sorted(glob.glob(os.path.join(SHARED_DATA, "*", "*.json*")))


@pytest.mark.parametrize("path", REAL_FILES or [None], ids=lambda p: os.path.basename(os.path.dirname(p)) if p
                         else "absent")
def test_real_datasets(tmp_path, path):
    if path is None:
        pytest.skip(f"no real data at {SHARED_DATA}")
    out = str(tmp_path / "out")
    meta = build_dataset([path], out_dir=out)
    assert meta["skipped"] == {}
    assert sum(meta["conversations"].values()) == _count_records(path)
    assert meta["conversations"]["val"] > 0 and meta["conversations"]["train"] > 0
    assert 0.05 < meta["learned_token_share"] < 0.95
    for split in ("train", "val"):
        d = read_split(out, split)
        ends = np.append(d["convs"][1:], len(d["ids"])) - 1
        assert np.all(d["ids"][ends] == EOT) and np.all(d["mask"][ends] == 1)  # each conversation ends learned EOT
        assert np.all(d["mask"][d["convs"]] == 0)  # and starts with unlearned System:/Human:
        assert int((d["ids"] == EOT).sum()) == len(d["convs"])  # no other 50256 anywhere
        assert 0 < d["mask"].mean() < 1


def test_progress_lines_say_how_far_and_how_long(tmp_path, monkeypatch, capsys):
    """Large inputs (here: every update, as if each took PROGRESS_SECONDS) print bytes read of the total, the rate
    and the time left; a quick build prints none."""
    src = write_records(tmp_path / "d.jsonl", numbered(build.BATCH * 2 + 5))
    build_dataset([src], out_dir=str(tmp_path / "quick"))
    assert "  ... " not in capsys.readouterr().err
    monkeypatch.setattr(build, "PROGRESS_SECONDS", 0)
    build_dataset([src], out_dir=str(tmp_path / "out"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  ... ")]
    mb = os.path.getsize(src) / 1e6
    assert len(lines) == 4  # after each of the 3 batches, then the total
    assert all(f" / {mb:,.1f} MB (" in line and " MB/s, ETA " in line for line in lines[:-1])
    assert lines[1].split(";")[1].startswith(f" {2 * build.BATCH:,} conversations")
    assert lines[-1].startswith(f"  ... read {mb:,.1f} MB in ")


def test_threads_change_nothing_but_the_speed(tmp_path):
    """--threads (tiktoken's encoding threads): 1 and 8 give byte-identical datasets, for chat records and for a
    .txt longer than one batch of 1 MiB pieces; 0 is refused."""
    text = "".join(f"Line {i}: the quick brown fox, {i * 7 % 13} lazy dogs.\n" for i in range(60_000))  # ~2.9 MB
    (tmp_path / "big.txt").write_text(text)
    chats = write_records(tmp_path / "c.jsonl", chat_records(40))
    for name, inputs in (("text", [str(tmp_path / "big.txt")]), ("chat", [chats])):
        for threads in (1, 8):
            build_dataset(inputs, out_dir=str(tmp_path / f"{name}{threads}"), threads=threads)
        assert snapshot(tmp_path / f"{name}1") == snapshot(tmp_path / f"{name}8")
    assert read_split(tmp_path / "text1", "train")["ids"].tolist()[:5] == build.chat.get_encoder().encode_ordinary(
        text)[:5]
    with pytest.raises(ConfigError, match="--threads must be a whole number of at least 1, got 0"):
        build_dataset([chats], out_dir=str(tmp_path / "x"), threads=0)
