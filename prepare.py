"""Turn chat data into the memmaps train.py reads.

    python prepare.py INPUT [INPUT ...] [--out_dir=data/chat] [--val_fraction=0.1] \
        [--val_file=FILE] [--seed=1337]
    python prepare.py path/to/input.txt --out_dir=data/shakespeare  # plain text (see docs/data.md)

Each INPUT is a .jsonl file (one record per line) or a .json file holding an array of records, in
any of these schemas (recognised per record by its keys; metadata keys such as "id" are ignored, see
docs/data.md):
    {"user", "assistant"}               {"instruction", "input", "output"}
    {"prompt", "completion"}            {"question", "answer"}
    {"messages": [{"role", "content"}, ...], optional "system"}
    {"conversations": [{"from", "value"}, ...], optional "system"}
    {"message_tree_id", "prompt": {"role": "prompter", "text", "replies": [...]}}  (OpenAssistant)
The conversation is rendered with --template (human_assistant, alpaca, chatml, chatml_special, or a JSON file;
docs/data.md). Plain text instead (every token learned, documents closed by <|endoftext|>): .txt
files (one document each) or records {"text": ...} (or the --text_column keys of each record);
text and chat inputs cannot be mixed in one dataset. A .parquet file's rows are records (its
columns the keys), streamed a batch of rows at a time; a Hugging Face Hub dataset is named
hf://datasets/OWNER/NAME[@REVISION][/GLOB] (its parquet files, downloaded to the Hub cache):
    python prepare.py 'hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet' \\
        --text_column=text --out_dir=data/fineweb_edu

Writes into out_dir, all aligned token for token (dataset format 2, docs/data.md):
    {train,val}.bin        token ids in meta.json's token_dtype: uint16 (GPT-2), uint32 above 65,536
    {train,val}_mask.bin   uint8, 1 where the assistant's output is learned (chat_gpt2/chat.py);
                           chat data only: plain text learns every token and has no mask file
    {train,val}_turns.npy  int64 offsets where a turn starts (training windows start only there)
    {train,val}_convs.npy  int64 offsets where a conversation starts
    meta.json              format, token_dtype, kind, tokenizer, vocab size, template, counts,
                           multiline_replies, source hashes
A tokenizer instead (--task=tokenizer --vocab_size=8192 [--special_tokens=A,B]): a byte-level BPE
trained on the inputs' text (chat records as the template renders them), written to
out_dir/tokenizer.json; prepare data with it by --tokenizer=DIR (docs/data.md, "Your own
tokenizer"); the dataset then holds a copy of it.
Labelled text for a classifier instead (--task=classify; docs/classification.md): .csv / .tsv /
.jsonl / .json with a text and a label column (--text_column, --label_column, --labels, --balance),
split train/val/test by class. Preference pairs instead (--task=preference, for DPO; docs/data.md):
{prompt, chosen, rejected} (strings or message lists), Alpaca {instruction, input, chosen,
rejected} or two HH-RLHF transcripts {chosen, rejected}. Everything is written to a temporary folder first and moved into
place at the end, so a failed or interrupted run never leaves a half-written dataset or damages one
that was there.
"""
import os
import sys
import time

import configurator
from chat_gpt2.build import build_dataset, corpus_texts, train_bpe
from chat_gpt2.errors import ConfigError, RecordError, UserError
from chat_gpt2.sources import expand_inputs
from chat_gpt2.tokenizer import load_tokenizer, write_tokenizer

DEFAULTS = dict(  # `python prepare.py --help` prints these comments
    # the input files (positional arguments): .jsonl / .json records, .txt; classify: .csv, .tsv
    inputs=[],
    out_dir="data/chat",  # the dataset folder to write (train.py --dataset)
    val_fraction=0.1,  # the share of conversations (or text) for val
    val_file="",  # take val from this file instead of splitting ("" = split the inputs)
    seed=1337,  # seed of the train/val/test split
    # human_assistant, alpaca, chatml, chatml_special (its markers as special tokens), or a JSON file
    template="human_assistant",
    # OpenAssistant trees: best (the best-ranked branch) or all (every path to a reply)
    oasst_paths="best",
    # chat: share held out to OUT_DIR/test.jsonl (None: 0); classify: test split (0.2)
    test_fraction=None,
    # chat (chat records or plain text), classify (labelled text, docs/classification.md),
    # preference (pairs of a chosen and a rejected response, for DPO: docs/data.md) or tokenizer
    # (train a byte-level BPE on the inputs: docs/data.md, "Your own tokenizer")
    task="chat",
    # text column(s), comma-separated: classify's (names or 0-based indexes); chat: plain text
    text_column="",
    label_column="",  # classify: the label column, a name or 0-based index
    labels="",  # classify: the allowed labels, comma-separated (in this order)
    balance=False,  # classify: downsample every class to the smallest
    dedupe=False,  # drop exact repeats of a conversation (counted either way)
    skip_invalid=False,  # skip bad records (counted) instead of failing
    threads=8,  # tiktoken's encoding threads for chat and text data (1: no parallel encoding)
    # chat / text: encode with gpt2 (GPT-2's BPE) or a tokenizer folder (--task=tokenizer made)
    tokenizer="gpt2",
    # tokenizer (train a byte-level BPE on the inputs, write out_dir/tokenizer.json: docs/data.md)
    vocab_size=8192,  # tokenizer: the tokens in all (bytes, merges and special tokens)
    special_tokens="",  # tokenizer: more special tokens beside <|endoftext|>, comma-separated
)
TASKS = ("chat", "classify", "preference", "tokenizer")
TOKENIZER_OUT_DIR = "tokenizer"  # --task=tokenizer's out_dir when none is given


def print_summary(meta):
    c, t = meta["conversations"], meta["tokens"]
    skipped = ", ".join(f"{n} {reason}" for reason, n in meta["skipped"].items()) or "none"
    # every token learned, windows start anywhere: lengths do not matter
    if meta.get("kind") == "text":
        print(f"plain text: {meta['documents']:,} document(s) read, skipped: {skipped}; tokens: "
              f"{t['train']:,} train / {t['val']:,} val (every token learned)")
        return
    print(f"conversations: {c['train'] + c['val']:,} read ({c['train']:,} train / {c['val']:,} "
          f"val), skipped: {skipped}")
    print(f"tokens: {t['train']:,} train / {t['val']:,} val; conversation length "
          + ", ".join(f"{k} {v}" for k, v in meta["length_percentiles"].items()))
    print("conversations longer than block_size: "
          + ", ".join(f"{b}: {n}" for b, n in meta["longer_than_block_size"].items()))
    print(f"share of tokens learned (loss mask = 1): {meta['learned_token_share']:.1%}; "
          f"multi-line replies: {meta['multiline_replies']}")
    total, too_long = c["train"] + c["val"], meta["longer_than_block_size"]
    if too_long["128"] * 2 > total:  # train.py's default block_size would cut most conversations
        fits = [b for b, n in too_long.items() if n * 10 <= total]
        print(f"note: {too_long['128']:,} of {total:,} conversations are longer than block_size "
              "128 (train.py's default): windows cut them, and a reply beyond the window is not "
              "learned; "
              + (f"train with --block_size={fits[0]} (90% fit)" if fits
                 else "even 1024 cuts more than 10%"))


def print_classify_summary(meta, out_dir):
    skipped = ", ".join(f"{n} {reason}" for reason, n in meta["skipped"].items()) or "none"
    print(f"rows: {meta['rows']['read']:,} read, {meta['rows']['used']:,} used, skipped: {skipped}"
          + ("; classes downsampled to the smallest (--balance)" if meta["balanced"] else ""))
    print(f"columns: text {meta['columns']['text']} (joined with {meta['columns']['join']!r}), "
          f"label {meta['columns']['label']!r}; labels: {', '.join(meta['labels'])}")
    for split, counts in meta["class_counts"].items():
        per_class = ", ".join(f"{label} {n:,}" for label, n in counts.items())
        print(f"  {split}: {meta['examples'][split]:,} examples ({per_class}), "
              f"{meta['tokens'][split]:,} tokens")
    print("tokens per example (with <|endoftext|>): "
          + ", ".join(f"{k} {v}" for k, v in meta["length_percentiles"].items()))
    print(f"wrote {out_dir}/{{train,val,test}}.bin, their offsets and labels, and meta.json")


def print_duplicates(meta):
    d = meta.get("duplicates", {})
    if d.get("repeats") or d.get("val_in_train"):
        print(f"duplicates: {d['repeats']:,} exact repeat(s) of an earlier conversation "
              + ("removed (--dedupe)" if d["removed"] else "kept (--dedupe drops them)")
              + f"; {d['val_in_train']:,} val conversation(s) also in train")


def main(argv=None):
    cfg, explicit = configurator.load(DEFAULTS, argv, prog="prepare.py", inputs="inputs")
    if not cfg["inputs"]:
        print("error: no input files: python prepare.py INPUT [INPUT ...] [--key=value ...] "
              "(see --help)", file=sys.stderr)
        return 2
    try:
        check_options(cfg)
        expand_hub_names(cfg)
        if cfg["task"] == "classify":
            return prepare_classify(cfg)
        if cfg["task"] == "preference":
            return prepare_preference(cfg)
        if cfg["task"] == "tokenizer":
            return prepare_tokenizer(cfg, "out_dir" in explicit)
        meta = build_dataset(cfg["inputs"], cfg["out_dir"], val_fraction=cfg["val_fraction"],
                             val_file=cfg["val_file"] or None, seed=cfg["seed"],
                             skip_invalid=cfg["skip_invalid"], template=cfg["template"],
                             oasst_paths=cfg["oasst_paths"], dedupe=cfg["dedupe"],
                             test_fraction=cfg["test_fraction"] or 0.0,
                             text_column=cfg["text_column"], threads=cfg["threads"],
                             tokenizer=load_tokenizer(cfg["tokenizer"]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, RecordError):
            rows = "rows" if cfg["task"] == "classify" else "records"
            print(f"(pass --skip_invalid to skip such {rows}; nothing was written)",
                  file=sys.stderr)
        return 1
    print_summary(meta)
    print_duplicates(meta)
    if "test" in meta:
        print(f"held out {meta['test']['conversations']:,} conversation(s) to "
              f"{cfg['out_dir']}/test.jsonl (eval.py --data={cfg['out_dir']}/test.jsonl)")
    masks = " and their masks," if meta.get("kind") == "chat" else ","
    print(f"wrote {cfg['out_dir']}/{{train,val}}.bin{masks} offsets and meta.json")
    return 0


def check_options(cfg):
    """What the types alone do not settle: --task's choices, --test_fraction a number when given."""
    if cfg["task"] not in TASKS:
        raise ConfigError(f"--task must be {' or '.join(TASKS)}, got {cfg['task']!r}")
    fraction = cfg["test_fraction"]
    if fraction is not None and (isinstance(fraction, bool)
                                 or not isinstance(fraction, (int, float))):
        raise ConfigError(f"--test_fraction must be a number, got {fraction!r}")
    if cfg["task"] == "preference" and (fraction or cfg["dedupe"] or cfg["oasst_paths"] != "best"):
        raise ConfigError("--test_fraction, --dedupe and --oasst_paths are for chat data, not "
                          "--task=preference")
    if cfg["task"] in ("classify", "preference", "tokenizer") and cfg["tokenizer"] != "gpt2":
        raise ConfigError(f"--tokenizer is for chat and text data: --task={cfg['task']} "
                          "uses GPT-2's tokenizer")
    if cfg["task"] == "classify" and cfg["val_file"]:
        raise ConfigError("--val_file is for chat data: --task=classify splits train/val/test by "
                          "class")


def expand_hub_names(cfg):
    """Hub dataset names (hf://datasets/...) among the inputs and --val_file -> their local parquet
    files; --val_file must come to one file."""
    cfg["inputs"] = expand_inputs(cfg["inputs"])
    if cfg["val_file"]:
        val = expand_inputs([cfg["val_file"]])
        if len(val) != 1:
            raise ConfigError(f"--val_file={cfg['val_file']} is {len(val)} files: name one (a GLOB "
                              "matching one file), or split val off with --val_fraction")
        cfg["val_file"] = val[0]


def prepare_tokenizer(cfg, out_dir_given):
    """--task=tokenizer: train a byte-level BPE on the inputs' text, write out_dir/tokenizer.json,
    say what it made; return 0."""
    out_dir = cfg["out_dir"] if out_dir_given else TOKENIZER_OUT_DIR
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        raise ConfigError(f"--out_dir={out_dir} holds a prepared dataset: a tokenizer goes in a "
                          "folder of its own (e.g. --out_dir=tokenizers/mine)")
    specials = [s.strip() for s in str(cfg["special_tokens"]).split(",") if s.strip()]
    start = time.time()
    text = train_bpe(corpus_texts(cfg["inputs"], cfg["template"], cfg["oasst_paths"],
                                  cfg["skip_invalid"], cfg["text_column"]), cfg["vocab_size"],
                     specials)
    seconds = time.time() - start
    path = write_tokenizer(text, out_dir)
    record = load_tokenizer(out_dir)
    print(f"trained a byte-level BPE of {record['n_vocab']:,} tokens (special: "
          f"{', '.join(record['special_tokens'])}) in {seconds:.1f}s; wrote {path}")
    if record["n_vocab"] < cfg["vocab_size"]:
        print(f"note: the corpus had merges for {record['n_vocab']:,} tokens only, not "
              f"{cfg['vocab_size']:,}")
    print(f"use it: python prepare.py YOUR_DATA --tokenizer={out_dir} --out_dir=data/NAME")
    return 0


def prepare_classify(cfg):
    """--task=classify: build the classification dataset, print its summary, return 0."""
    # imports torch (seconds): only this task needs it
    from chat_gpt2.classify_data import build_classify_dataset
    test_fraction = 0.2 if cfg["test_fraction"] is None else cfg["test_fraction"]
    meta = build_classify_dataset(cfg["inputs"], cfg["out_dir"], text_column=cfg["text_column"],
                                  label_column=cfg["label_column"], labels=cfg["labels"],
                                  balance=cfg["balance"], val_fraction=cfg["val_fraction"],
                                  test_fraction=test_fraction, seed=cfg["seed"],
                                  skip_invalid=cfg["skip_invalid"])
    print_classify_summary(meta, cfg["out_dir"])
    return 0


def prepare_preference(cfg):
    """--task=preference: build the preference dataset, print its summary, return 0."""
    from chat_gpt2.preference import build_preference_dataset  # imports torch: this task only
    meta = build_preference_dataset(cfg["inputs"], cfg["out_dir"],
                                    val_fraction=cfg["val_fraction"],
                                    val_file=cfg["val_file"] or None, seed=cfg["seed"],
                                    skip_invalid=cfg["skip_invalid"], template=cfg["template"])
    p, skipped = meta["pairs"], meta["skipped"]
    print(f"pairs: {p['train'] + p['val']:,} ({p['train']:,} train / {p['val']:,} val), skipped: "
          + (", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none"))
    print(f"tokens: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val; a pair's "
          "longer side " + ", ".join(f"{k} {v}" for k, v in meta["length_percentiles"].items()))
    print("pairs longer than block_size (the prompt's start is cut) / with a response cut: "
          + ", ".join(f"{b}: {n} / {meta['responses_cut'][b]}"
                      for b, n in meta["longer_than_block_size"].items()))
    print(f"wrote {cfg['out_dir']}/{{train,val}}_{{prompt,chosen,rejected}}.bin, "
          "{train,val}_pairs.npy and meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(configurator.run(main))
