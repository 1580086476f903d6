"""Does LoRA learn, not just run? Teach a trained model a family of
facts it never saw, with an adapter only.

1. A base model is trained from scratch (config/demo.py) on four of the demo's five families.
2. A LoRA adapter is trained on top of that frozen base on the fifth family, plus a replay of
   --replay records of the old families: trained on one family alone, an adapter forgets the others,
   since nothing in its data asks it to keep them (docs/performance.md).
3. Both are scored on every family's held-out prompts (eval.py's exact match): the new family
   should go from near 0 to most of it right, while the old families stay where they were.

The new family is `add` by default: its words are numbers that the other families use too. LoRA
leaves the token embeddings frozen, so words a from-scratch base never saw (the countries and cities
of `capital`, say) keep their random initial vectors, which an adapter can hardly tell apart; a
pretrained base knows every token.

    python data/demo/lora_new_family.py [--new_family=add] [--work_dir=out-lora-demo] [--lora_rank=8] ...

It runs the same commands a user would (generate.py, prepare.py, train.py, eval.py) and prints
one table; every command is echoed. A few minutes on a laptop CPU (most of it the base model).
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = ("add", "capital", "convert", "opposite", "next")


def run(args, capture=False):
    """Run one of the repo's commands (echoed), from the repo root; its output, when capture."""
    print("$ python " + " ".join(args), flush=True)
    out = subprocess.run([sys.executable, *args], cwd=ROOT, check=True, text=True,
                         stdout=subprocess.PIPE if capture else None)
    return out.stdout if capture else None


def exact_match(out_dir, heldout):
    """eval.py's exact match (0..1) of the run in out_dir on a held-out file."""
    text = run(["eval.py", f"--out_dir={out_dir}", f"--data={heldout}", f"--out={out_dir}/replies.jsonl",
                "--dtype=float32"], capture=True)
    return float(re.search(r"exact match: ([\d.]+)%", text).group(1)) / 100


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new_family", default="add", choices=FAMILIES, help="the family only the adapter sees")
    p.add_argument("--replay", type=int, default=1000, help="records of the old families mixed into the adapter's data")
    p.add_argument("--work_dir", default="out-lora-demo", help="data and runs go here (relative to the repo root)")
    p.add_argument("--base_iters", type=int, default=1200, help="max_iters of the base model")
    p.add_argument("--lora_iters", type=int, default=600, help="max_iters of the adapter")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--lora_lr", type=float, default=2e-3, help="the adapter's learning rate")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    w = a.work_dir
    old = [f for f in FAMILIES if f != a.new_family]
    for name, fams in (("base", old), ("new", [a.new_family]), *((f"held-{f}", [f]) for f in FAMILIES)):
        run(["data/demo/generate.py", f"--out_dir={w}/{name}", f"--families={','.join(fams)}"])
    with open(f"{w}/base/train.jsonl") as f, open(f"{w}/new/replay.jsonl", "w") as out:  # shuffled: all families
        out.writelines(line for _, line in zip(range(a.replay), f))
    run(["prepare.py", f"{w}/base/train.jsonl", f"--out_dir={w}/base"])
    run(["prepare.py", f"{w}/new/train.jsonl", f"{w}/new/replay.jsonl", f"--out_dir={w}/new"])
    start = time.time()
    run(["train.py", "config/demo.py", f"--dataset={w}/base", f"--out_dir={w}/out-base",
         f"--max_iters={a.base_iters}"])
    base_minutes = (time.time() - start) / 60
    scores = {"base": {f: exact_match(f"{w}/out-base", f"{w}/held-{f}/heldout.jsonl") for f in FAMILIES}}
    start = time.time()
    run(["train.py", "config/demo.py", f"--init_from={w}/out-base", f"--dataset={w}/new", f"--out_dir={w}/out-lora",
         f"--lora_rank={a.lora_rank}", f"--lora_alpha={a.lora_alpha}", f"--learning_rate={a.lora_lr}",
         f"--min_lr={a.lora_lr / 10}", f"--max_iters={a.lora_iters}", "--warmup_iters=20", "--weight_decay=0"])
    lora_minutes = (time.time() - start) / 60
    scores["base + LoRA"] = {f: exact_match(f"{w}/out-lora", f"{w}/held-{f}/heldout.jsonl") for f in FAMILIES}
    print(f"\nheld-out exact match per family (40 prompts each); new family: {a.new_family}; "
          f"base {base_minutes:.1f} min, adapter {lora_minutes:.1f} min (LoRA rank {a.lora_rank}, {a.replay} replayed)")
    print(f"  {'model':<13}" + "".join(f"{f + ('*' if f == a.new_family else ''):>10}" for f in FAMILIES))
    for model, row in scores.items():
        print(f"  {model:<13}" + "".join(f"{row[f]:>10.1%}" for f in FAMILIES))
    new, kept = scores["base + LoRA"][a.new_family], min(scores["base + LoRA"][f] for f in old)
    print(f"new family {scores['base'][a.new_family]:.1%} -> {new:.1%}; lowest old family {kept:.1%}")


if __name__ == "__main__":
    main()
