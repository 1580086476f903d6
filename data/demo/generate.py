"""
Deterministic synthetic chat dataset for quick CPU demos.

Writes, in the basic chat schema (one JSON object per line,
{"user": "...", "assistant": "..."}):

    train.jsonl    ~5,000 training conversations
    heldout.jsonl  200 held-out prompts (assistant = the expected answer)

Usage:
    python data/demo/generate.py [--out_dir=data/demo] [--seed=1337] [--families=add,capital,...]

Design
------
Five task families (add, capital, convert, opposite, next), each with a small
fixed table of 25-30 items and six phrasing templates. An (item, template) pair
is a "combo". For every family 40 combos are held out: items are walked in a
shuffled order with templates assigned round-robin, so every item has at most
two held-out templates (all items have at least one) and each template is held
out for ~7 items. Held-out combos never appear in training, in any form. Every
held-out item still appears in training under its other (>= 4) phrasings, and
every template appears in training with the other items, so the held-out set
tests phrasing invariance, not new facts: each held-out answer is present in
training as the answer to the same item. Tables are kept small (142 facts in
all) so that a tiny model sees every fact ~30 times per epoch.

Answer format: one bare word or number, no trailing period, no extra words --
digits for numbers ("7", "180"), the city name for capitals ("Paris"), a
lowercase word for opposites ("cold"). Every answer is a single GPT-2 token
after the leading space of "Assistant: ".

Training prompts are sometimes wrapped with a short prefix/suffix
("Quick question: ...", "... Thanks.") for extra variety; held-out prompts are
always the plain template text. The full rendered conversation
"Human: {user}\\nAssistant: {assistant}\\n\\n" is ~12-22 GPT-2 tokens.

The output is fully determined by the seed (random.Random(seed)); the same seed
produces byte-identical files.
"""

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
from chat_gpt2.files import write_jsonl  # noqa: E402

HELDOUT_PER_FAMILY = 40
TRAIN_PER_FAMILY = 1000

# ---------------------------------------------------------------------------
# fixed item tables (kept small so that a tiny model sees every fact often;
# capitals and opposites are single GPT-2 tokens after a space)

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"),
    ("Spain", "Madrid"), ("Portugal", "Lisbon"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Greece", "Athens"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Canada", "Ottawa"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Turkey", "Ankara"), ("Australia", "Canberra"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("South Korea", "Seoul"),
]

# (plural unit, smaller plural unit, factor), quantities 1-9
CONVERSIONS = [("hours", "minutes", 60), ("feet", "inches", 12), ("weeks", "days", 7)]

# used in both directions
OPPOSITE_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"),
    ("day", "night"), ("happy", "sad"), ("open", "closed"), ("old", "young"),
    ("rich", "poor"), ("hard", "soft"), ("early", "late"), ("full", "empty"),
    ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"),
]

# ---------------------------------------------------------------------------
# families: name -> (templates, items); an item is (fields dict, answer str)


def _families():
    fams = {}

    add_items = [({"a": a, "b": b}, str(a + b)) for a in range(1, 6) for b in range(1, 6)]
    fams["add"] = ([
        "What is {a} plus {b}?",
        "Add {a} and {b}.",
        "Compute {a} + {b}.",
        "What is the sum of {a} and {b}?",
        "If you add {b} to {a}, what do you get?",
        "How much is {a} plus {b}?",
    ], add_items)

    cap_items = [({"c": c}, cap) for c, cap in CAPITALS]
    fams["capital"] = ([
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "Name the capital city of {c}.",
        "What city is {c}'s capital?",
        "Tell me the capital of {c}.",
        "The capital of {c} is which city?",
    ], cap_items)

    conv_items = [({"n": n, "big": big, "small": small}, str(n * f))
                  for big, small, f in CONVERSIONS for n in range(1, 10)]
    fams["convert"] = ([
        "How many {small} are in {n} {big}?",
        "Convert {n} {big} to {small}.",
        "{n} {big} is how many {small}?",
        "How many {small} make up {n} {big}?",
        "Express {n} {big} in {small}.",
        "What is {n} {big} in {small}?",
    ], conv_items)

    opp_items = [({"w": w}, o) for x, y in OPPOSITE_PAIRS for w, o in ((x, y), (y, x))]
    fams["opposite"] = ([
        "What is the opposite of {w}?",
        "Give the antonym of {w}.",
        "What word means the opposite of {w}?",
        "Name the opposite of the word {w}.",
        "Which word is the opposite of {w}?",
        "What is the antonym of {w}?",
    ], opp_items)

    next_items = [({"n": n}, str(n + 1)) for n in range(1, 31)]
    fams["next"] = ([
        "What number comes after {n}?",
        "Which number follows {n}?",
        "What is the next number after {n}?",
        "Count up by one from {n}.",
        "What number is one more than {n}?",
        "What comes right after {n}?",
    ], next_items)

    return fams


PREFIXES = ["Quick question: ", "Please answer: ", "Hi! ", "I need help. "]
SUFFIXES = [" Thanks.", " Please answer briefly.", " Just the answer."]


def _wrap(rng, text):
    r = rng.random()
    if r < 0.15:
        return rng.choice(PREFIXES) + text
    if r < 0.30:
        return text + rng.choice(SUFFIXES)
    return text


def generate(seed: int = 1337, families=None):
    """Return (train_records, heldout_records); records are {"user", "assistant"} dicts. families:
    keep only these (the records of the others are drawn all the same, so a family's records do not
    depend on the choice)."""
    unknown = set(families or ()) - set(_families())
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}: choose from {','.join(_families())}")
    rng = random.Random(seed)
    train, heldout = [], []
    for fam, (templates, items) in _families().items():
        n_t = len(templates)
        # choose held-out combos: walk the items in a shuffled order, round-robin
        # over templates; after each full pass over the items shift the template
        # by one so no combo repeats. Each item loses at most
        # ceil(HELDOUT_PER_FAMILY / n_items) <= 2 of its templates, every
        # template is held out for ~HELDOUT_PER_FAMILY / n_t items.
        n_i = len(items)
        assert HELDOUT_PER_FAMILY <= 2 * n_i and n_t >= 4
        order = list(range(n_i))
        rng.shuffle(order)
        t_offset = rng.randrange(n_t)
        held = {}  # (item index, template index) -> True
        for k in range(HELDOUT_PER_FAMILY):
            held[(order[k % n_i], (t_offset + k + k // n_i) % n_t)] = True
        assert len(held) == HELDOUT_PER_FAMILY
        for i, t in sorted(held, key=lambda it: (it[1], it[0])):
            fields, ans = items[i]
            heldout.append({"user": templates[t].format(**fields), "assistant": ans, "family": fam})
        # training combos: everything not held out
        combos = [(i, t) for i in range(n_i) for t in range(n_t) if (i, t) not in held]
        # every training combo at least once, then fill uniformly at random
        picks = list(combos)
        if len(picks) < TRAIN_PER_FAMILY:
            picks += [rng.choice(combos) for _ in range(TRAIN_PER_FAMILY - len(picks))]
        for i, t in picks:
            fields, ans = items[i]
            train.append({"user": _wrap(rng, templates[t].format(**fields)), "assistant": ans, "family": fam})
    rng.shuffle(train)
    rng.shuffle(heldout)
    return _keep(train, families), _keep(heldout, families)


def _keep(records, families):
    """The records of the wanted families (all when None), without their family tag."""
    return [{"user": r["user"], "assistant": r["assistant"]} for r in records
            if not families or r["family"] in families]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--families", default=",".join(_families()), help="comma-separated subset of the families")
    args = p.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    try:
        train, heldout = generate(args.seed, families)
    except ValueError as e:
        p.error(str(e))
    write_jsonl(os.path.join(args.out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "heldout.jsonl"), heldout)
    fams = ",".join(families)
    print(f"demo data: train.jsonl={len(train)} heldout.jsonl={len(heldout)} "
          f"families={fams} seed={args.seed} out_dir={args.out_dir}")


if __name__ == "__main__":
    main()
