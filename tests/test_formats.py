"""Record formats: a top-level system, OpenAssistant trees, content keys that are not understood, metadata keys,
preference data."""
import os

import pytest

import prepare
from chat_gpt2.build import build_dataset
from chat_gpt2.errors import RecordError
from chat_gpt2.records import to_conversations, to_messages
from helpers import SHARED_DATA, all_texts, write_records

W = "d.jsonl:1"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# ---------------------------------------------------------------------------------------------------------------
# A top-level system beside messages / conversations


@pytest.mark.parametrize("record", [
    {"system": "Be brief.", "messages": msgs(("user", "Hi"), ("assistant", "Hello"))},
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
])
def test_top_level_system_becomes_the_system_message(record):
    assert to_messages(record, W) == msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"))


def test_empty_top_level_system_is_none():
    record = {"system": " ", "messages": msgs(("user", "Hi"), ("assistant", "Hello"))}
    assert to_messages(record, W) == msgs(("user", "Hi"), ("assistant", "Hello"))


@pytest.mark.parametrize("record, message", [
    ({"system": "A", "messages": msgs(("system", "B"), ("user", "Hi"), ("assistant", "Hello"))},
     "d.jsonl:1: field 'system' and a system message in 'messages[0]'"),
    ({"system": 3, "messages": msgs(("user", "Hi"), ("assistant", "Hello"))},
     "d.jsonl:1: field 'system' must be a string"),
])
def test_bad_top_level_system(record, message):
    with pytest.raises(RecordError) as e:
        to_messages(record, W)
    assert str(e.value).startswith(message)


def test_top_level_system_rendered_by_prepare(tmp_path):
    records = [{"system": "Be brief.", "messages": msgs(("user", f"Q{i}"), ("assistant", f"A{i}"))} for i in range(3)]
    out = str(tmp_path / "out")
    build_dataset([write_records(tmp_path / "d.jsonl", records)], out)
    assert "System: Be brief.\nHuman: Q0\nAssistant: A0\n\n<|endoftext|>" in all_texts(out)


# ---------------------------------------------------------------------------------------------------------------
# OpenAssistant trees


def node(role, text, rank=None, replies=(), **extra):
    n = {"role": role, "text": text, "replies": list(replies), "message_id": f"id-{text}", "lang": "en", **extra}
    if rank is not None:
        n["rank"] = rank
    return n


TREE = {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": node("prompter", "Q", replies=[
    node("assistant", "A-second", rank=1),
    node("assistant", "A-deleted", rank=0, deleted=True, replies=[node("prompter", "never")]),
    node("assistant", "A-unranked"),
    node("assistant", "A-best", rank=0, replies=[
        node("prompter", "Q2", rank=1, replies=[node("assistant", "A3")]),
        node("prompter", "Q2-best", rank=0, replies=[node("assistant", "A2-unranked"), node("assistant", "A2-best",
                                                                                            rank=0)]),
        node("prompter", "Q2-unanswered", rank=2),
    ]),
])}


def texts(conversations):
    return [[m["content"] for m in c] for c in conversations]


def test_oasst_best_branch():
    (conv,) = to_conversations(TREE, W)
    assert conv == msgs(("user", "Q"), ("assistant", "A-best"), ("user", "Q2-best"), ("assistant", "A2-best"))


def test_oasst_all_paths_ending_on_a_reply():
    assert texts(to_conversations(TREE, W, oasst_paths="all")) == [
        ["Q", "A-best", "Q2-best", "A2-best"], ["Q", "A-best", "Q2-best", "A2-unranked"], ["Q", "A-best", "Q2", "A3"],
        ["Q", "A-second"], ["Q", "A-unranked"]]


def test_oasst_best_branch_ending_on_a_question_is_cut_back():
    tree = {"message_tree_id": "t", "prompt": node("prompter", "Q", replies=[
        node("assistant", "A", rank=0, replies=[node("prompter", "Q2")])])}
    assert texts(to_conversations(tree, W)) == [["Q", "A"]]
    with pytest.raises(RecordError, match="no assistant reply"):  # "all": the only leaf is a question
        to_conversations(tree, W, oasst_paths="all")


@pytest.mark.parametrize("tree, message", [
    ({"message_tree_id": "t", "prompt": node("prompter", "Q")}, "d.jsonl:1: the OpenAssistant tree has no assistant"),
    ({"message_tree_id": "t", "prompt": "Q"}, "d.jsonl:1: field 'prompt' must be an object"),
    ({"message_tree_id": "t", "prompt": node("assistant", "Q")}, "d.jsonl:1: field 'prompt.role' is 'assistant'"),
    ({"message_tree_id": "t", "prompt": node("prompter", "Q", replies=[node("prompter", "again")])},
     "d.jsonl:1: field 'prompt.replies[0].role' is 'prompter' where 'assistant'"),
    ({"message_tree_id": "t", "prompt": node("prompter", "Q", replies=[node("assistant", "A", rank="1")])},
     "d.jsonl:1: field 'prompt.replies[0].rank' must be a number"),
    ({"message_tree_id": "t", "prompt": node("prompter", "Q", replies=[node("assistant", "")])},
     "d.jsonl:1: field 'prompt.replies[0].text' is empty"),
    ({"message_tree_id": "t", "prompt": {**node("prompter", "Q"), "replies": {}}},
     "d.jsonl:1: field 'prompt.replies' must be a list"),
    ({"message_tree_id": "t", "prompt": node("prompter", "Q"), "system": "x"},
     "d.jsonl:1: field 'system' is not understood"),
])
def test_bad_oasst_tree(tree, message):
    with pytest.raises(RecordError) as e:
        to_conversations(tree, W, oasst_paths="all")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_oasst_deep_tree_does_not_overflow():
    chain = node("assistant", "last")  # m0 (prompter) -> m1 (assistant) -> ... -> last: 3,000 levels
    for i in range(2998, -1, -1):
        chain = node("prompter" if i % 2 == 0 else "assistant", f"m{i}", replies=[chain])
    (conv,) = to_conversations({"message_tree_id": "t", "prompt": chain}, W)
    assert len(conv) == 3000 and conv[-1]["content"] == "last"


def test_prompter_role_is_user_everywhere():
    record = {"messages": [{"role": "prompter", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert to_messages(record, W)[0]["role"] == "user"


def test_prepare_oasst_paths(tmp_path, capsys):
    src = write_records(tmp_path / "trees.jsonl", [TREE, TREE])
    for paths, n in (("best", 2), ("all", 10)):
        out = tmp_path / paths
        assert prepare.main([src, f"--out_dir={out}", f"--oasst_paths={paths}"]) == 0
        assert len(all_texts(out)) == n
    assert "Human: Q\nAssistant: A-best\n\nHuman: Q2-best\nAssistant: A2-best\n\n<|endoftext|>" in all_texts(
        tmp_path / "best")


# ---------------------------------------------------------------------------------------------------------------
# Content keys not understood; metadata keys ignored


@pytest.mark.parametrize("record, key", [
    ({"prompt": "p", "completion": "c", "system": "s"}, "system"),
    ({"user": "u", "assistant": "a", "context": "c"}, "context"),
    ({"question": "q", "answer": "a", "input": "i"}, "input"),
    ({"instruction": "i", "output": "o", "response": "r"}, "response"),
    ({"messages": msgs(("user", "u"), ("assistant", "a")), "conversations": []}, "conversations"),
    ({"messages": msgs(("user", "u"), ("assistant", "a")), "chosen": "x"}, "chosen"),
    ({"user": "u", "assistant": "a", "chosen": "x"}, "chosen"),
    ({"text": "t", "system": "s"}, "system"),
])
def test_content_key_not_understood_is_named(record, key):
    with pytest.raises(RecordError) as e:
        to_conversations(record, W)
    assert str(e.value).startswith(f"d.jsonl:1: field '{key}' is not understood") and e.value.reason == "unknown field"


def test_metadata_keys_are_ignored(tmp_path):
    meta = {"id": 1, "source": "web", "category": "qa", "lang": "en", "metadata": {"x": 1}, "split": "train"}
    assert to_messages({"prompt": "p", "completion": "c", **meta}, W) == msgs(("user", "p"), ("assistant", "c"))
    out = str(tmp_path / "out")
    build_dataset([write_records(tmp_path / "t.jsonl", [{"text": "doc one", **meta}, {"text": "doc two", **meta}])],
                  out)
    assert sorted(all_texts(out)) == ["doc one<|endoftext|>", "doc two<|endoftext|>"]


def test_unknown_field_is_skippable(tmp_path):
    records = [{"prompt": "p", "completion": "c"}] * 3 + [{"prompt": "p", "completion": "c", "system": "s"}]
    meta = build_dataset([write_records(tmp_path / "d.jsonl", records)], str(tmp_path / "out"), skip_invalid=True)
    assert meta["skipped"] == {"unknown field": 1}


# ---------------------------------------------------------------------------------------------------------------
# Preference data: trained on instruction/output (prompt/completion), one warning


def test_preference_data_warns_once(tmp_path, capsys):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}", "chosen": f"{i}!", "rejected": "no"}
               for i in range(5)] + [{"prompt": "p", "completion": "c", "chosen": "c", "rejected": "r"}]
    out = str(tmp_path / "out")
    build_dataset([write_records(tmp_path / "d.jsonl", records)], out)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "d.jsonl:1: preference data: 'chosen' / 'rejected' are ignored" in err
    assert "Human: Say 3.\nAssistant: 3\n\n<|endoftext|>" in all_texts(out)


def test_real_preference_file(tmp_path, capsys):
    path = os.path.join(SHARED_DATA, "dpo-preference-rasbt", "instruction-data-with-preference.json")
    if not os.path.isfile(path):
        pytest.skip("shared preference data not present")
    meta = build_dataset([path], str(tmp_path / "out"))
    assert capsys.readouterr().err.count("warning:") == 1 and meta["skipped"] == {}


# ---------------------------------------------------------------------------------------------------------------
# Repeats (--dedupe) and the block_size advice


def test_repeats_are_counted_and_dedupe_drops_them(tmp_path, capsys):
    records = [{"user": f"Q{i}", "assistant": f"A{i}"} for i in range(10)] + [{"user": "Q0", "assistant": "A0"}] * 9
    src = write_records(tmp_path / "d.jsonl", records)
    kept = build_dataset([src], str(tmp_path / "kept"), val_fraction=0.5)
    assert kept["duplicates"]["repeats"] == 9 and kept["duplicates"]["removed"] == 0
    assert sum(kept["conversations"].values()) == 19 and kept["duplicates"]["val_in_train"] >= 1
    assert prepare.main([src, f"--out_dir={tmp_path / 'dedupe'}", "--dedupe", "--val_fraction=0.5"]) == 0
    out = capsys.readouterr().out
    assert "duplicates: 9 exact repeat(s) of an earlier conversation removed (--dedupe); 0 val" in out
    assert sorted(all_texts(tmp_path / "dedupe")) == sorted(set(all_texts(tmp_path / "kept")))


def test_dedupe_spans_the_val_file(tmp_path):
    train = write_records(tmp_path / "t.jsonl", [{"user": f"Q{i}", "assistant": "A"} for i in range(5)])
    val = write_records(tmp_path / "v.jsonl", [{"user": "Q1", "assistant": "A"}, {"user": "new", "assistant": "A"}])
    assert build_dataset([train], str(tmp_path / "a"), val_file=val)["duplicates"]["val_in_train"] == 1
    meta = build_dataset([train], str(tmp_path / "b"), val_file=val, dedupe=True)
    assert meta["duplicates"] == {"repeats": 1, "removed": 1, "val_in_train": 0}
    assert meta["conversations"]["val"] == 1


def test_summary_advises_a_block_size(tmp_path, capsys):
    long = " ".join(["word"] * 150)
    records = [{"user": f"{long} {i}", "assistant": "ok"} for i in range(10)]
    assert prepare.main([write_records(tmp_path / "d.jsonl", records), f"--out_dir={tmp_path / 'o'}"]) == 0
    out = capsys.readouterr().out
    assert "note: 10 of 10 conversations are longer than block_size 128" in out
    assert "train with --block_size=256 (90% fit)" in out


# ---------------------------------------------------------------------------------------------------------------
# --test_fraction: held-out conversations for eval.py --data


def test_test_fraction_holds_out_conversations(tmp_path, capsys):
    import json

    from chat_gpt2.records import read_conversations
    records = [{"user": f"What is {i}?", "assistant": f"{i}"} for i in range(200)]
    src = write_records(tmp_path / "d.jsonl", records)
    out = tmp_path / "out"
    assert prepare.main([src, f"--out_dir={out}", "--test_fraction=0.2"]) == 0
    assert f"to {out}/test.jsonl" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    test = [m for _, m in read_conversations(str(out / "test.jsonl"))]
    assert meta["test"]["conversations"] == len(test) and 20 <= len(test) <= 60
    assert sum(meta["conversations"].values()) + len(test) == 200
    texts = set(all_texts(out))
    assert not any(f"Human: {m[0]['content']}\nAssistant: {m[1]['content']}\n\n<|endoftext|>" in texts for m in test)
    again = tmp_path / "again"  # deterministic from the seed
    build_dataset([src], str(again), test_fraction=0.2)
    assert (again / "test.jsonl").read_text() == (out / "test.jsonl").read_text()
    build_dataset([src], str(out))  # a build without held-out conversations: no test.jsonl left behind
    assert not os.path.lexists(out / "test.jsonl")


def test_test_fraction_is_for_chat(tmp_path):
    from chat_gpt2.errors import ConfigError
    src = tmp_path / "c.txt"
    src.write_text("Some text.\n" * 50)
    with pytest.raises(ConfigError, match="not for plain text"):
        build_dataset([str(src)], str(tmp_path / "o"), test_fraction=0.1)
    with pytest.raises(ConfigError, match="--test_fraction must be"):
        build_dataset([str(src)], str(tmp_path / "o"), test_fraction=1.0)
