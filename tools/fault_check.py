"""Kill prepare.py and train.py with SIGKILL at random moments and check what they leave behind.

    python tools/fault_check.py --kills=30 --data=path/to/chats.jsonl [--seed=0] [--what=prepare,train]

prepare.py: alternately rebuilds a dataset from two inputs and is killed after a random delay (up to the time a whole
run takes, so every step gets hit, renames included). After each kill the folder must load as exactly the old or the
new dataset (never a mix, never an error), and after the next start (`clean_out_dir`) no leftover may remain.
train.py: a tiny run with frequent checkpoints is killed after a random delay. Every checkpoint file must load with
torch.load(weights_only=True) and hold finite weights, the next `--init_from=resume` must start, and no temporary
file may remain after that start. Prints one line per kill and a summary; exits 1 if anything was wrong.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from chat_gpt2 import build, dataset  # noqa: E402
from chat_gpt2.errors import UserError  # noqa: E402


def run_killed(args, delay, cwd):
    """Start `python args...`, SIGKILL it after delay seconds (unless it finished). Returns True if it was killed."""
    p = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return True


def contents(folder):
    """The dataset's token streams, or the error loading it gives."""
    try:
        data, _ = dataset.load_dataset(folder)
    except UserError as e:
        return f"error: {e}"
    return tuple(bytes(data[s].ids) + bytes(data[s].mask) for s in dataset.SPLITS)


def leftovers(folder):
    current = os.readlink(os.path.join(folder, dataset.CURRENT)) if os.path.islink(
        os.path.join(folder, dataset.CURRENT)) else None
    return [n for n in os.listdir(folder) if ".tmp" in n or (n.startswith(".prepare-") and n != current)]


def check_prepare(inputs, kills, rng, work):
    out = os.path.join(work, "data")
    references = []
    for i, src in enumerate(inputs):
        build.build_dataset([src], out_dir=os.path.join(work, f"ref{i}"))
        references.append(contents(os.path.join(work, f"ref{i}")))
    build.build_dataset([inputs[0]], out_dir=out)
    full = 600.0
    for src in inputs:  # a whole run's time (the faster of two): kill delays are drawn below it
        t0 = time.time()
        run_killed([os.path.join(ROOT, "prepare.py"), src, f"--out_dir={out}"], 600, work)
        full = min(full, time.time() - t0)
    bad = killed_count = 0
    for k in range(kills):
        delay = rng.uniform(0, 0.95 * full)
        killed = run_killed([os.path.join(ROOT, "prepare.py"), inputs[k % 2], f"--out_dir={out}"], delay, work)
        killed_count += killed
        seen = contents(out)
        build.clean_out_dir(out)  # what the next prepare.py does first
        left = leftovers(out)
        ok = seen in references and contents(out) in references and not left
        bad += not ok
        print(f"prepare kill {k + 1}: after {delay:.2f}s of {full:.2f}s, {'killed' if killed else 'finished'}; "
              f"{'old or new dataset' if seen in references else seen}; leftovers after the next start: {left}")
    print(f"prepare: {killed_count} of {kills} runs killed before they finished")
    return bad


def check_checkpoints(out):
    """Problems with the checkpoint files in out: unreadable, or non-finite weights."""
    problems = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".pt"):
            try:
                ckpt = torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)
                if not all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point()):
                    problems.append(f"{name}: non-finite weights")
            except Exception as e:
                problems.append(f"{name}: {type(e).__name__}: {e}")
    return problems


def check_train(data, kills, rng, work):
    folder = os.path.join(work, "train-data")
    build.build_dataset([data], out_dir=folder)
    args = [os.path.join(ROOT, "train.py"), f"--dataset={folder}", "--init_from=scratch", "--n_layer=2", "--n_head=2",
            "--n_embd=64", "--block_size=64", "--batch_size=8", "--max_iters=100000", "--eval_interval=5",
            "--eval_iters=2", "--log_interval=5", "--sample_max_tokens=0", "--device=cpu", "--dtype=float32",
            "--compile=False", "--patience=0"]
    bad = 0
    for k in range(kills):
        out = os.path.join(work, "out")
        first = not os.path.isdir(out)
        delay = rng.uniform(3, 12)
        run_killed(args + [f"--out_dir={out}"] + ([] if first else ["--init_from=resume"]), delay, work)
        problems = check_checkpoints(out) if os.path.isdir(out) else []
        started = True
        if os.path.isdir(out) and any(n.endswith("_last.pt") for n in os.listdir(out)):
            # the next start: it must resume and clean up, here killed after it has had time to start
            run_killed(args + [f"--out_dir={out}", "--init_from=resume", "--max_iters=1"], 60, work)
            started = os.path.isfile(os.path.join(out, "metrics.jsonl"))
        left = [n for n in os.listdir(out) if ".tmp" in n] if os.path.isdir(out) else []
        ok = not problems and not left and started
        bad += not ok
        print(f"train kill {k + 1}: after {delay:.1f}s; checkpoint problems: {problems}; leftovers after the next "
              f"start: {left}")
    return bad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a chat file (.jsonl / .json) to prepare and train on")
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--what", default="prepare,train")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as work:
        with open(args.data, "rb") as f:  # a second input: the same records, reversed
            lines = f.read().splitlines()
        if args.data.endswith(".json"):
            lines = [json.dumps(r).encode() for r in json.loads(b"\n".join(lines))]
        other = os.path.join(work, "other.jsonl")
        with open(other, "wb") as f:
            f.write(b"\n".join(reversed(lines)) + b"\n")
        bad = {}
        if "prepare" in args.what:
            bad["prepare"] = check_prepare([args.data, other], args.kills, rng, work)
        if "train" in args.what:
            bad["train"] = check_train(args.data, args.kills, rng, work)
    print("summary: " + ", ".join(f"{what}: {args.kills} kills, {n} with a corrupted or mixed output or a leftover"
                                  for what, n in bad.items()))
    sys.exit(1 if any(bad.values()) else 0)


if __name__ == "__main__":
    main()
