"""chat_gpt2/records.py: the six record schemas, bad input (a clear error naming where and what, and an existing
dataset left as it was), hostile records, --skip_invalid, and the streaming JSON-array reader. Fuzzed in
test_records_fuzz.py."""
import hashlib
import json

import pytest

from chat_gpt2 import records
from chat_gpt2.build import build_dataset
from chat_gpt2.errors import InputError, RecordError
from chat_gpt2.records import iter_json_array, iter_records
from helpers import GOOD, all_texts, expected, numbered, prepared, rendered, state, write_records

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


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming where and what, and an existing dataset left as it was


def _turns(*pairs, key="messages", role="role", content="content"):
    return {key: [{role: r, content: c} for r, c in pairs]}


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


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_error_and_existing_dataset_untouched(tmp_path, existing_dataset, name):
    out, before = existing_dataset
    path = write_bad(tmp_path, name)
    with pytest.raises(InputError) as e:
        build_dataset([path], out_dir=out)
    message = str(e.value)
    for part in BAD[name][2]:
        assert part.format(p=path) in message, message
    assert state(out) == before  # the same names (no temporary folder left) and the same files


def test_bad_val_file_is_named(tmp_path, existing_dataset):
    out, before = existing_dataset
    good = write_records(tmp_path / "train.jsonl", numbered(3))
    bad = write_records(tmp_path / "val.jsonl", [GOOD, {"user": "x"}])
    with pytest.raises(RecordError, match=f"{bad}:2: field 'assistant' is missing"):
        build_dataset([good], out_dir=out, val_file=bad)
    assert state(out) == before


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
# Hostile records: a clean error naming file:line, or a counted skip, never a traceback


def read_all(path):
    return list(records.read_conversations(str(path)))


def test_deep_nesting_and_huge_integers_are_record_errors(tmp_path):
    good = json.dumps({"user": "Hi", "assistant": "Hello"})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, "[" * 100_000 + "]" * 100_000, '{"user": "x", "assistant": "y", "id": 1'
                               + "0" * 5000 + "}", good]) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: unreadable JSON: nested too deeply"):
        read_all(path)
    out = tmp_path / "out"
    meta = build_dataset([str(path)], out_dir=str(out), skip_invalid=True)
    assert meta["skipped"] == {"invalid JSON": 2} and sum(meta["conversations"].values()) == 2
    array = tmp_path / "bad.json"
    array.write_text(f"[{good},\n" + '{"user": "x", "assistant": "y", "n": ' + "9" * 5000 + "},\n" + "[" * 100_000
                     + "]" * 100_000 + f",\n{good}, {good}]")
    with pytest.raises(RecordError, match=r"bad.json\[1\] \(line 2\): unreadable JSON: Exceeds the limit"):
        read_all(array)
    meta = build_dataset([str(array)], out_dir=str(tmp_path / "out2"), skip_invalid=True)  # skipped, as in .jsonl
    assert meta["skipped"] == {"invalid JSON": 2} and sum(meta["conversations"].values()) == 3


def test_oversized_record_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"user": "x" * 5000, "assistant": "y"}) + "\n"
                    + json.dumps({"user": "Hi", "assistant": "Hello"}) + "\n")
    items = list(records.iter_records(str(path), __import__("hashlib").sha256()))
    assert isinstance(items[0][1], RecordError) and "larger than" in str(items[0][1])
    assert items[1] == (f"{path}:2", {"user": "Hi", "assistant": "Hello"})  # the next line is read normally


def test_a_directory_given_as_input(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        read_all(tmp_path)


def test_invalid_utf8_in_a_json_array_is_that_records_error_and_skippable(tmp_path):
    from chat_gpt2.build import build_dataset
    path = tmp_path / "mixed.json"
    good = [b'{"user": "q%d", "assistant": "a%d"}' % (i, i) for i in range(6)]
    path.write_bytes(b"[" + b",\n".join(good[:3] + [b'{"user": "bad \xff byte", "assistant": "x"}'] + good[3:]) + b"]")
    items = list(iter_records(str(path), hashlib.sha256()))
    assert [w for w, r in items if isinstance(r, RecordError)] == [f"{path}[3] (line 4)"]
    with pytest.raises(RecordError, match=r"mixed.json\[3\] \(line 4\): invalid UTF-8"):
        build_dataset([str(path)], out_dir=str(tmp_path / "out"))
    meta = build_dataset([str(path)], out_dir=str(tmp_path / "out"), skip_invalid=True)
    assert meta["skipped"] == {"invalid UTF-8": 1} and sum(meta["conversations"].values()) == 6
