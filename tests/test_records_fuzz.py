"""Property-based fuzz of the record readers and the dataset build: any input file gives a clean result or one of the
project's errors (a one-line message naming the file), never another exception. A few hundred examples here; set
FUZZ_EXAMPLES (e.g. 20000) for a longer run."""
import json
import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from chat_gpt2.build import build_dataset  # noqa: E402
from chat_gpt2.errors import UserError  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
KEYS = ["user", "assistant", "messages", "conversations", "role", "content", "from", "value", "instruction", "input",
        "output", "prompt", "completion", "question", "answer", "system", "id"]
ROLES = ["user", "assistant", "system", "human", "gpt", "bot", "prompter", "tool", ""]

texts = st.one_of(st.sampled_from(ROLES), st.text(max_size=20))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), texts)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5)), max_leaves=20)
turn = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts})
plausible = st.one_of(  # records close to a valid schema, so the deeper checks are reached too
    st.fixed_dictionaries({"user": texts, "assistant": texts}),
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=5)}),
    st.fixed_dictionaries({"instruction": texts, "input": scalars, "output": texts}),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=4))
line = st.one_of(plausible.map(json.dumps), values.map(json.dumps), st.binary(max_size=40),
                 st.sampled_from(["[" * 3000, '{"user": 1' + "0" * 4400 + "}", "\ufeff{}", "", "  "]))

SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def build(tmp_path, name, content, skip_invalid):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / f"out-{name}-{skip_invalid}"
    try:
        meta = build_dataset([str(path)], out_dir=str(out), skip_invalid=skip_invalid)
    except UserError as e:
        assert str(e) and "\n" not in str(e).strip()  # one line
        return None
    assert sum(meta["conversations"].values()) >= 2
    return meta


@SETTINGS
@given(lines=st.lists(line, min_size=1, max_size=8))
def test_jsonl_lines_never_raise_anything_else(tmp_path_factory, lines):
    tmp = tmp_path_factory.mktemp("fuzz")
    content = b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines)
    for skip in (False, True):
        build(tmp, "data.jsonl", content, skip)


@SETTINGS
@given(items=st.lists(st.one_of(plausible, values), max_size=6), tail=st.sampled_from(["]", "", ",]", "]x", "}]"]))
def test_json_arrays_never_raise_anything_else(tmp_path_factory, items, tail):
    tmp = tmp_path_factory.mktemp("fuzz")
    body = "[" + ",\n".join(json.dumps(i) for i in items) + tail
    for skip in (False, True):
        build(tmp, "data.json", body.encode("utf-8", "surrogatepass"), skip)
