"""Helpers shared by the test files (import as `helpers`; conftest.py puts tests/ and the repo on sys.path)."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
EOT = 50256


def script(name):
    return os.path.join(REPO, name)


# ---------------------------------------------------------------------------------------------------------------
# Input files


def write_records(path, records, raw_lines=None):
    """Write records to path: .jsonl one per line, .json as an indented array (records span several lines).
    raw_lines: {position: str} lines inserted verbatim into a .jsonl (for broken input). Returns the path."""
    path = str(path)
    if path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2, ensure_ascii=False)
        return path
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for pos, line in sorted((raw_lines or {}).items()):
        lines.insert(pos, line)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def chat_records(n=40):
    """Deterministic training conversations: single-turn user/assistant and multi-turn messages with a system."""
    records = []
    for i in range(n):
        if i % 4 == 3:
            records.append({"messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Name number {i}."},
                {"role": "assistant", "content": f"{i}"},
                {"role": "user", "content": f"And double it?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ]})
        else:
            records.append({"user": f"What is {i} plus {i + 1}?", "assistant": f"It is {2 * i + 1}."})
    return records


# ---------------------------------------------------------------------------------------------------------------
# Reading a prepared dataset


def read_split(folder, split):
    """The files prepare.py writes for one split, as numpy arrays."""
    return {
        "ids": np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=np.uint16).astype(np.int64),
        "mask": np.fromfile(os.path.join(folder, f"{split}_mask.bin"), dtype=np.uint8),
        "turns": np.load(os.path.join(folder, f"{split}_turns.npy")),
        "convs": np.load(os.path.join(folder, f"{split}_convs.npy")),
    }


def conversations(folder, split):
    """[(ids, mask)] per conversation of a split, as lists."""
    d = read_split(folder, split)
    ends = list(d["convs"][1:]) + [len(d["ids"])]
    return [(d["ids"][a:b].tolist(), d["mask"][a:b].tolist()) for a, b in zip(d["convs"], ends)]


def decode(ids):
    from chat_gpt2 import chat
    return chat.get_encoder().decode(list(ids))


def runs(ids, mask):
    """Decoded text of the maximal runs of mask 1 (learned) and of mask 0 (not learned), in order."""
    learned, other, start = [], [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            (learned if mask[start] else other).append(decode(ids[start:i]))
            start = i
    return learned, other


def all_texts(folder):
    """Decoded text of every conversation of both splits."""
    return [decode(ids) for split in ("train", "val") for ids, _ in conversations(folder, split)]


def read_meta(folder):
    with open(os.path.join(folder, "meta.json")) as f:
        return json.load(f)


def snapshot(folder):
    """{relative path: bytes} of every file below folder (hidden ones included)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training


def tiny_train_args(dataset, out_dir, **overrides):
    """Command-line flags for a tiny, fast from-scratch run (any key can be overridden)."""
    cfg = dict(init_from="scratch", dataset=dataset, out_dir=out_dir, n_layer=2, n_head=2, n_embd=32,
               block_size=32, batch_size=4, gradient_accumulation_steps=1, max_iters=6, eval_interval=3,
               eval_iters=2, log_interval=1, warmup_iters=2, learning_rate=1e-3, min_lr=1e-4, dropout=0.0,
               patience=0, device="cpu", dtype="float32", compile=False, wandb_log=False, sample_max_tokens=0)
    cfg.update(overrides)
    return [f"--{k}={v}" for k, v in cfg.items()]


def train_inprocess(argv):
    """Run train.main(argv) in this process and return what it printed. The SIGINT/SIGTERM handlers the training
    loop installs are put back afterwards, so Ctrl-C still reaches pytest."""
    import signal

    import train
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            train.main(list(argv))
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return out.getvalue()


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoints(out_dir):
    return sorted(n for n in os.listdir(out_dir) if n.startswith("finetuned_") and n.endswith(".pt"))


def load_ckpt(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Subprocesses


def env():
    e = dict(os.environ)
    e["WANDB_MODE"] = "offline"
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(args, cwd, timeout=240, check=True):
    """Run `python args...` (args[0] a script or -m) with this interpreter; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, *args], cwd=str(cwd), env=env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p
