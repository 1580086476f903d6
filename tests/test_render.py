"""chat.render_batch (prepare.py's fast path) equals chat.render_conversation (the definition of ids, mask and
turn starts) token for token, on every template and on records of every shared chat / instruction dataset."""
import itertools
import json
import os

import pytest

from chat_gpt2 import chat, records
from helpers import SHARED_DATA

# a template whose label shares tokens with many replies ("<bot>" + ".NET"): encode_text's cuts are exercised
CUSTOM = {"system": "<sys>{content}</sys>\n", "user": "<user>{content}</user>\n", "assistant_label": "<bot>",
          "assistant": "{content}", "turn_end": "</bot>\n", "eot": "<|endoftext|>", "default_system": "{x}",
          "input": "\n--\n{content}", "stop": "</bot>", "stop_multiline": "</bot>"}
TEMPLATES = ["human_assistant", "alpaca", "chatml", "custom"]
RECORDS_PER_DATASET = 150  # keeps the test to a few seconds


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


TRICKY = [  # edges a fast path could get wrong
    [user("Hi"), assistant("Hello.")],
    [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4"), user("3+3?"), assistant("6")],
    # multi-byte characters, lone surrogates (valid JSON: "\ud800")
    [user("ünï \ud800 😀"), assistant("é\udfffz 😀"), user("ok"), assistant("ß")],
    [user("Hm"), assistant(".NET, yes."), user("So?"), assistant(">> no.")],  # tokens across the reply's edge
    [user("say <|endoftext|>"), assistant("<|endoftext|> said")],  # typed by a user, it stays text
    [user(""), assistant("")],  # empty messages
    [user("a"), user("b"), assistant("c")],  # two user turns in a row
    [user("line 1\nline 2"), assistant("  padded  \n\n reply \n")],
]


def template_of(name, tmp_path):
    if name != "custom":
        return chat.load_template(name)
    path = tmp_path / "template.json"  # a FILE.json template, as --template=FILE.json reads it
    path.write_text(json.dumps(CUSTOM), encoding="utf-8")
    return chat.load_template(str(path))


def assert_same(conversations, template):
    batch = chat.render_batch(conversations, template)
    assert len(batch) == len(conversations)
    for i, messages in enumerate(conversations):
        assert batch.conversation(i) == chat.render_conversation(messages, template), (i, messages)


@pytest.mark.parametrize("name", TEMPLATES)
def test_fast_path_is_the_definition_on_tricky_conversations(tmp_path, name):
    assert_same(TRICKY, template_of(name, tmp_path))


def shared_datasets():
    """The .json / .jsonl files of the shared datasets (chat and instruction records), by folder name."""
    found = []
    for folder in sorted(os.listdir(SHARED_DATA)) if os.path.isdir(SHARED_DATA) else []:
        for file in sorted(os.listdir(os.path.join(SHARED_DATA, folder))):
            if file.endswith((".json", ".jsonl")):
                found.append(pytest.param(os.path.join(SHARED_DATA, folder, file), id=folder))
    return found or [pytest.param(None, id="no-shared-data")]


@pytest.mark.parametrize("path", shared_datasets())
@pytest.mark.parametrize("name", TEMPLATES)
def test_fast_path_is_the_definition_on_shared_data(tmp_path, name, path):
    if path is None:
        pytest.skip(f"no shared datasets in {SHARED_DATA}")
    template = template_of(name, tmp_path)
    read = records.read_conversations(path, template=template)
    conversations = [messages for _, messages in itertools.islice(read, RECORDS_PER_DATASET)]
    assert conversations
    assert_same(conversations, template)
