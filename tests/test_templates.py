"""prepare.py --template: the built-in templates written out by hand, JSON template files, and every consumer
(meta.json, checkpoints, sample.py, eval.py, the export's chat_template) following the chosen one."""
import json
import os

import pytest

import prepare
from chat_gpt2 import chat
from chat_gpt2.build import build_dataset
from chat_gpt2.errors import ConfigError
from helpers import EOT, SHARED_DATA, conversations, decode, read_meta, runs, write_records

SYSTEM_TWO_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": " 2+2? "},
                    {"role": "assistant", "content": "4\n"}]
ONE_TURN = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]

PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.")

# (text, learned runs, other runs) of SYSTEM_TWO_TURNS and ONE_TURN, then the generation prompt for ONE_TURN[:1]
EXPECTED = {
    "human_assistant": (
        ("System: Be brief.\nHuman: Hi!\nAssistant: Hello.\n\nHuman: 2+2?\nAssistant: 4\n\n<|endoftext|>",
         [" Hello.\n\n", " 4\n\n<|endoftext|>"],
         ["System: Be brief.\nHuman: Hi!\nAssistant:", "Human: 2+2?\nAssistant:"]),
        ("Human: Name a colour.\nAssistant: Blue.\n\n<|endoftext|>",
         [" Blue.\n\n<|endoftext|>"], ["Human: Name a colour.\nAssistant:"]),
        "Human: Name a colour.\nAssistant:"),
    "alpaca": (
        ("Be brief.\n\n### Instruction:\nHi!\n\n### Response:\nHello.\n\n### Instruction:\n2+2?\n\n### Response:\n4"
         "<|endoftext|>",
         ["Hello.", "4<|endoftext|>"],
         ["Be brief.\n\n### Instruction:\nHi!\n\n### Response:\n", "\n\n### Instruction:\n2+2?\n\n### Response:\n"]),
        (PREAMBLE + "\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.<|endoftext|>",
         ["Blue.<|endoftext|>"], [PREAMBLE + "\n\n### Instruction:\nName a colour.\n\n### Response:\n"]),
        PREAMBLE + "\n\n### Instruction:\nName a colour.\n\n### Response:\n"),
    "chatml": (
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
         "Hello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|endoftext|>",
         ["Hello.<|im_end|>\n", "4<|im_end|>\n<|endoftext|>"],
         ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
          "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"]),
        ("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n<|endoftext|>",
         ["Blue.<|im_end|>\n<|endoftext|>"], ["<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"]),
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"),
}
STOPS = {"human_assistant": ("\n", "\nHuman:"), "alpaca": ("\n", "\n\n### Instruction:"),
         "chatml": ("<|im_end|>", "<|im_end|>")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_template_renders_as_written(name):
    template = chat.load_template(name)
    for messages, (text, learned, other) in zip((SYSTEM_TWO_TURNS, ONE_TURN), EXPECTED[name][:2]):
        ids, mask, turns = chat.render_conversation(messages, template)
        assert decode(ids) == text
        assert runs(ids, mask) == (learned, other)
        assert ids[-1] == EOT and ids.count(EOT) == 1 and mask[-1] == 1
        assert turns[0] == 0 and len(turns) == sum(m["role"] == "user" for m in messages)
    assert decode(chat.render_prompt(ONE_TURN[:1], template)) == EXPECTED[name][2]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_prepare_with_template(tmp_path, name):
    records = [{"messages": ONE_TURN}] * 3 + [{"messages": SYSTEM_TWO_TURNS[:3]}]
    out = str(tmp_path / "out")
    assert prepare.main([write_records(tmp_path / "d.jsonl", records), f"--out_dir={out}", f"--template={name}",
                         "--val_fraction=0.25"]) == 0
    meta = read_meta(out)
    assert meta["template"] == chat.BUILTIN_TEMPLATES[name] and meta["default_stop"] == STOPS[name][0]
    texts = [decode(ids) for s in ("train", "val") for ids, _ in conversations(out, s)]
    assert texts.count(EXPECTED[name][1][0]) == 3
    multi = write_records(tmp_path / "m.jsonl", [{"user": "a", "assistant": "line 1\nline 2"}] * 2)
    assert build_dataset([multi], str(tmp_path / "m"), template=name)["default_stop"] == STOPS[name][1]


@pytest.mark.parametrize("name, user", [
    ("human_assistant", "Human: Fix the spelling.\nfreind\nAssistant:"),
    ("alpaca", PREAMBLE + "\n\n### Instruction:\nFix the spelling.\n\n### Input:\nfreind\n\n### Response:\n"),
    ("chatml", "<|im_start|>user\nFix the spelling.\n\nfreind<|im_end|>\n<|im_start|>assistant\n"),
])
def test_instruction_input_joins_the_user_message(tmp_path, name, user):
    records = [{"instruction": "Fix the spelling. ", "input": " freind", "output": "friend"}] * 2
    out = str(tmp_path / "out")
    build_dataset([write_records(tmp_path / "d.json", records)], out, template=name)
    ids, mask = conversations(out, "train")[0]
    assert runs(ids, mask)[1] == [user]


def test_alpaca_on_the_real_alpaca_data(tmp_path):
    path = os.path.join(SHARED_DATA, "alpaca-rasbt-instruction", "instruction-data.json")
    if not os.path.isfile(path):
        pytest.skip("shared alpaca data not present")
    with open(path, encoding="utf-8") as f:
        first = json.load(f)[0]
    out = str(tmp_path / "out")
    build_dataset([path], out, template="alpaca", val_fraction=0.01)
    want = (f"{PREAMBLE}\n\n### Instruction:\n{first['instruction']}\n\n### Input:\n{first['input']}\n\n"
            f"### Response:\n{first['output']}<|endoftext|>")
    assert want in {decode(ids) for s in ("train", "val") for ids, _ in conversations(out, s)}


# ---------------------------------------------------------------------------------------------------------------
# JSON template files

CUSTOM = {"system": "<sys>{content}</sys>\n", "user": "<user>{content}</user>\n", "assistant_label": "<bot>",
          "assistant": "{content}", "turn_end": "</bot>\n", "eot": "<|endoftext|>", "default_system": "{x}",
          "input": "\n--\n{content}", "stop": "</bot>", "stop_multiline": "</bot>"}


def write_template(tmp_path, template, raw=None):
    path = tmp_path / "template.json"
    path.write_text(raw if raw is not None else json.dumps(template, indent=2), encoding="utf-8")
    return str(path)


def test_json_template_file(tmp_path):
    template = chat.load_template(write_template(tmp_path, CUSTOM))
    ids, mask, _ = chat.render_conversation(ONE_TURN, template)
    assert decode(ids) == "<sys>{x}</sys>\n<user>Name a colour.</user>\n<bot>Blue.</bot>\n<|endoftext|>"
    assert runs(ids, mask)[0] == ["Blue.</bot>\n<|endoftext|>"]


@pytest.mark.parametrize("change, message", [
    ({"turn_end": None}, r"template\.json: field 'turn_end' is missing"),
    ({"colour": "red"}, r"template\.json:12: unknown field 'colour'"),
    ({"user": 3}, r"template\.json:3: field 'user' must be a string, got int"),
    ({"user": "<user></user>"}, r"field 'user' must hold \{content\} exactly once"),
    ({"assistant": "{content}{content}"}, r"field 'assistant' must hold \{content\} exactly once"),
    ({"turn_end": "{content}"}, r"field 'turn_end' must hold \{content\} nowhere"),
    ({"eot": "</s>"}, r"field 'eot' must be \"<\|endoftext\|>\""),
    ({"stop": ""}, r"field 'stop' is empty"),
])
def test_bad_template_file(tmp_path, change, message):
    template = {k: v for k, v in {**CUSTOM, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        chat.load_template(write_template(tmp_path, template))


@pytest.mark.parametrize("raw, message", [("[1, 2]", "must be a JSON object"), ("{", "unreadable template")])
def test_unreadable_template_file(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=message):
        chat.load_template(write_template(tmp_path, None, raw))


def test_unknown_template_name_on_the_command_line(tmp_path, capsys):
    src = write_records(tmp_path / "d.jsonl", [{"user": "a", "assistant": "b"}] * 3)
    assert prepare.main([src, f"--out_dir={tmp_path / 'out'}", "--template=vicuna"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --template=vicuna: not a built-in template") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "out" / "meta.json")


# ---------------------------------------------------------------------------------------------------------------
# The consumers follow the template: checkpoint, sample.py, eval.py, the export


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory):
    from helpers import tiny_train_args, train_inprocess
    root = tmp_path_factory.mktemp("alpaca")
    records = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(20)]
    build_dataset([write_records(root / "d.jsonl", records)], str(root / "data"), template="alpaca")
    train_inprocess(tiny_train_args(str(root / "data"), str(root / "out"), max_iters=2, eval_interval=2))
    return str(root / "out")


def test_checkpoint_sample_and_eval_follow_the_template(tmp_path, alpaca_run, monkeypatch):
    import eval as eval_script
    import sample
    from chat_gpt2.checkpoint import find_checkpoint, load_checkpoint
    from helpers import fake_complete
    ckpt = load_checkpoint(find_checkpoint(alpaca_run))
    assert ckpt["template"] == chat.ALPACA and ckpt["default_stop"] == "\n"
    calls = []

    def fake(engine, request):
        calls.append((decode(request.prompt), request.params.stop))
        return "reply"
    fake_complete(monkeypatch, fake)
    sample.main([f"--out_dir={alpaca_run}", "--prompt=Add 2 and 2.", "--device=cpu"])
    assert calls == [(PREAMBLE + "\n\n### Instruction:\nAdd 2 and 2.\n\n### Response:\n", ("\n",))]
    heldout = write_records(tmp_path / "h.jsonl", [{"instruction": "Add 1 and 1.", "input": "x", "output": "2"}])
    eval_script.main([f"--out_dir={alpaca_run}", f"--data={heldout}", "--device=cpu"])
    assert calls[-1] == (PREAMBLE + "\n\n### Instruction:\nAdd 1 and 1.\n\n### Input:\nx\n\n### Response:\n",
                         ("\n",))


@pytest.mark.parametrize("name", sorted(EXPECTED) + ["custom"])
def test_export_chat_template_matches_ours(tmp_path, name, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import export
    from helpers import tiny_model
    from helpers import offline
    offline(monkeypatch)
    template = CUSTOM if name == "custom" else chat.load_template(name)
    out = str(tmp_path / "hf")
    export.export(tiny_model(seed=1), out, template)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for messages in (SYSTEM_TWO_TURNS, ONE_TURN):
        assert tok.apply_chat_template(messages, tokenize=False) == \
            decode(chat.render_conversation(messages, template)[0])
        for end in range(1, len(messages), 2):  # every prompt up to a user message
            prompt = messages[:end + (messages[0]["role"] == "system")]
            assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
                decode(chat.render_prompt(prompt, template))
    if name != "custom":
        assert_same_ids_as_transformers(tok, template)


# every prompt of a three-turn conversation, with and without a system message, in both tokenisations
THREE_TURNS = SYSTEM_TWO_TURNS + [{"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]


def assert_same_ids_as_transformers(tok, template):
    """apply_chat_template's text tokenised by the export's tokenizer (and apply_chat_template(tokenize=True)) gives
    exactly our prompt ids, multi-turn included; they are the training ids up to where the reply starts."""
    for messages in (THREE_TURNS, THREE_TURNS[1:]):
        ids, mask, _ = chat.render_conversation(messages, template)
        replies = [i for i in range(1, len(ids)) if mask[i] and not mask[i - 1]]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        assert len(replies) == len(users) == 3
        for end, reply in zip(users, replies):
            prompt = messages[:end + 1]
            ours = chat.render_prompt(prompt, template)
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            assert tok(text, add_special_tokens=False)["input_ids"] == ours, (prompt, text)
            direct = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
            assert list(direct["input_ids"] if hasattr(direct, "keys") else direct) == ours
            assert ids[:reply] == ours
        assert tok(tok.apply_chat_template(messages, tokenize=False))["input_ids"] == ids


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_multi_turn_ids_are_those_of_the_whole_text(name):
    """The ids are BPE's for the whole rendered text (a turn's end and the next "Human:" are not cut apart) and the
    mask is 1 exactly on the replies, their turn ends and the final <|endoftext|>."""
    template = chat.load_template(name)
    enc = chat.get_encoder()
    ids, mask, _ = chat.render_conversation(SYSTEM_TWO_TURNS, template)
    text, learned, other = EXPECTED[name][0]
    assert ids == enc.encode_ordinary(text[:-len("<|endoftext|>")]) + [EOT]
    assert runs(ids, mask) == (learned, other)


def test_a_token_across_a_reply_edge_is_cut_there():
    """A custom template whose label would share a token with the reply ("<bot>" + ".NET": ">." is one GPT-2
    token): the text is cut at that edge, so the mask is still exactly the reply, and the prompt's ids are still
    the training ids up to the reply."""
    template = CUSTOM
    messages = [{"role": "user", "content": "Hm"}, {"role": "assistant", "content": ".NET, yes."},
                {"role": "user", "content": "So?"}, {"role": "assistant", "content": ">> no."}]
    enc = chat.get_encoder()
    assert enc.encode_ordinary("<bot>.NET") != enc.encode_ordinary("<bot>") + enc.encode_ordinary(".NET")
    ids, mask, _ = chat.render_conversation(messages, template)
    assert runs(ids, mask)[0] == [".NET, yes.</bot>\n", ">> no.</bot>\n<|endoftext|>"]
    for end in (1, 3):
        prompt = chat.render_prompt(messages[:end], template)
        assert ids[:len(prompt)] == prompt and mask[len(prompt) - 1:len(prompt) + 1] == [0, 1]
    batch = chat.render_batch([ONE_TURN, messages, ONE_TURN], template)  # one cut among plain ones
    assert batch.conversation(1) == chat.render_conversation(messages, template)
    assert batch.conversation(0) == batch.conversation(2) == chat.render_conversation(ONE_TURN, template)
