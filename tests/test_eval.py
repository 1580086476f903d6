"""eval.py: val loss on assistant tokens, replies to held-out conversations, metrics, the optional judge hook."""
import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
import torch.nn.functional as F

from chat_gpt2 import chat
import eval as eval_py
from chat_gpt2 import evaluation
from chat_gpt2.judge import make_judge
from chat_gpt2.engine import Engine
import gen_helpers
import helpers


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return gen_helpers.save_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "tiny.pt",
                                            gen_helpers.tiny_model(block_size=128))


HANDMADE = [
    {"user": "What is 2 plus 3?", "assistant": "5"},
    {"question": "Capital of France?", "answer": "Paris"},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Opposite of hot?"},
                  {"role": "assistant", "content": "cold"}]},
]


def run_eval(capsys, *args):
    summary = eval_py.main(["--device=cpu", "--dtype=float32", *args])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == summary  # the run ends with one JSON summary line
    return summary, out


# ---------------------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("response, reference, expected", [
    ("Paris", "Paris", True),
    ("  Paris \n and more", "Paris", True),  # first line only, surrounding whitespace ignored
    ("Buenos   Aires", "Buenos Aires", True),  # inner whitespace normalised
    ("\n\nParis", "Paris", True),  # the first non-empty line
    ("paris", "Paris", False),  # case matters
    ("Paris.", "Paris", False),
    ("", "Paris", False),
])
def test_exact_match(response, reference, expected):
    assert evaluation.exact_match(response, reference) is expected


@pytest.mark.parametrize("response, reference, expected", [
    ("The cat sat.", "the cat sat", 1.0),  # lowercased, punctuation stripped
    ("a b c d", "a b", 2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2)),  # precision 1/2, recall 1 -> 2/3
    ("a a b", "a b b", 2 / 3),  # bags: min counts a:1 b:1 -> 2 common of 3 and 3
    ("x y", "a b", 0.0),
    ("", "", 1.0),
    ("...", "a", 0.0),
])
def test_token_f1(response, reference, expected):
    assert evaluation.token_f1(response, reference) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------------
# Replies on a hand-made held-out file


def test_replies_on_handmade_file(tmp_path, tiny_ckpt, capsys, monkeypatch):
    data = helpers.write_records(tmp_path / "heldout.jsonl", HANDMADE)
    # the model answers the first and third conversations correctly (plus extra lines), the second wrongly
    canned = {"What is 2 plus 3?": "5\nmore", "Capital of France?": "Lyon is the capital", "Opposite of hot?": "cold"}

    def fake_generate_batch(engine, prompts, params, on_text=None, generator=None):
        texts = [chat.get_encoder().decode(p) for p in prompts]
        return [next(v for k, v in canned.items() if t.endswith(f"Human: {k}\nAssistant:")) for t in texts]

    monkeypatch.setattr(Engine, "generate_batch", fake_generate_batch)
    out_path = tmp_path / "replies.jsonl"
    summary, out = run_eval(capsys, f"--ckpt={tiny_ckpt}", f"--data={data}", f"--out={out_path}")
    assert "exact match: 66.7% (2/3)" in out
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["5", "Paris", "cold"]
    assert [r["exact_match"] for r in rows] == [True, False, True]
    assert rows[1]["f1"] == pytest.approx(0.0) and rows[2]["f1"] == 1.0
    assert rows[0]["f1"] == pytest.approx(2 / 3)  # "5 more" vs "5"
    # the prompt is everything before the last assistant message, in the chat template
    assert rows[2]["prompt"] == "System: Be terse.\nHuman: Hi\nAssistant: Hello\n\nHuman: Opposite of hot?\nAssistant:"
    assert summary["n"] == 3 and summary["exact_match"] == pytest.approx(2 / 3)
    assert summary["f1"] == pytest.approx(sum(r["f1"] for r in rows) / 3)


def test_replies_from_the_model(tmp_path, tiny_ckpt, capsys):
    """The real generation path: greedy replies, one row per conversation, metrics consistent with the replies."""
    data = helpers.write_records(tmp_path / "heldout.json", HANDMADE)  # a .json array works too
    out_path = tmp_path / "out" / "replies.jsonl"
    summary, _ = run_eval(capsys, f"--ckpt={tiny_ckpt}", f"--data={data}", f"--out={out_path}",
                          "--max_new_tokens=8", "--stop=['\\n']")
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"prompt", "reference", "response", "exact_match", "f1"}
    for row in rows:
        assert row["exact_match"] == evaluation.exact_match(row["response"], row["reference"])
        assert "\n" not in row["response"]
    # same length prompts are batched; greedy replies equal one-by-one generation
    again = eval_py.main(["--device=cpu", f"--ckpt={tiny_ckpt}", f"--data={data}", f"--out={out_path}",
                          "--max_new_tokens=8", "--stop=['\\n']", "--batch_size=1"])
    assert [json.loads(line) for line in out_path.read_text().splitlines()] == rows and again["n"] == 3


def test_bad_record_names_file_and_line(tmp_path, tiny_ckpt):
    data = helpers.write_records(tmp_path / "heldout.jsonl", HANDMADE[:1] + [{"user": "no answer"}])
    with pytest.raises(ValueError, match=r"heldout\.jsonl:2: field 'assistant' is missing"):
        eval_py.main(["--device=cpu", f"--ckpt={tiny_ckpt}", f"--data={data}", f"--out={tmp_path / 'r.jsonl'}"])
    assert not (tmp_path / "r.jsonl").exists()


def test_nothing_to_evaluate_is_an_error(tiny_ckpt):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        eval_py.main(["--device=cpu", f"--ckpt={tiny_ckpt}"])


# ---------------------------------------------------------------------------------------------------------------
# Val loss


@pytest.mark.parametrize("block_size", [4, 9, 64])
def test_windows_score_every_assistant_token_once(tiny_dataset, block_size):
    d = helpers.read_split(tiny_dataset, "val")
    ends = list(d["convs"][1:]) + [len(d["ids"])]
    scored = []
    for start, tokens, mask in evaluation.conversation_windows(d["ids"], d["mask"], d["convs"], d["turns"], block_size):
        assert len(tokens) <= block_size + 1 and (tokens == d["ids"][start:start + len(tokens)]).all()
        conv = max(i for i, a in enumerate(d["convs"]) if a <= start)
        assert start + len(tokens) <= ends[conv]  # inside one conversation
        scored += [start + 1 + j for j in mask.nonzero()[0]]
    assert sorted(scored) == sorted(set(scored))  # no token twice
    expected = [i for i in range(len(d["ids"])) if d["mask"][i] and i not in set(d["convs"])]
    assert sorted(scored) == expected


def test_val_loss_matches_a_direct_computation(tiny_dataset, tiny_ckpt, capsys):
    model = gen_helpers.tiny_model(block_size=128)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in helpers.conversations(tiny_dataset, "val"):
            logits, _ = model(torch.tensor([ids[:-1]]), all_logits=True)
            losses = F.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="none")
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            total, count = total + losses[keep].sum().item(), count + int(keep.sum())
    summary, out = run_eval(capsys, f"--ckpt={tiny_ckpt}", f"--dataset={tiny_dataset}", "--batch_size=3")
    assert summary["val_tokens"] == count
    assert summary["val_loss"] == pytest.approx(total / count, rel=1e-4)
    assert summary["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert "perplexity" in out


# ---------------------------------------------------------------------------------------------------------------
# Judge hook


ROW = {"prompt": "Human: 2+3?\nAssistant:", "reference": "5", "response": "5"}


def test_judge_command(tmp_path):
    judge = tmp_path / "judge.py"
    judge.write_text("import json, sys\nrow = json.load(sys.stdin)\n"
                     "print('score:', 9 if row['response'] == row['reference'] else 2)\n")
    score = make_judge({**eval_py.DEFAULTS, "judge_cmd": f"{sys.executable} {judge}"})
    assert score(ROW) == 9.0 and score({**ROW, "response": "6"}) == 2.0
    failing = make_judge({**eval_py.DEFAULTS, "judge_cmd": f"{sys.executable} -c 'import sys; sys.exit(3)'"})
    with pytest.raises(RuntimeError, match="exited 3"):
        failing(ROW)


class _FakeOpenAI(BaseHTTPRequestHandler):
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeOpenAI.requests.append((self.path, body))
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "7"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_judge_endpoint():
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        score = make_judge({**eval_py.DEFAULTS, "judge_url": url, "judge_model": "judge-1"})
        assert score(ROW) == 7.0
        path, body = _FakeOpenAI.requests[-1]
        assert path == "/v1/chat/completions" and body["model"] == "judge-1"
        assert "Reference answer:\n5" in body["messages"][-1]["content"]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(RuntimeError, match="judge endpoint .* failed"):
        score(ROW)  # the server is gone: a clear error, not a traceback from urllib
    with pytest.raises(ValueError, match="needs --judge_model"):
        make_judge({**eval_py.DEFAULTS, "judge_url": url})


def test_judge_is_off_by_default():
    assert make_judge(dict(eval_py.DEFAULTS)) is None


def test_cli_with_judge(tmp_path, tiny_ckpt):
    data = helpers.write_records(tmp_path / "heldout.jsonl", HANDMADE[:2])
    judge = tmp_path / "judge.py"
    judge.write_text("print(4)\n")
    out_path = tmp_path / "replies.jsonl"
    p = helpers.run(["eval.py", f"--ckpt={tiny_ckpt}", f"--data={data}", f"--out={out_path}", "--max_new_tokens=4",
                     "--device=cpu", f"--judge_cmd={sys.executable} {judge}"], cwd=helpers.REPO, timeout=120)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["judge_score"] == 4.0 and summary["n"] == 2
    assert all(json.loads(line)["judge_score"] == 4.0 for line in out_path.read_text().splitlines())
