"""serve.py's OpenAI request fields, driven from docs/serving.md's table: each is supported, a
no-op, accepted at its default only (refused otherwise with 400 naming it), or not a field of that
endpoint; and the shapes it accepts (content parts, prompt lists and token ids, seed range)."""
import json
import os
import re

import httpx
import pytest

from chat_gpt2 import chat, server as api
from test_serve import GREEDY, HELLO, REPO, ckpt, post, server  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")

ENDPOINTS = {"/v1/chat/completions": (api.ChatRequest, api.CHAT_NO_OPS),
             "/v1/completions": (api.CompletionRequest, api.COMPLETION_NO_OPS)}
BASE = {"/v1/chat/completions": {"messages": HELLO, "max_tokens": 1},
        "/v1/completions": {"prompt": "Hello", "max_tokens": 1}}
REFUSED = {  # a value each default-only field is refused with (what a client would really send)
    "response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "required", "functions": [{"name": "f"}], "function_call": {"name": "f"},
    "best_of": 3, "suffix": "The end.",
    "frequency_penalty": 0.5, "presence_penalty": -1, "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "high", "verbosity": "low", "web_search_options": {}, "moderation": {},
    "store": True, "service_tier": "flex"}


def field_table():
    """{field: {endpoint: cell}} from docs/serving.md's table of request fields."""
    with open(os.path.join(REPO, "docs", "serving.md"), encoding="utf-8") as f:
        rows = [line for line in f if line.startswith("| `")]
    table = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1] != "" and re.fullmatch(r"`\w+`", cells[0]):
            table[cells[0].strip("`")] = dict(zip(ENDPOINTS, cells[1:3]))
    return table


TABLE = field_table()


def cases(kind):
    return [(field, path) for field, cells in TABLE.items() for path, cell in cells.items()
            if cell.split(":")[0] == kind]


def refused_value(field, path):
    return REFUSED.get(field, True)


def test_the_table_lists_every_openai_field():
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params
    openai_fields = {"/v1/chat/completions": set(chat_params.CompletionCreateParamsBase.__annotations__),
                     "/v1/completions": set(completion_create_params.CompletionCreateParamsBase.__annotations__)}
    for path, names in openai_fields.items():
        listed = {field for field, cells in TABLE.items() if cells[path] != "—"}
        assert names | {"stream"} <= listed, sorted(names - listed)


def test_the_table_says_what_the_server_does():
    for field, cells in TABLE.items():
        for path, cell in cells.items():
            model, no_ops = ENDPOINTS[path]
            kind, _, values = cell.partition(":")
            if kind == "supported":
                assert field in model.model_fields, (field, path)
            elif kind == "no-op":
                assert no_ops[field] is api.ANY, (field, path)
            elif kind == "default only":
                listed = [json.loads(v) for v in re.findall(r"`([^`]*)`", values)]
                assert list(no_ops[field]) == listed, (field, path)
            else:
                assert cell == "—" and field not in model.model_fields and field not in no_ops
    for path, (model, no_ops) in ENDPOINTS.items():  # and nothing the server knows is left out
        assert set(no_ops) <= {field for field, cells in TABLE.items() if cells[path] != "—"}


@pytest.mark.parametrize("field,path", cases("default only"))
def test_default_only_fields_accept_their_default_and_refuse_the_rest(server, field, path):  # noqa: F811
    _, no_ops = ENDPOINTS[path]
    for value in (None, *no_ops[field]):
        r = post(server, path, {**BASE[path], field: value})
        assert r.status_code == 200, (field, value, r.text)
    r = post(server, path, {**BASE[path], field: refused_value(field, path)})
    assert r.status_code == 400, (field, r.text)
    error = r.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter" and field in error["message"]


@pytest.mark.parametrize("field,path", cases("no-op"))
def test_no_op_fields_are_accepted(server, field, path):  # noqa: F811
    for value in ("a-user-42", True, {"k": "v"}):
        r = post(server, path, {**BASE[path], field: value})
        assert r.status_code == 200, (field, value, r.text)


@pytest.mark.parametrize("field,path", cases("—"))
def test_fields_of_the_other_endpoint_and_unknown_ones_are_refused(server, field, path):  # noqa: F811
    for name in (field, "no_such_field"):
        r = post(server, path, {**BASE[path], name: 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text


def test_openai_client_sees_refusals(server):  # noqa: F811
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hi", best_of=3)
    assert e.value.body["param"] == "best_of"
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1, frequency_penalty=0,
                                       presence_penalty=0, user="u1", response_format={"type": "text"})
    assert r.choices[0].message.role == "assistant"


# --------------------------------------------------------------------------------------------------
# The shapes of supported fields


def texts(r):
    assert r.status_code == 200, r.text
    return [choice.get("text", choice.get("message", {}).get("content")) for choice in r.json()["choices"]]


def test_text_content_parts_are_the_string(server):  # noqa: F811
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nthere"}]
    body = {"max_tokens": 8, **GREEDY}
    as_parts = post(server, "/v1/chat/completions", {**body, "messages": parts})
    assert texts(as_parts) == texts(post(server, "/v1/chat/completions", {**body, "messages": joined}))
    assert as_parts.json()["usage"]["prompt_tokens"] > 5
    for part in ({"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                 {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "text"):
        r = post(server, "/v1/chat/completions", {**body, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look"}, part]}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
        kind = part["type"] if isinstance(part, dict) else "str"
        assert kind in r.json()["error"]["message"]


def test_prompt_as_strings_and_token_ids(server):  # noqa: F811
    enc = chat.get_encoder()
    body = {"max_tokens": 6, "n": 2, **GREEDY}
    one = {p: texts(post(server, "/v1/completions", {**body, "prompt": p})) for p in ("The cat", "A dog ran")}
    assert one["The cat"] != one["A dog ran"]
    expected = one["The cat"] + one["A dog ran"]  # prompt i's choices are i*n ... i*n+n-1
    ids = [enc.encode_ordinary(p) for p in one]
    for prompt in (list(one), ids, [ids[0], "A dog ran"]):
        r = post(server, "/v1/completions", {**body, "prompt": prompt})
        assert texts(r) == expected and [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
        assert r.json()["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
    assert texts(post(server, "/v1/completions", {**body, "prompt": ids[0]})) == one["The cat"]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={**body, "prompt": list(one), "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i)
                    for i in range(4)]
    assert [t.lstrip() for t in streamed] == expected
    for bad in ([], [""], [[]], [1, "a"], [[1], [-1]], [[chat.get_encoder().n_vocab]], 5, [["a"]]):
        r = post(server, "/v1/completions", {**body, "prompt": bad})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), (bad, r.text)


def test_seed_range_and_max_completion_tokens(server):  # noqa: F811
    for seed in (2**80, -2**64):
        r = post(server, "/v1/chat/completions", {"messages": HELLO, "seed": seed, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    for seed in (2**64 - 1, -2**63):
        assert post(server, "/v1/chat/completions", {"messages": HELLO, "seed": seed, "max_tokens": 1,
                                                     "temperature": 1}).status_code == 200
    r = post(server, "/v1/chat/completions", {"messages": HELLO, "max_completion_tokens": 3, **GREEDY})
    assert r.json()["usage"]["completion_tokens"] == 3
    r = post(server, "/v1/chat/completions", {"messages": HELLO, "max_completion_tokens": 3, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_logit_bias_forces_a_token_and_is_checked(server):  # noqa: F811
    enc = chat.get_encoder()
    forced = enc.encode_ordinary(" garden")
    assert len(forced) == 1
    for path in ENDPOINTS:
        body = {**BASE[path], "max_tokens": 3, **GREEDY}
        greedy = texts(post(server, path, body))
        assert texts(post(server, path, {**body, "logit_bias": {}})) == greedy
        r = post(server, path, {**body, "logit_bias": {str(forced[0]): 100}})
        assert texts(r)[0].strip() == enc.decode(forced * 3).strip() != greedy[0].strip(), texts(r)
        for bad in ({str(enc.n_vocab): 1}, {"-1": 1}, {"cat": 1}, {"10": 100.5}, {"10": -101},
                    {"10": "1"}, [10, 1]):
            r = post(server, path, {**body, "logit_bias": bad})
            assert r.status_code == 400 and r.json()["error"]["param"].startswith("logit_bias"), (bad, r.text)
