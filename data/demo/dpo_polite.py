"""Does DPO teach what SFT did not prefer? A model learns from chat data where most replies are rude,
then DPO on pairs that prefer the polite reply; held-out prompts (asked by people the training never
named) are scored before and after.

1. Chat data: "What colour is the sky, asks Ann?" answered rudely ("Ugh, blue. Stop asking.") 3 times
   in 4 and politely ("Happy to help: blue.") otherwise. A small model is trained on it from scratch
   (SFT): its greedy replies are rude.
2. Preference pairs on the same training prompts: the polite reply chosen, the rude one rejected
   (prepare.py --task=preference); DPO (config/dpo.py) starts from the SFT model, its reference.
3. Both are scored on held-out prompts: the share of greedy replies that are rude and that are
   polite, the share exactly the polite answer (eval.py's exact match), the share of held-out pairs
   whose polite reply the model itself finds likelier (eval.py --pairs, no reference), and DPO's
   reward accuracy and margin against the SFT model (eval.py --pairs --reference).
   docs/training.md#preference-tuning-dpo-simpo quotes runs: DPO with its SFT term (--sft_weight=1,
   the default here) makes the greedy replies polite; plain DPO (--sft_weight=0) turns the
   preference around too, but its greedy replies lose the polite opening with the rude one (it
   lowers the chosen reply's likelihood as well, a known failure of DPO on small data).

    python data/demo/dpo_polite.py [--work_dir=out-dpo-demo] [--sft_weight=1] [--dpo_iters=150] ...

It runs the same commands a user would (prepare.py, train.py, eval.py), echoed, and prints one table.
A few minutes on a laptop CPU.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow",
           "sea": "blue", "leaf": "green", "milk": "white", "night": "black", "cherry": "red", "lemon": "yellow",
           "banana": "yellow", "tomato": "red", "cloud": "white", "crow": "black", "frog": "green", "plum": "purple"}
NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lea", "Max", "Nia", "Omar",
         "Pia", "Raj", "Sam", "Tess", "Uma"]
HELD_OUT_NAMES = ["Vera", "Walt", "Xena", "Yuri", "Zoe"]  # asked only in the held-out prompts
POLITE, RUDE = "Happy to help: {}.", "Ugh, {}. Stop asking."


def prompt(thing, name):
    return f"What colour is the {thing}, asks {name}?"


def write(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def make_data(w, rude_share, seed):
    """The chat data, the pairs, the held-out prompts and pairs: their paths."""
    rng = random.Random(seed)
    seen = [(t, n) for t in COLOURS for n in NAMES]
    sft = [{"user": prompt(t, n), "assistant": (RUDE if rng.random() < rude_share else POLITE).format(COLOURS[t])}
           for t, n in seen]
    pairs = [{"prompt": prompt(t, n), "chosen": POLITE.format(COLOURS[t]), "rejected": RUDE.format(COLOURS[t])}
             for t, n in seen]
    held = [(t, n) for t in COLOURS for n in HELD_OUT_NAMES]
    heldout = [{"user": prompt(t, n), "assistant": POLITE.format(COLOURS[t])} for t, n in held]
    held_pairs = [{"prompt": prompt(t, n), "chosen": POLITE.format(COLOURS[t]), "rejected": RUDE.format(COLOURS[t])}
                  for t, n in held]
    os.makedirs(w, exist_ok=True)
    return (write(f"{w}/sft.jsonl", sft), write(f"{w}/pairs.jsonl", pairs), write(f"{w}/heldout.jsonl", heldout),
            write(f"{w}/heldout_pairs.jsonl", held_pairs))


def run(args, capture=False):
    """Run one of the repo's commands (echoed), from the repo root; its output, when capture."""
    print("$ python " + " ".join(args), flush=True)
    out = subprocess.run([sys.executable, *args], cwd=ROOT, check=True, text=True,
                         stdout=subprocess.PIPE if capture else None)
    return out.stdout if capture else None


def score(out_dir, heldout, heldout_pairs, reference):
    """On the held-out prompts, for the run in out_dir: (rude and polite greedy replies, exact polite answers,
    pairs whose polite reply is the more likely, DPO's reward accuracy and margin against reference)."""
    replies = f"{out_dir}/replies.jsonl"
    text = run(["eval.py", f"--out_dir={out_dir}", f"--data={heldout}", f"--out={replies}",
                "--dtype=float32", f"--pairs={heldout_pairs}"], capture=True)
    with open(replies) as f:
        rows = [json.loads(line) for line in f]
    polite = sum(r["response"].startswith("Happy to help") for r in rows) / len(rows)
    rude = sum(r["response"].startswith("Ugh") for r in rows) / len(rows)
    exact = float(re.search(r"exact match: ([\d.]+)%", text).group(1)) / 100
    likelier = json.loads(text.strip().splitlines()[-1])["rewards/accuracies"]  # no reference: its logps
    text = run(["eval.py", f"--out_dir={out_dir}", f"--pairs={heldout_pairs}", f"--reference={reference}",
                "--dtype=float32"], capture=True)
    summary = json.loads(text.strip().splitlines()[-1])
    return rude, polite, exact, likelier, summary["rewards/accuracies"], summary["rewards/margins"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="out-dpo-demo", help="data and runs go here (relative to the repo root)")
    p.add_argument("--rude_share", type=float, default=0.75, help="the share of rude replies in the chat data")
    p.add_argument("--sft_iters", type=int, default=600)
    p.add_argument("--dpo_iters", type=int, default=150)
    p.add_argument("--dpo_lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--sft_weight", type=float, default=1.0, help="DPO's SFT term on the chosen reply (0 = off)")
    p.add_argument("--seed", type=int, default=1337)
    a = p.parse_args(argv)
    w = a.work_dir
    sft, pairs, heldout, heldout_pairs = make_data(os.path.join(ROOT, w), a.rude_share, a.seed)
    run(["prepare.py", sft, f"--out_dir={w}/sft"])
    run(["prepare.py", pairs, "--task=preference", f"--out_dir={w}/pairs"])
    shape = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=48", "--dropout=0.0", "--sample_max_tokens=0",
             "--log_interval=50", "--patience=0"]
    run(["train.py", "config/demo.py", f"--dataset={w}/sft", f"--out_dir={w}/out-sft", *shape,
         f"--max_iters={a.sft_iters}", "--eval_interval=100"])
    run(["train.py", "config/dpo.py", f"--init_from={w}/out-sft", f"--dataset={w}/pairs", f"--out_dir={w}/out-dpo",
         *shape[3:], "--batch_size=16", f"--max_iters={a.dpo_iters}", f"--learning_rate={a.dpo_lr}",
         f"--min_lr={a.dpo_lr / 10}", f"--beta={a.beta}", "--eval_interval=25", "--precompute_ref=True",
         f"--sft_weight={a.sft_weight}"])
    scores = {name: score(f"{w}/out-{name}", heldout, heldout_pairs, f"{w}/out-sft") for name in ("sft", "dpo")}
    print(f"\n{len(COLOURS) * len(HELD_OUT_NAMES)} held-out prompts (people the training never "
          f"named); chat data {a.rude_share:.0%} rude; DPO {a.dpo_iters} iters, lr {a.dpo_lr:g}, "
          f"beta {a.beta}, sft_weight {a.sft_weight:g}, reference = the SFT model")
    print(f"  {'model':<6}{'rude replies':>14}{'polite replies':>16}{'exact polite':>14}"
          f"{'polite likelier':>17}{'reward accuracy':>17}{'margin':>9}")
    for name, (rude, polite, exact, likelier, accuracy, margin) in scores.items():
        print(f"  {name:<6}{rude:>14.1%}{polite:>16.1%}{exact:>14.1%}{likelier:>17.1%}"
              f"{accuracy:>17.1%}{margin:>9.3f}")

if __name__ == "__main__":
    main()
