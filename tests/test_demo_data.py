"""Tests for data/demo/generate.py (synthetic demo chat dataset)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "data", "demo", "generate.py")


def _load():
    spec = importlib.util.spec_from_file_location("demo_generate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load()


@pytest.fixture(scope="module")
def data():
    return gen.generate(1337)


def test_deterministic_same_seed(data):
    train2, held2 = gen.generate(1337)
    assert data == (train2, held2)


def test_different_seed_differs(data):
    train2, held2 = gen.generate(1338)
    assert train2 != data[0]
    assert held2 != data[1]


def test_sizes(data):
    train, held = data
    assert 3000 <= len(train) <= 6000
    assert 150 <= len(held) <= 250
    # held-out is balanced across families
    assert len(held) == gen.HELDOUT_PER_FAMILY * len(gen._families())


def test_schema(data):
    for recs in data:
        for r in recs:
            assert set(r) == {"user", "assistant"}
            assert isinstance(r["user"], str) and isinstance(r["assistant"], str)
            assert r["user"].strip() and r["assistant"].strip()
            assert "\n" not in r["user"] and "\n" not in r["assistant"]
            assert r["assistant"] == r["assistant"].strip()
            assert len(r["assistant"].split()) == 1  # one bare word / number


def test_no_heldout_prompt_in_train(data):
    train, held = data
    train_users = [r["user"] for r in train]
    train_set = set(train_users)
    for r in held:
        assert r["user"] not in train_set
    # not even as a substring of a (possibly prefixed/suffixed) training prompt
    blob = "\x00".join(train_users)
    for r in held:
        assert r["user"] not in blob, r["user"]


def test_heldout_prompts_unique(data):
    _, held = data
    users = [r["user"] for r in held]
    assert len(users) == len(set(users))


def test_heldout_answers_in_train(data):
    train, held = data
    train_answers = {r["assistant"] for r in train}
    for r in held:
        assert r["assistant"] in train_answers


def test_heldout_items_seen_with_other_phrasings(data):
    """Every held-out (item, template) has the same item in train under other
    templates, and the same template in train with other items."""
    train, held = data
    train_users = {r["user"] for r in train}
    held_users = {r["user"] for r in held}
    n_checked = 0
    for templates, items in gen._families().values():
        for fields, ans in items:
            rendered = [t.format(**fields) for t in templates]
            held_here = [i for i, u in enumerate(rendered) if u in held_users]
            if not held_here:
                continue
            assert 1 <= len(held_here) <= 2
            others = [u for i, u in enumerate(rendered) if i not in held_here]
            # plain or wrapped versions count as "seen"; at least 3 other phrasings
            seen = [o for o in others if any(o in tu for tu in train_users)]
            assert len(seen) >= 3
            n_checked += len(held_here)
    assert n_checked == len(held)
    # every template is used in training (with other items)
    for templates, items in gen._families().values():
        for t in templates:
            rendered = {t.format(**fields) for fields, _ in items}
            assert any(u in train_users for u in rendered - held_users)


def test_consistent_answer_format(data):
    train, held = data
    for r in train + held:
        assert not r["assistant"].endswith(".")


@pytest.mark.slow
def test_cli_writes_files(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, SCRIPT, f"--out_dir={out}", "--seed=1337"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "train.jsonl" in res.stdout and "heldout.jsonl" in res.stdout
    train, held = gen.generate(1337)
    for name, recs in (("train.jsonl", train), ("heldout.jsonl", held)):
        path = out / name
        assert path.is_file()
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == recs
    # no temp files left behind
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "train.jsonl"]
    # a second run is byte-identical
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res2 = subprocess.run([sys.executable, SCRIPT, f"--out_dir={out}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res2.returncode == 0, res2.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_token_lengths_gpt2(data):
    """Answers are one GPT-2 token; rendered conversations are short.
    Skipped when tiktoken or its (offline) encoding cache is unavailable."""
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network / no cache
        pytest.skip(f"gpt2 encoding unavailable: {e}")
    for recs in data:
        for r in recs:
            assert len(enc.encode_ordinary(" " + r["assistant"])) == 1, r
            n = len(enc.encode_ordinary(f"Human: {r['user']}\nAssistant: {r['assistant']}\n\n"))
            assert n <= 25, (n, r)


def test_families_select_records_without_changing_them(data, tmp_path):
    """--families keeps a subset; each family's records are those of the full set (the same draws), in order."""
    train, held = gen.generate(1337, ["capital", "add"])
    assert len(train) == 2 * gen.TRAIN_PER_FAMILY and len(held) == 2 * gen.HELDOUT_PER_FAMILY
    assert train == [r for r in data[0] if r in train] and held == [r for r in data[1] if r in held]
    assert any("capital" in r["user"] for r in held) and not any("opposite" in r["user"] for r in held)
    res = subprocess.run([sys.executable, SCRIPT, f"--out_dir={tmp_path}", "--families=capitol"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown families ['capitol']" in res.stderr


def doc_questions():
    """The questions README.md and docs/*.md put to a model: `--prompt "..."`, a chat message's "content",
    and the lines piped to `sample.py --interactive` by printf."""
    found = []
    docs = os.path.join(ROOT, "docs")
    for path in [os.path.join(ROOT, "README.md")] + sorted(
            os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        found += re.findall(r'--prompt[ =]"([^"]+)"', text) + re.findall(r'"content": "([^"]+)"', text)
        found += [q for piped in re.findall(r"printf '([^']+)' \| python sample\.py", text)
                  for q in piped.split("\\n") if q]
    return found


def test_every_demo_question_in_the_docs_is_one_the_demo_teaches():
    """A question phrased as one of the demo's templates (sums, capitals, conversions, opposites, ...) asks
    about an item of that family: the model the quick start trains can answer it."""
    questions = doc_questions()
    assert "What is the capital of France?" in questions  # the quick start's own question was found
    checked = 0
    for question in questions:
        for templates, items in gen._families().values():
            taught = {t.format(**fields) for t in templates for fields, _ in items}
            for t in templates:
                pattern = re.escape(t)
                for name in re.findall(r"\{(\w+)\}", t):
                    pattern = pattern.replace(re.escape("{" + name + "}"), r"(.+)", 1)
                if re.fullmatch(pattern, question):
                    assert question in taught, f"{question!r}: the demo data does not teach that item"
                    checked += 1
    assert checked >= 2
