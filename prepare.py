"""Turn chat data into the memmaps train.py reads.

    python prepare.py INPUT [INPUT ...] [--out_dir=data/chat] [--val_fraction=0.1] [--val_file=FILE] [--seed=1337]
    python prepare.py path/to/input.txt --out_dir=data/shakespeare      # plain text (see docs/data.md)

Each INPUT is a .jsonl file (one record per line) or a .json file holding an array of records, in any of these
schemas (recognised per record by its keys; metadata keys such as "id" are ignored, see docs/data.md):
    {"user", "assistant"}                      {"messages": [{"role", "content"}, ...], optional "system"}
    {"instruction", "input", "output"}         {"conversations": [{"from", "value"}, ...], optional "system"}
    {"prompt", "completion"}                   {"question", "answer"}
    OpenAssistant trees {"message_tree_id", "prompt": {"role": "prompter", "text", "replies": [...]}}
The conversation is rendered with --template (human_assistant, alpaca, chatml, or a JSON file; docs/data.md).
Plain text instead (every token learned, documents closed by <|endoftext|>): .txt files (one document each) or
records {"text": ...}; text and chat inputs cannot be mixed in one dataset.

Writes into out_dir, all aligned token for token:
    train.bin / val.bin               uint16 GPT-2 token ids (np.memmap(path, dtype=np.uint16, mode="r"))
    train_mask.bin / val_mask.bin     uint8, 1 where the assistant's output is learned (see chat_gpt2/chat.py)
    train_turns.npy / val_turns.npy   int64 offsets where a turn starts (training windows start only there)
    train_convs.npy / val_convs.npy   int64 offsets where a conversation starts
    meta.json                         tokenizer, vocab size, template, counts, multiline_replies, source hashes
Labelled text for a classifier instead (--task=classify; docs/classification.md): .csv / .tsv / .jsonl / .json with
a text and a label column (--text_column, --label_column, --labels, --balance), split train/val/test by class.
Everything is written to a temporary folder first and moved into place at the end, so a failed or interrupted run
never leaves a half-written dataset or damages one that was there.
"""
import argparse
import difflib
import sys

import configurator
from chat_gpt2.build import build_dataset
from chat_gpt2.errors import RecordError, UserError


def print_summary(meta):
    c, t = meta["conversations"], meta["tokens"]
    skipped = ", ".join(f"{n} {reason}" for reason, n in meta["skipped"].items()) or "none"
    if meta.get("kind") == "text":  # every token learned, windows start anywhere: lengths do not matter
        print(f"plain text: {meta['documents']:,} document(s) read, skipped: {skipped}; tokens: "
              f"{t['train']:,} train / {t['val']:,} val (every token learned)")
        return
    print(f"conversations: {c['train'] + c['val']:,} read ({c['train']:,} train / {c['val']:,} val), "
          f"skipped: {skipped}")
    print(f"tokens: {t['train']:,} train / {t['val']:,} val; conversation length "
          + ", ".join(f"{k} {v}" for k, v in meta["length_percentiles"].items()))
    print("conversations longer than block_size: "
          + ", ".join(f"{b}: {n}" for b, n in meta["longer_than_block_size"].items()))
    print(f"share of tokens learned (loss mask = 1): {meta['learned_token_share']:.1%}; "
          f"multi-line replies: {meta['multiline_replies']}")
    total, too_long = c["train"] + c["val"], meta["longer_than_block_size"]
    if too_long["128"] * 2 > total:  # train.py's default block_size would cut most conversations
        fits = [b for b, n in too_long.items() if n * 10 <= total]
        print(f"note: {too_long['128']:,} of {total:,} conversations are longer than block_size 128 (train.py's "
              f"default): windows cut them, and a reply beyond the window is not learned; "
              + (f"train with --block_size={fits[0]} (90% fit)" if fits else "even 1024 cuts more than 10%"))


def print_classify_summary(meta, out_dir):
    skipped = ", ".join(f"{n} {reason}" for reason, n in meta["skipped"].items()) or "none"
    print(f"rows: {meta['rows']['read']:,} read, {meta['rows']['used']:,} used, skipped: {skipped}"
          + ("; classes downsampled to the smallest (--balance)" if meta["balanced"] else ""))
    print(f"columns: text {meta['columns']['text']} (joined with {meta['columns']['join']!r}), label "
          f"{meta['columns']['label']!r}; labels: {', '.join(meta['labels'])}")
    for split, counts in meta["class_counts"].items():
        print(f"  {split}: {meta['examples'][split]:,} examples ("
              + ", ".join(f"{label} {n:,}" for label, n in counts.items()) + f"), {meta['tokens'][split]:,} tokens")
    print("tokens per example (with <|endoftext|>): " + ", ".join(f"{k} {v}" for k, v in
                                                                   meta["length_percentiles"].items()))
    print(f"wrote {out_dir}/{{train,val,test}}.bin, their offsets and labels, and meta.json")


def print_duplicates(meta):
    d = meta.get("duplicates", {})
    if d.get("repeats") or d.get("val_in_train"):
        print(f"duplicates: {d['repeats']:,} exact repeat(s) of an earlier conversation "
              + ("removed (--dedupe)" if d["removed"] else "kept (--dedupe drops them)")
              + f"; {d['val_in_train']:,} val conversation(s) also in train")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=".jsonl or .json records (chat, or {\"text\"} documents), or .txt plain text")
    parser.add_argument("--out_dir", default="data/chat", help="the dataset folder to write (train.py --dataset)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="the share of conversations (or text) for val")
    parser.add_argument("--val_file", default=None, help="take val from this file instead of splitting")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the train/val/test split")
    parser.add_argument("--template", default="human_assistant",
                        help="human_assistant, alpaca, chatml, or a JSON file with the same fields")
    parser.add_argument("--oasst_paths", default="best", choices=("best", "all"),
                        help="OpenAssistant trees: the best-ranked branch, or every path ending on a reply")
    parser.add_argument("--test_fraction", type=float, default=None,
                        help="chat: hold out about this share of the conversations to OUT_DIR/test.jsonl (eval.py "
                             "--data), 0 if not given; classify: the test split's share, 0.2 if not given")
    parser.add_argument("--task", default="chat", choices=("chat", "classify"),
                        help="chat (chat records or plain text) or classify (labelled text: .csv/.tsv/.jsonl/.json)")
    parser.add_argument("--text_column", default="", help="classify: the text column(s), names or 0-based indexes")
    parser.add_argument("--label_column", default="", help="classify: the label column, a name or 0-based index")
    parser.add_argument("--labels", default="", help="classify: the allowed labels, comma-separated (in this order)")
    parser.add_argument("--balance", action="store_true", help="classify: downsample every class to the smallest")
    parser.add_argument("--dedupe", action="store_true", help="drop exact repeats of a conversation (counted)")
    parser.add_argument("--skip_invalid", action="store_true", help="skip bad records (counted) instead of failing")
    return parser


def parse_args(argv):
    """Options as argparse reads them, with the closest known option suggested for a misspelt one."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [o for action in parser._actions for o in action.option_strings]
        name = unknown[0].partition("=")[0]
        close = difflib.get_close_matches(name, known, n=1)
        parser.error(f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close else ""))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.task == "classify":
        return prepare_classify(args)
    try:
        meta = build_dataset(args.inputs, args.out_dir, args.val_fraction, args.val_file, args.seed, args.skip_invalid,
                             args.template, args.oasst_paths, args.dedupe, args.test_fraction or 0.0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, RecordError):
            print("(pass --skip_invalid to skip such records; nothing was written)", file=sys.stderr)
        return 1
    print_summary(meta)
    print_duplicates(meta)
    if "test" in meta:
        print(f"held out {meta['test']['conversations']:,} conversation(s) to {args.out_dir}/test.jsonl "
              f"(eval.py --data={args.out_dir}/test.jsonl)")
    print(f"wrote {args.out_dir}/{{train,val}}.bin and their masks, offsets and meta.json")
    return 0


def prepare_classify(args):
    from chat_gpt2.classify_data import build_classify_dataset  # imports torch (seconds): only this task needs it
    if args.val_file:
        print("error: --val_file is for chat data: --task=classify splits train/val/test by class", file=sys.stderr)
        return 1
    try:
        meta = build_classify_dataset(args.inputs, args.out_dir, args.text_column, args.label_column, args.labels,
                                      args.balance, args.val_fraction,
                                      0.2 if args.test_fraction is None else args.test_fraction, args.seed,
                                      args.skip_invalid)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, RecordError):
            print("(pass --skip_invalid to skip such rows; nothing was written)", file=sys.stderr)
        return 1
    print_classify_summary(meta, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(configurator.run(main))
