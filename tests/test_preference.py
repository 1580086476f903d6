"""Preference pairs (preference.py, prepare.py --task=preference): the four layouts, every bad-record path, the
cut of a pair too long for the block, the published dataset and its batches."""
import json
import os

import numpy as np
import pytest

import prepare
from chat_gpt2 import chat
from chat_gpt2.classify_data import load_prepared
from chat_gpt2.errors import InputError, RecordError
from chat_gpt2.preference import build_preference_dataset, fit_pair, to_pair
from helpers import SHARED_DATA, state, write_records

PROMPT = [{"role": "user", "content": "What is 2 plus 3?"}]
CHOSEN, REJECTED = "It is 5.", "Go away."
HH_PROMPT = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 plus 3?\n\nAssistant:"
LAYOUTS = {
    "trl_standard": {"prompt": "What is 2 plus 3?", "chosen": CHOSEN, "rejected": REJECTED},
    "trl_conversational": {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": CHOSEN}],
                           "rejected": [{"role": "assistant", "content": REJECTED}]},
    "alpaca": {"instruction": "What is 2 plus 3?", "input": "", "output": "5", "chosen": CHOSEN,
               "rejected": REJECTED},
    "hh_rlhf": {"chosen": f"{HH_PROMPT} {CHOSEN}", "rejected": f"{HH_PROMPT} {REJECTED}"},
}
HH_MESSAGES = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
               *PROMPT]


def rendered(prompt, reply, template=chat.TEMPLATE):
    """The definition: the conversation prompt + reply rendered as chat data (render_conversation)."""
    ids, mask, _ = chat.render_conversation(prompt + [{"role": "assistant", "content": reply}], template)
    return ids, mask


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_prepares_as_chat_data_renders(layout, tmp_path):
    path = write_records(tmp_path / "pairs.jsonl", [LAYOUTS[layout]] * 4)
    out = str(tmp_path / "out")
    meta = build_preference_dataset([path], out, val_fraction=0.25)
    assert meta["kind"] == "preference" and meta["pairs"] == {"train": 3, "val": 1}
    data, meta = load_prepared(out)
    prompt_messages = HH_MESSAGES if layout == "hh_rlhf" else PROMPT
    prompt, chosen, rejected = data["train"].pair(0)
    for reply, response in ((CHOSEN, chosen), (REJECTED, rejected)):
        ids, mask = rendered(prompt_messages, reply)
        assert prompt.tolist() + response.tolist() == ids  # prompt + response = the chat rendering
        # the response is the last learned run (the pair masks the whole prompt, earlier replies too)
        assert mask[len(prompt) - 1:] == [0] + [1] * len(response)
    assert chat.get_encoder().decode(chosen.tolist()) == f" {CHOSEN}\n\n<|endoftext|>"  # up to its turn end


def test_the_shared_alpaca_set_prepares_with_its_template(tmp_path, capsys):
    source = os.path.join(SHARED_DATA, "dpo-preference-rasbt", "instruction-data-with-preference.json")
    if not os.path.exists(source):
        pytest.skip("the shared preference set (../shared/data/dpo-preference-rasbt) is absent")
    out = str(tmp_path / "out")
    assert prepare.main([source, "--task=preference", "--template=alpaca", "--skip_invalid",
                         f"--out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["skipped"] == {"identical responses": 6}  # six records prefer a reply to itself
    assert sum(meta["pairs"].values()) == 1094 and f"pairs: 1,094 ({meta['pairs']['train']:,} train" in printed
    prompt = load_prepared(out)[0]["val"].pair(0)[0]
    assert chat.get_encoder().decode(prompt.tolist()).endswith("\n\n### Response:\n")


BAD = [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "field 'rejected' is the same as 'chosen'",
     "identical responses"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"},
     "field 'rejected': the two transcripts share no prompt", "no shared prompt"),
    ({"prompt": "q", "chosen": "  ", "rejected": "r"}, "field 'chosen' is empty", "empty content"),
    ({"instruction": "q", "chosen": "c"}, "field 'rejected' is missing", "missing field"),
    ({"prompt": PROMPT, "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
     "field 'chosen' must be a string or a list of one assistant message", "wrong type"),
    ({"prompt": PROMPT + [{"role": "assistant", "content": "a"}], "chosen": "c", "rejected": "r"},
     "field 'prompt' must end with a user message", "roles out of order"),
    ({"chosen": "just text", "rejected": "other text"}, "field 'chosen' is not a transcript", "not a transcript"),
    ({"user": "a", "assistant": "b"}, "not a preference pair", "unknown schema"),
]


@pytest.mark.parametrize("record, message, reason", BAD, ids=[b[2] for b in BAD])
def test_bad_records_are_file_line_errors_or_skipped(record, message, reason, tmp_path, capsys):
    good = LAYOUTS["trl_standard"]
    path = write_records(tmp_path / "pairs.jsonl", [good, good, record, good])
    out = str(tmp_path / "out")
    assert prepare.main([path, "--task=preference", f"--out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}:3: {message}" in err and "--skip_invalid" in err
    assert not os.path.exists(os.path.join(out, "meta.json"))  # nothing written
    meta = build_preference_dataset([path], out, skip_invalid=True, val_fraction=0.3)
    assert meta["skipped"] == {reason: 1} and sum(meta["pairs"].values()) == 3


def test_to_pair_reads_a_multi_turn_transcript_prompt():
    prompt, chosen, rejected = to_pair(LAYOUTS["hh_rlhf"], "f:1")
    assert prompt == HH_MESSAGES and (chosen, rejected) == (CHOSEN, REJECTED)
    with pytest.raises(RecordError, match="f:1: field 'rejected' is the same"):
        to_pair({"chosen": f"{HH_PROMPT} a", "rejected": f"{HH_PROMPT} a"}, "f:1")


def test_a_pair_too_long_keeps_the_end_of_its_prompt_and_counts_a_cut_response():
    prompt, response = np.arange(10), np.arange(100, 104)
    p, r, cut = fit_pair(prompt, response, block_size=8)  # 9 ids fit (the last is a target only)
    assert p.tolist() == list(range(5, 10)) and r.tolist() == response.tolist() and not cut
    p, r, cut = fit_pair(prompt, np.arange(100, 120), block_size=8)  # the response alone is too long
    assert p.tolist() == [9] and r.tolist() == list(range(100, 108)) and cut


def test_batches_hold_chosen_then_rejected_rows_masked_on_the_responses(tmp_path):
    records = [{"prompt": f"Question {i} " * (1 + i % 5), "chosen": f"Yes {i}.", "rejected": "No."} for i in range(12)]
    out = str(tmp_path / "out")
    meta = build_preference_dataset([write_records(tmp_path / "p.jsonl", records)], out, val_fraction=0.25)
    data = load_prepared(out)[0]
    assert meta["responses_cut"]["128"] == 0 and meta["tokens"]["train"] > 0
    x, y, m, index = data["val"].batch([0, 2], block_size=16)
    assert x.shape == y.shape == m.shape == (4, x.size(1)) and x.size(1) <= 16
    assert index.tolist() == [meta["pairs"]["train"], meta["pairs"]["train"] + 2]  # numbered after train's
    for row, (i, side) in enumerate([(0, 1), (2, 1), (0, 2), (2, 2)]):
        prompt, *responses = data["val"].pair(i)
        p, r, _ = fit_pair(prompt, responses[side - 1], 16)
        n = len(p) + len(r) - 1
        assert y[row, :n].tolist() == np.concatenate([p, r])[1:].tolist() and (y[row, n:] == -1).all()
        assert m[row].tolist() == [0.0] * (len(p) - 1) + [1.0] * len(r) + [0.0] * (x.size(1) - n)


def test_published_all_or_nothing(tmp_path):
    out = str(tmp_path / "out")
    good = write_records(tmp_path / "good.jsonl", [LAYOUTS["alpaca"]] * 5)
    build_preference_dataset([good], out)
    before = state(out)
    bad = write_records(tmp_path / "bad.jsonl", [LAYOUTS["alpaca"], {"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(RecordError):
        build_preference_dataset([bad], out)
    assert state(out) == before
    with pytest.raises(InputError, match="at least 2"):
        build_preference_dataset([write_records(tmp_path / "one.jsonl", [LAYOUTS["alpaca"]])], out)
    assert state(out) == before


def test_a_preference_build_replaces_a_chat_one_and_the_other_way(tmp_path):
    from chat_gpt2.build import build_dataset
    from chat_gpt2.dataset import load_dataset
    from helpers import chat_records
    out = str(tmp_path / "out")
    chats = write_records(tmp_path / "c.jsonl", chat_records(10))
    build_dataset([chats], out)
    build_preference_dataset([write_records(tmp_path / "p.jsonl", [LAYOUTS["alpaca"]] * 4)], out)
    assert not os.path.lexists(os.path.join(out, "train_mask.bin")) and len(load_prepared(out)[0]["train"]) == 3
    with pytest.raises(InputError, match="a preference dataset"):
        load_dataset(out)
    build_dataset([chats], out)
    assert not os.path.lexists(os.path.join(out, "train_pairs.npy")) and load_prepared(out)[1]["kind"] == "chat"
