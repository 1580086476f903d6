"""eval.py: val loss on assistant tokens, replies to held-out conversations and their metrics, errors, the judge
hook end to end. tiny_ckpt here is a random tiny model with a 128-token window."""
import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

import eval as eval_py
import helpers
from chat_gpt2 import chat, evaluation


@pytest.fixture(scope="module")
def tiny_ckpt(make_tiny_ckpt):
    return make_tiny_ckpt(block_size=128)


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
# Replies on a hand-made held-out file


def test_replies_on_handmade_file(tmp_path, tiny_ckpt, capsys, monkeypatch):
    data = helpers.write_records(tmp_path / "heldout.jsonl", HANDMADE)
    # the model answers the first and third conversations correctly (plus extra lines), the second wrongly
    canned = {"What is 2 plus 3?": "5\nmore", "Capital of France?": "Lyon is the capital", "Opposite of hot?": "cold"}

    def reply(engine, request):
        text = chat.get_encoder().decode(request.prompt)
        return next(v for k, v in canned.items() if text.endswith(f"Human: {k}\nAssistant:"))

    helpers.fake_complete(monkeypatch, reply)
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


def test_init_from_our_checkpoint_or_a_run_folder(tmp_path, tiny_ckpt, capsys):
    """--init_from takes one of our .pt files or a run's out_dir, as train.py does: the same replies as --ckpt."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tiny_ckpt, run_dir / "finetuned_20260101_000000.pt")
    data = helpers.write_records(tmp_path / "heldout.jsonl", HANDMADE)
    rows = []
    for source in (f"--ckpt={tiny_ckpt}", f"--init_from={tiny_ckpt}", f"--init_from={run_dir}"):
        out_path = tmp_path / "replies.jsonl"
        run_eval(capsys, source, f"--data={data}", f"--out={out_path}", "--max_new_tokens=4")
        rows.append(out_path.read_text())
    assert rows[0] and rows == [rows[0]] * 3


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


def test_val_loss_matches_a_direct_computation(tiny_dataset, tiny_ckpt, capsys):
    model = helpers.tiny_model(block_size=128)
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


def test_eval_in_half_precision(tiny_ckpt, tmp_path, capsys):
    data = helpers.write_records(tmp_path / "h.jsonl", [{"user": "Hi", "assistant": "Hello"}] * 2)
    assert eval_py.DEFAULTS["dtype"] == "float32"  # scores compare across machines
    eval_py.main([f"--ckpt={tiny_ckpt}", "--device=cpu", f"--data={data}", f"--out={tmp_path / 'r.jsonl'}",
                  "--max_new_tokens=4", "--dtype=bfloat16"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 2


# ---------------------------------------------------------------------------------------------------------------
# The judge, end to end


@pytest.mark.slow
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
