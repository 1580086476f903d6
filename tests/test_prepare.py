"""prepare.py: schemas, the rendered text and loss mask, the split, meta.json, bad input, streaming, real data."""
import glob
import hashlib
import json
import os

import numpy as np
import pytest

from chat_gpt2 import chat
import prepare
from chat_gpt2 import dataset
from chat_gpt2.dataset import build_dataset
from chat_gpt2.errors import InputError, RecordError
from chat_gpt2.records import iter_json_array
from helpers import (EOT, SHARED_DATA, all_texts, chat_records, conversations, decode, read_meta, read_split, runs,
                     snapshot, write_records)

GOOD = {"user": "a", "assistant": "b"}


def expected(messages):
    """(text, learned runs, other runs) of a conversation, written out from the template in the spec."""
    text, learned, other, cur = "", [], [], ""
    for role, content in messages:
        if role == "assistant":
            other.append(cur + "Assistant:")
            learned.append(f" {content}\n\n")
            cur = ""
        else:
            cur += f"{'System' if role == 'system' else 'Human'}: {content}\n"
    learned[-1] += "<|endoftext|>"
    for o, l in zip(other, learned):
        text += o + l
    return text, learned, other


def prepared(tmp_path, records, name="data.jsonl", **kw):
    src = write_records(tmp_path / name, records)
    out = str(tmp_path / "out")
    meta = build_dataset([src], out_dir=out, **kw)
    return out, meta


def rendered(out):
    """Sorted (text, learned runs, other runs) of every conversation in both splits."""
    result = []
    for split in ("train", "val"):
        for ids, mask in conversations(out, split):
            result.append((decode(ids), *runs(ids, mask)))
    return sorted(result)


# ---------------------------------------------------------------------------------------------------------------
# Schemas, template and mask

SCHEMAS = {
    "user_assistant": (
        [{"user": "Hi there", "assistant": "Hello!"}, {"user": "  padded \n", "assistant": "\tok  "},
         {"user": "2+2?", "assistant": "4", "id": 7}],
        [[("user", "Hi there"), ("assistant", "Hello!")], [("user", "padded"), ("assistant", "ok")],
         [("user", "2+2?"), ("assistant", "4")]]),
    "messages": (
        [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                       {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                       {"role": "assistant", "content": "A2"}]},
         {"messages": [{"role": "user", "content": "Solo"}, {"role": "assistant", "content": "Reply"}]}],
        [[("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")],
         [("user", "Solo"), ("assistant", "Reply")]]),
    "instruction": (
        [{"instruction": "Translate.", "input": "chat", "output": "cat"},
         {"instruction": "Say hi.", "input": "", "output": "hi"},
         {"instruction": "Count.", "output": "1 2 3"}],
        [[("user", "Translate.\nchat"), ("assistant", "cat")], [("user", "Say hi."), ("assistant", "hi")],
         [("user", "Count."), ("assistant", "1 2 3")]]),
    "sharegpt": (
        [{"conversations": [{"from": "system", "value": "Sys"}, {"from": "human", "value": "H1"},
                            {"from": "gpt", "value": "G1"}, {"from": "human", "value": "H2"},
                            {"from": "gpt", "value": "G2"}]},
         {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}],
        [[("system", "Sys"), ("user", "H1"), ("assistant", "G1"), ("user", "H2"), ("assistant", "G2")],
         [("user", "x"), ("assistant", "y")]]),
    "prompt_completion": (
        [{"prompt": "Once", "completion": "upon a time"}, {"prompt": "Twice", "completion": "more"}],
        [[("user", "Once"), ("assistant", "upon a time")], [("user", "Twice"), ("assistant", "more")]]),
    "question_answer": (
        [{"question": "Why?", "answer": "Because."}, {"question": "How?", "answer": "Like so."}],
        [[("user", "Why?"), ("assistant", "Because.")], [("user", "How?"), ("assistant", "Like so.")]]),
}


@pytest.mark.parametrize("ext", ["jsonl", "json"])
@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_every_schema_renders_text_and_mask(tmp_path, schema, ext):
    records, messages = SCHEMAS[schema]
    out, meta = prepared(tmp_path, records, f"data.{ext}", val_fraction=0.3)
    assert rendered(out) == sorted(expected(m) for m in messages)
    assert meta["conversations"]["train"] + meta["conversations"]["val"] == len(records)
    assert meta["skipped"] == {}


def test_exact_text_and_mask_with_system_and_two_turns():
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, mask, turns = chat.render_conversation(messages)
    assert decode(ids) == ("System: You are helpful.\nHuman: Hi!\nAssistant: Hello.\n\n"
                           "Human: 2+2?\nAssistant: 4\n\n<|endoftext|>")
    assert len(ids) == len(mask) and ids[-1] == EOT and ids.count(EOT) == 1
    learned, other = runs(ids, mask)
    assert learned == [" Hello.\n\n", " 4\n\n<|endoftext|>"]
    assert other == ["System: You are helpful.\nHuman: Hi!\nAssistant:", "Human: 2+2?\nAssistant:"]
    # the second turn starts at its "Human:" (the system message belongs to the first turn)
    assert turns[0] == 0 and len(turns) == 2 and decode(ids[turns[1]:]).startswith("Human: 2+2?")


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
                 and i not in convs and decode(d["ids"][i - 1:i]).endswith("\n\n")}
        assert sorted(human | convs) == d["turns"].tolist()
        assert len(human) == sum(1 for ids, _ in conversations(out, split) if "And double" in decode(ids))


# ---------------------------------------------------------------------------------------------------------------
# Split


def numbered(n):
    return [{"user": f"Question number {i}?", "assistant": f"Answer {i}."} for i in range(n)]


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


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming where and what, and an existing dataset left as it was


def _turns(*pairs, key="messages", role="role", content="content"):
    return {key: [{role: r, content: c} for r, c in pairs]}


# name: (file name, records or raw bytes, substrings the message must contain; "{p}" = the file's path)
BAD = {
    "invalid_json": ("d.jsonl", b'{"user": "a", "assistant": "b"}\n{"user": "a", "assistant": }\n',
                     ["{p}:2:", "invalid JSON"]),
    "invalid_json_array": ("d.json", b'[{"user": "a", "assistant": "b"},\n {"user": "a" "assistant": "b"}]',
                           ["{p}[1]", "line 2", "invalid JSON"]),
    "json_not_array": ("d.json", b'{"user": "a", "assistant": "b"}', ["{p}", "array"]),
    "record_not_object": ("d.jsonl", [GOOD, ["a", "b"]], ["{p}:2:", "JSON object", "list"]),
    "wrong_type": ("d.jsonl", [GOOD, {"user": 5, "assistant": "b"}], ["{p}:2:", "'user'", "string", "int"]),
    "wrong_type_array": ("d.json", [GOOD, {"user": "a", "assistant": ["b"]}],
                         ["{p}[1] (line 6)", "'assistant'", "string"]),
    "wrong_type_input": ("d.jsonl", [{"instruction": "a", "input": 3, "output": "b"}], ["{p}:1:", "'input'"]),
    "messages_not_list": ("d.jsonl", [{"messages": "hi"}], ["{p}:1:", "'messages'", "list"]),
    "empty_messages": ("d.jsonl", [{"messages": []}], ["{p}:1:", "'messages'", "non-empty"]),
    "turn_not_object": ("d.jsonl", [{"messages": ["hi"]}], ["{p}:1:", "'messages[0]'", "object"]),
    "content_not_string": ("d.jsonl", [_turns(("user", "a"), ("assistant", 1))], ["'messages[1].content'", "string"]),
    "empty_content": ("d.jsonl", [GOOD, GOOD, {"user": " \n ", "assistant": "b"}], ["{p}:3:", "'user'", "empty"]),
    "empty_turn_content": ("d.jsonl", [_turns(("user", "a"), ("assistant", ""))],
                           ["{p}:1:", "'messages[1].content'", "empty"]),
    "missing_field": ("d.jsonl", [{"user": "hi"}], ["{p}:1:", "'assistant'", "missing"]),
    "missing_value": ("d.json", [_turns(("human", "a"), ("gpt", None), key="conversations", role="from",
                                        content="value")], ["{p}[0]", "'conversations[1].value'"]),
    "roles_out_of_order": ("d.jsonl", [GOOD, _turns(("user", "a"), ("user", "b"), ("assistant", "c"))],
                           ["{p}:2:", "'messages[1].role'", "'assistant' was expected"]),
    "system_not_first": ("d.jsonl", [_turns(("user", "a"), ("system", "s"), ("assistant", "c"))],
                         ["{p}:1:", "'messages[1].role'"]),
    "ends_with_user": ("d.jsonl", [_turns(("user", "a"), ("assistant", "b"), ("user", "c"))],
                       ["{p}:1:", "'messages'", "end with an assistant"]),
    "unknown_role": ("d.jsonl", [_turns(("user", "a"), ("narrator", "b"))],
                     ["{p}:1:", "'messages[1].role'", "'narrator'"]),
    "unknown_sharegpt_role": ("d.json", [_turns(("human", "a"), ("robot", "b"), key="conversations", role="from",
                                                content="value")], ["{p}[0]", "'conversations[1].from'", "'robot'"]),
    "unknown_schema": ("d.jsonl", [GOOD, {"foo": "a", "bar": "b"}], ["{p}:2:", "keys seen: ['bar', 'foo']"]),
    "invalid_utf8": ("d.jsonl", b'{"user": "a", "assistant": "b"}\n{"user": "caf\xe9", "assistant": "b"}\n',
                     ["{p}:2:", "UTF-8"]),
    "invalid_utf8_array": ("d.json", b'[{"user": "a", "assistant": "b"}, {"user": "caf\xe9", "assistant": "b"}]',
                           ["{p}", "UTF-8"]),
    "unsupported_extension": ("d.csv", [GOOD, GOOD], ["{p}", "unsupported extension"]),
    "missing_file": (None, None, ["{p}", "not found"]),
}


def write_bad(tmp_path, name):
    filename, content, _ = BAD[name]
    path = str(tmp_path / (filename or "missing.jsonl"))
    if isinstance(content, bytes):
        with open(path, "wb") as f:
            f.write(content)
    elif content is not None:  # records (one per line for any extension but .json)
        write_records(path, content)
    return path


@pytest.fixture
def existing_dataset(tmp_path):
    """out_dir already holding a prepared dataset; returns (out_dir, snapshot of its files)."""
    src = write_records(tmp_path / "good.jsonl", numbered(5))
    out = str(tmp_path / "out")
    build_dataset([src], out_dir=out)
    return out, snapshot(out)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_error_and_existing_dataset_untouched(tmp_path, existing_dataset, name):
    out, before = existing_dataset
    path = write_bad(tmp_path, name)
    with pytest.raises(InputError) as e:
        build_dataset([path], out_dir=out)
    message = str(e.value)
    for part in BAD[name][2]:
        assert part.format(p=path) in message, message
    assert snapshot(out) == before
    assert sorted(os.listdir(out)) == sorted(before)  # no temp folder left either


def test_bad_val_file_is_named(tmp_path, existing_dataset):
    out, before = existing_dataset
    good = write_records(tmp_path / "train.jsonl", numbered(3))
    bad = write_records(tmp_path / "val.jsonl", [GOOD, {"user": "x"}])
    with pytest.raises(RecordError, match=f"{bad}:2: field 'assistant' is missing"):
        build_dataset([good], out_dir=out, val_file=bad)
    assert snapshot(out) == before


def test_interrupted_run_leaves_existing_dataset(tmp_path, existing_dataset, monkeypatch):
    out, before = existing_dataset
    src = write_records(tmp_path / "new.jsonl", numbered(8))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "split_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_dataset([src], out_dir=out)
    assert snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)


def test_cli_error_exit_code_and_message(tmp_path, existing_dataset, capsys):
    out, before = existing_dataset
    path = write_records(tmp_path / "d.jsonl", [GOOD, {"user": 1, "assistant": "b"}])
    assert prepare.main([path, f"--out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}:2: field 'user' must be a string" in err and "--skip_invalid" in err
    assert snapshot(out) == before


def test_skip_invalid_counts_by_reason(tmp_path):
    lines = {1: '{"user": "a", "assistant": }', 3: "not json", 5: '{"user": 1, "assistant": "b"}',
             6: '{"foo": "bar"}', 7: '{"messages": [{"role": "user", "content": "a"}, {"role": "user", '
                                     '"content": "b"}]}', 8: '{"user": "", "assistant": "b"}'}
    path = write_records(tmp_path / "d.jsonl", numbered(4), raw_lines=lines)
    with open(path, "ab") as f:
        f.write(b'{"user": "caf\xe9", "assistant": "b"}\n')
    meta = build_dataset([path], out_dir=str(tmp_path / "out"), skip_invalid=True)
    assert meta["skipped"] == {"invalid JSON": 2, "wrong type": 1, "unknown schema": 1, "roles out of order": 1,
                               "empty content": 1, "invalid UTF-8": 1}
    assert sum(meta["conversations"].values()) == 4
    assert sorted(all_texts(tmp_path / "out")) == sorted(expected(
        [("user", r["user"]), ("assistant", r["assistant"])])[0] for r in numbered(4))


def test_skip_invalid_does_not_hide_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        build_dataset([str(tmp_path / "nope.jsonl")], out_dir=str(tmp_path / "out"), skip_invalid=True)


# ---------------------------------------------------------------------------------------------------------------
# Streaming JSON arrays


ARRAY_RECORDS = [
    {"user": "caf\u00e9 \u2603 \U0001F600", "assistant": "brackets [ ] { } , \" inside strings\\"},
    {"messages": [{"role": "user", "content": "line\nbreak"}, {"role": "assistant", "content": "ok"}]},
    {"prompt": "\u00e9" * 7, "completion": "x", "extra": [1, [2, {"a": [3]}], None, True, 1.5e3]},
]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 4096])
@pytest.mark.parametrize("indent", [None, 2])
def test_iter_json_array_across_chunk_boundaries(tmp_path, chunk_size, indent):
    path = tmp_path / "a.json"
    text = json.dumps(ARRAY_RECORDS, indent=indent, ensure_ascii=False)
    path.write_bytes((" \r\n" + text + "\n\n").encode("utf-8"))
    hasher = hashlib.sha256()
    items = list(iter_json_array(str(path), hasher, chunk_size=chunk_size))
    assert [record for _, record in items] == ARRAY_RECORDS
    assert [where.split(" ")[0] for where, _ in items] == [f"{path}[{i}]" for i in range(3)]
    assert hasher.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    if indent:  # each record is reported at the line where it starts
        starts = [i + 1 for i, line in enumerate(path.read_text().split("\n")) if line == "  {"]
        assert [where for where, _ in items] == [f"{path}[{i}] (line {n})" for i, n in enumerate(starts)]


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_iter_json_array_error_and_empty(tmp_path, chunk_size):
    empty = tmp_path / "empty.json"
    empty.write_text("[\n]\n")
    assert list(iter_json_array(str(empty), hashlib.sha256(), chunk_size)) == []
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"user": "a", "assistant": "b"},\n{"user": "a", "assistant": "b"},\n{"user": oops}\n]\n')
    with pytest.raises(InputError, match=r"broken\.json\[2\] \(line 4\): invalid JSON"):
        list(iter_json_array(str(broken), hashlib.sha256(), chunk_size))


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
