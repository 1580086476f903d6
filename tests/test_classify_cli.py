"""classify.py (--text, --file, --interactive) and eval.py on a classifier, as commands, on a tiny trained classifier;
and config/classify_spam.py has nothing two-class specific."""
import contextlib
import io
import json
import os
import sys

import pytest

import helpers

LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    """A saved classifier checkpoint: a tiny random model with a head, as train.py writes it (the keys used)."""
    out = tmp_path_factory.mktemp("clf")
    return str(out), helpers.save_tiny_classifier(out / "finetuned_20260101_000000.pt", LABELS)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(args, cwd, check=True, stdin=None):
    """The script's main in this process (a command costs seconds of imports), as configurator.run runs it:
    a UserError is one line on stderr and exit status 1."""
    import classify
    import eval as eval_script
    from chat_gpt2.errors import UserError
    main = {"classify.py": classify.main, "eval.py": eval_script.main}[os.path.basename(args[0])]
    out, err, rc = io.StringIO(), io.StringIO(), 0
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args[1:]))
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                rc = 1
    finally:
        sys.stdin = saved
    assert rc == 0 or not check, err.getvalue()
    return Result(rc, out.getvalue(), err.getvalue())


def test_classify_text_file_and_interactive(classifier_ckpt, tmp_path):
    out_dir, _ = classifier_ckpt
    script = helpers.script("classify.py")
    r = run([script, f"--out_dir={out_dir}", "--text=hello there"], tmp_path)
    label, prob = r.stdout.split()
    assert label in LABELS and 0.5 <= float(prob) <= 1
    texts = tmp_path / "texts.txt"
    texts.write_text("hello there\n\nsecond one\r\nthird\n")
    r = run([script, f"--out_dir={out_dir}", f"--file={texts}"], tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "texts.predictions.jsonl")]
    assert [row["text"] for row in rows] == ["hello there", "second one", "third"]
    assert rows[0]["label"] == label and rows[0]["probability"] == pytest.approx(float(prob), abs=1e-3)
    assert all(sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-5) for row in rows)
    jsonl = helpers.write_records(tmp_path / "t.jsonl", [{"text": "hello there"}])
    run([script, f"--out_dir={out_dir}", f"--file={jsonl}", f"--out={tmp_path / 'p.jsonl'}"], tmp_path)
    assert json.loads(open(tmp_path / "p.jsonl").readline())["label"] == label
    r = run([script, f"--out_dir={out_dir}", "--interactive"], tmp_path, stdin="hello there\n\nthird\n/quit\nnot read\n")
    assert r.stdout.splitlines() == [f"{label} {prob}", f"{rows[2]['label']} {rows[2]['probability']:.3f}"]


def test_classify_bad_inputs(classifier_ckpt, tmp_path):
    out_dir, _ = classifier_ckpt
    script = helpers.script("classify.py")
    r = run([script, f"--out_dir={out_dir}"], tmp_path, check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: pass one of --text")
    bad = helpers.write_records(tmp_path / "b.jsonl", [{"text": "ok"}, {"body": "no text"}])
    r = run([script, f"--out_dir={out_dir}", f"--file={bad}"], tmp_path, check=False)
    assert r.returncode == 1 and f"error: {bad}:2: column 'text'" in r.stderr
    chat_ckpt = helpers.save_tiny_checkpoint(tmp_path / "chat.pt")
    r = run([script, f"--ckpt={chat_ckpt}", "--text=hi"], tmp_path, check=False)
    assert r.returncode == 1 and "is not a classifier" in r.stderr


def test_eval_on_a_classifier(classifier_ckpt, tmp_path):
    out_dir, _ = classifier_ckpt
    data = tmp_path / "heldout.csv"
    data.write_text("label,text\npos,hello there\nneg,second one\npos,third\n")
    r = run([helpers.script("classify.py"), f"--out_dir={out_dir}", f"--file={data}"], tmp_path)
    predicted = [json.loads(line)["label"] for line in open(tmp_path / "heldout.predictions.jsonl")]
    correct = sum(p == t for p, t in zip(predicted, ["pos", "neg", "pos"]))
    r = run([helpers.script("eval.py"), f"--out_dir={out_dir}", f"--data={data}"], tmp_path)
    lines = r.stdout.splitlines()
    assert lines[0] == f"accuracy: {100 * correct / 3:.1f}% ({correct}/3)"
    assert lines[1].split() == ["class", "precision", "recall", "F1", "support"]
    assert json.loads(lines[-1])["n"] == 3
    data.write_text("label,text\npos,hello\nmaybe,there\n")
    r = run([helpers.script("eval.py"), f"--out_dir={out_dir}", f"--data={data}"], tmp_path, check=False)
    assert r.returncode == 1 and r.stderr.startswith(f"error: {data}:3: column 'label': label 'maybe' is not one of")


def test_classify_as_a_command(classifier_ckpt, tmp_path):
    out_dir, _ = classifier_ckpt
    import subprocess
    p = subprocess.run([sys.executable, helpers.script("classify.py"), f"--out_dir={out_dir}", "--interactive"],
                       cwd=tmp_path, env=helpers.env(), capture_output=True, text=True, timeout=240,
                       input="hello there\n")
    assert p.returncode == 0 and p.stdout.split()[0] in LABELS
    p = subprocess.run([sys.executable, helpers.script("classify.py"), "--out_dir=nowhere", "--text=x"],
                       cwd=tmp_path, env=helpers.env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 1 and p.stderr.startswith("error: no checkpoint") and len(p.stderr.splitlines()) == 1


def test_spam_config_is_not_two_class_specific():
    text = open(os.path.join(helpers.REPO, "config", "classify_spam.py")).read()
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert "spam" not in code.replace('"out-spam"', "").replace('"data/spam"', "")
    assert "ham" not in code and "label" not in code and "class" not in code
