"""Evaluate a trained model: val loss on a prepared dataset, and its replies to held-out conversations.

    python eval.py --out_dir=out-demo --data=data/demo/heldout.jsonl     # the demo: share of correct answers
    python eval.py --ckpt=out/finetuned_20260101_120000.pt --dataset=chat --data=heldout.json --out=replies.jsonl
    python eval.py --data=heldout.jsonl --judge_cmd="python my_judge.py"  # plus an external judge (off by default)

--dataset (a folder written by prepare.py, or its name under data/): the mean loss and perplexity on the assistant
tokens (loss mask 1) of the whole val split, every token scored once, each window inside one conversation.

--data (a .jsonl / .json file in any prepare.py schema): per conversation, the prompt is every message before the
last assistant message (rendered with the checkpoint's chat template) and the reference is that message. Replies
are greedy by default and stop at the checkpoint's default stop. Metrics, averaged over the file:
    exact_match  the reply's first line equals the reference's, whitespace-normalised
    f1           SQuAD-style token F1 on lowercased words with punctuation stripped
    judge_score  optional: --judge_cmd gets {"prompt", "reference", "response"} as JSON on stdin and prints a number;
                 --judge_url (an OpenAI-compatible /v1 base URL, key from $OPENAI_API_KEY) + --judge_model are asked
                 for a 1-10 score
Rows {prompt, reference, response, exact_match, f1[, judge_score]} go to --out (JSONL, written atomically); the run
ends with one JSON summary line.
"""
import hashlib
import json
import math
import os
import re
import shlex
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import torch

import chat
import configurator
import prepare
from model import autocast, resolve_dtype
from sample import generate_batch, load_model, resolve_stops

DEFAULTS = dict(
    out_dir="out", ckpt="",  # ckpt "": the newest run's best checkpoint in out_dir
    init_from="",  # e.g. "gpt2": evaluate OpenAI's weights instead of a checkpoint
    dataset="",  # prepared dataset (name under data/ or folder): val loss and perplexity
    data="",  # held-out conversations (.jsonl / .json, any prepare.py schema): replies and their metrics
    out="",  # where the replies go; "": eval_replies.jsonl in out_dir
    batch_size=32,  # windows per forward for the val loss; prompts of one length generated together
    max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=1337,
    stop=None,  # None: the checkpoint's default stop
    judge_cmd="", judge_url="", judge_model="", judge_timeout=120.0,
    device="auto", dtype="auto",
)


# ----------------------------------------------------------------------------------------------------------------
# Val loss on assistant tokens


def conversation_windows(ids, mask, conv_starts, turn_starts, block_size):
    """Yield (start, tokens, scored): windows of at most block_size + 1 tokens inside one conversation, where they
    start in the split, and the loss mask on their targets, zeroed where an earlier window scored the target: every
    token is scored exactly once. A long conversation continues in a window that starts at the latest turn start
    already covered (the new targets keep their turn's context), else half a window back."""
    ends = list(conv_starts[1:]) + [len(ids)]
    for a, b in zip(conv_starts, ends):
        turns = turn_starts[np.searchsorted(turn_starts, a):np.searchsorted(turn_starts, b)]
        start, scored_until = a, a  # targets at positions <= scored_until are scored (position a is no target)
        while scored_until < b - 1:
            end = min(start + block_size + 1, b)
            scored = mask[start + 1:end].astype(np.float32)
            scored[:scored_until - start] = 0
            yield start, ids[start:end].astype(np.int64), scored
            scored_until = end - 1
            later = turns[(turns > start) & (turns <= scored_until)]
            start = int(later[-1]) if len(later) else max(start + 1, scored_until - block_size // 2)


def padded_batches(windows, batch_size, max_tokens=8192):
    """(x, y, mask) batches of windows sorted by length (little padding), at most batch_size rows and about
    max_tokens positions each (bounds the logits' memory on GPUs); padding has target -1 and mask 0."""
    windows = sorted(windows, key=lambda w: -len(w[0]))  # longest first: a batch's first row sets its width
    i = 0
    while i < len(windows):
        rows = max(1, min(batch_size, max_tokens // len(windows[i][0])))
        batch, i = windows[i:i + rows], i + rows
        width = len(batch[0][0]) - 1
        x = torch.full((len(batch), width), chat.EOT, dtype=torch.long)
        y = torch.full((len(batch), width), -1, dtype=torch.long)
        m = torch.zeros((len(batch), width))
        for row, (tokens, scored) in enumerate(batch):
            n = len(tokens) - 1
            x[row, :n], y[row, :n], m[row, :n] = (torch.from_numpy(a) for a in (tokens[:-1], tokens[1:], scored))
        yield x, y, m


@torch.no_grad()
def val_loss(model, folder, batch_size, device, dtype):
    """Token-weighted mean loss over the assistant tokens of the whole val split, and how many tokens that is."""
    from train import load_dataset  # the prepared-dataset reader, with its completeness checks
    data = load_dataset(folder)[0]["val"]
    windows = [(tokens, scored) for _, tokens, scored in conversation_windows(
        data.ids, data.mask, data.convs, data.starts, model.config.block_size) if scored.any()]
    total, count = 0.0, 0.0
    for x, y, m in padded_batches(windows, batch_size):
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device), m.to(device))
        total += loss.item() * m.sum().item()
        count += m.sum().item()
    return total / max(count, 1.0), int(count)


# ----------------------------------------------------------------------------------------------------------------
# Replies to held-out conversations


def load_heldout(path, template, enc):
    """[(prompt_ids, reference)] per conversation; a bad record raises an error naming file:line."""
    examples = []
    for where, record in prepare.iter_records(path, hashlib.sha256()):
        if isinstance(record, prepare.RecordError):
            raise record
        messages = prepare.to_messages(record, where)  # always ends with an assistant message
        examples.append((chat.render_prompt(messages[:-1], template, enc), messages[-1]["content"].strip()))
    if not examples:
        raise ValueError(f"{path}: no conversations")
    return examples


def generate_all(model, prompts, cfg, stops, device, dtype):
    """Replies to every prompt. Prompts of the same token length are generated together as one batch (exact, as
    there is no padding), which makes many short prompts fast on a CPU."""
    by_length = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    replies, last_report, t0 = [None] * len(prompts), time.time(), time.time()
    groups = [g[i:i + cfg["batch_size"]] for g in by_length.values() for i in range(0, len(g), cfg["batch_size"])]
    for group in groups:
        with autocast(device, dtype):
            out = generate_batch(model, [prompts[i] for i in group], cfg["max_new_tokens"], stops, device=device,
                                 generator=generator, temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                                 top_p=cfg["top_p"], repetition_penalty=cfg["repetition_penalty"])
        for i, reply in zip(group, out):
            replies[i] = reply
        if time.time() - last_report > 5:
            last_report = time.time()
            done = sum(r is not None for r in replies)
            print(f"  ... {done}/{len(prompts)} replies, {last_report - t0:.0f}s", file=sys.stderr, flush=True)
    return replies


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def first_line(text):
    """The first non-empty line, whitespace-normalised: what the exact match compares."""
    for line in text.strip().splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def exact_match(response, reference):
    return first_line(response) == first_line(reference)


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def words(text):
    return _PUNCTUATION.sub(" ", text.lower()).split()


def token_f1(response, reference):
    """SQuAD-style F1 over the bag of words (lowercased, punctuation stripped); 1.0 when both have no words."""
    got, want = words(response), words(reference)
    if not got or not want:
        return float(got == want)
    common = sum(min(got.count(w), want.count(w)) for w in set(got))
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------------------
# Optional external judge


JUDGE_INSTRUCTIONS = ("You grade a chat assistant's reply against a reference answer. Reply with only an integer "
                      "from 1 (wrong or useless) to 10 (correct and as good as the reference).")


def parse_score(text, source):
    found = re.search(r"-?\d+(?:\.\d+)?", text)
    if not found:
        raise RuntimeError(f"{source} returned no score: {text.strip()[:200]!r}")
    return float(found.group())


def judge_with_command(cmd, row, timeout):
    """Run cmd (split like a shell would, not through a shell) with the row as JSON on stdin; its stdout's first
    number is the score."""
    payload = json.dumps({k: row[k] for k in ("prompt", "reference", "response")})
    try:
        p = subprocess.run(shlex.split(cmd), input=payload, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"judge command {cmd!r} failed: {e}") from None
    if p.returncode != 0:
        raise RuntimeError(f"judge command {cmd!r} exited {p.returncode}: {p.stderr.strip()[-500:]}")
    return parse_score(p.stdout, f"judge command {cmd!r}")


def judge_with_endpoint(url, model, row, timeout):
    """Ask an OpenAI-compatible chat-completions endpoint (base URL ending in /v1) for a 1-10 score."""
    question = (f"Conversation:\n{row['prompt']}\n\nReference answer:\n{row['reference']}\n\n"
                f"Assistant's reply:\n{row['response']}\n\nScore (1-10):")
    body = {"model": model, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "system", "content": JUDGE_INSTRUCTIONS}, {"role": "user", "content": question}]}
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    endpoint = url.rstrip("/") + "/chat/completions"
    request = urllib.request.Request(endpoint, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content = json.load(response)["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise RuntimeError(f"judge endpoint {endpoint} failed: {type(e).__name__}: {e}") from None
    return parse_score(content, f"judge endpoint {endpoint}")


def make_judge(cfg):
    """A function row -> score, or None when no judge is configured (the default)."""
    if cfg["judge_cmd"] and cfg["judge_url"]:
        raise ValueError("pass either --judge_cmd or --judge_url, not both")
    if cfg["judge_cmd"]:
        return lambda row: judge_with_command(cfg["judge_cmd"], row, cfg["judge_timeout"])
    if cfg["judge_url"]:
        if not cfg["judge_model"]:
            raise ValueError("--judge_url needs --judge_model (the model name the endpoint serves)")
        return lambda row: judge_with_endpoint(cfg["judge_url"], cfg["judge_model"], row, cfg["judge_timeout"])
    return None


# ----------------------------------------------------------------------------------------------------------------
# The run


def write_jsonl_atomic(path, rows):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".eval-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def score_rows(examples, replies, enc, judge=None):
    rows = []
    for (prompt_ids, reference), response in zip(examples, replies):
        row = {"prompt": enc.decode(prompt_ids), "reference": reference, "response": response,
               "exact_match": exact_match(response, reference), "f1": token_f1(response, reference)}
        if judge is not None:
            row["judge_score"] = judge(row)
        rows.append(row)
    return rows


def evaluate_replies(model, ckpt, cfg, device, dtype):
    enc = chat.get_encoder(ckpt.get("tokenizer", chat.TOKENIZER))
    judge = make_judge(cfg)  # configuration errors before the slow part
    examples = load_heldout(cfg["data"], ckpt.get("template", chat.TEMPLATE), enc)
    t0 = time.time()
    replies = generate_all(model, [ids for ids, _ in examples], cfg, resolve_stops(cfg, ckpt), device, dtype)
    seconds = time.time() - t0
    rows = score_rows(examples, replies, enc, judge)
    out = cfg["out"] or os.path.join(cfg["out_dir"], "eval_replies.jsonl")
    write_jsonl_atomic(out, rows)
    n, correct = len(rows), sum(r["exact_match"] for r in rows)
    summary = {"n": n, "exact_match": correct / n, "f1": sum(r["f1"] for r in rows) / n, "out": out,
               "generate_seconds": round(seconds, 2)}
    print(f"exact match: {100 * correct / n:.1f}% ({correct}/{n})")
    print(f"token F1: {summary['f1']:.3f}")
    if judge is not None:
        summary["judge_score"] = sum(r["judge_score"] for r in rows) / n
        print(f"judge score: {summary['judge_score']:.2f}")
    print(f"wrote {n} replies to {out} ({seconds:.1f}s)")
    return summary


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="eval.py")
    if not cfg["dataset"] and not cfg["data"]:
        raise ValueError("nothing to evaluate: pass --dataset=NAME_OR_DIR (val loss) and/or --data=FILE (replies)")
    model, ckpt, device = load_model(cfg)
    dtype = resolve_dtype(cfg["dtype"], device)
    summary = {}
    if cfg["dataset"]:
        loss, n_tokens = val_loss(model, cfg["dataset"], cfg["batch_size"], device, dtype)
        summary.update(val_loss=loss, perplexity=math.exp(min(loss, 700.0)), val_tokens=n_tokens)
        print(f"val loss {loss:.4f}, perplexity {summary['perplexity']:.2f} ({n_tokens:,} assistant tokens)")
    if cfg["data"]:
        summary.update(evaluate_replies(model, ckpt, cfg, device, dtype))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    configurator.run(main)
