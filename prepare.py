"""Turn chat data into the memmaps train.py reads.

    python prepare.py INPUT [INPUT ...] [--out_dir=data/chat] [--val_fraction=0.1] [--val_file=FILE] [--seed=1337]

Each INPUT is a .jsonl file (one record per line) or a .json file holding an array of records, in any of these
schemas (recognised per record by its keys; extra keys such as "id" are ignored):
    {"user", "assistant"}                      {"messages": [{"role", "content"}, ...]}
    {"instruction", "input", "output"}         {"conversations": [{"from", "value"}, ...]}
    {"prompt", "completion"}                   {"question", "answer"}

Writes into out_dir, all aligned token for token:
    train.bin / val.bin               uint16 GPT-2 token ids (np.memmap(path, dtype=np.uint16, mode="r"))
    train_mask.bin / val_mask.bin     uint8, 1 where the assistant's output is learned (see chat.py)
    train_turns.npy / val_turns.npy   int64 offsets where a turn starts (training windows start only there)
    train_convs.npy / val_convs.npy   int64 offsets where a conversation starts
    meta.json                         tokenizer, vocab size, template, counts, multiline_replies, source hashes
Everything is written to a temporary folder first and moved into place at the end, so a failed or interrupted run
never leaves a half-written dataset or damages one that was there.
"""
import argparse
import codecs
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import numpy as np

import chat

SPLITS = ("train", "val")
BLOCK_SIZES = (128, 256, 512, 1024)
BATCH = 512  # conversations tokenised per call of tiktoken's threaded batch encoder


class InputError(ValueError):
    """Input that cannot be read at all (missing file, an array broken beyond its records); always fatal."""


class RecordError(InputError):
    """One record that cannot be used; `where` is 'file:line' or 'file[index] (line N)'. Skippable."""

    def __init__(self, where, message, reason):
        super().__init__(f"{where}: {message}")
        self.reason = reason  # short category, counted in the summary when --skip_invalid


# ----------------------------------------------------------------------------------------------------------------
# Reading records: streamed, memory bounded by one record


def iter_jsonl(path, hasher):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            hasher.update(raw)
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: tolerate a BOM
            except UnicodeDecodeError as e:
                yield where, RecordError(where, f"invalid UTF-8 at byte {e.start} of the line", "invalid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RecordError(where, f"invalid JSON: {e.msg} (column {e.colno})", "invalid JSON")


def iter_json_array(path, hasher, chunk_size=1 << 20):
    """Records of a JSON array, decoded incrementally so a large file never sits in memory whole.
    Structural errors (not an array, broken JSON) end the file: there is no record boundary to resume from."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8-sig")()  # -sig: tolerate a BOM
    buf, pos, index, line, state, eof = "", 0, 0, 1, "start", False  # state: start, first, value, sep, end
    with open(path, "rb") as f:

        def read_more():  # append the next chunk to what is left of buf; False at end of file
            nonlocal buf, pos
            raw = f.read(chunk_size)
            hasher.update(raw)
            try:
                buf, pos = buf[pos:] + utf8.decode(raw, final=not raw), 0
            except UnicodeDecodeError as e:
                raise InputError(f"{path}[{index}] (line {line}): invalid UTF-8 near byte "
                                 f"{f.tell() - len(raw) + e.start}") from None
            return bool(raw)

        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                line += buf[pos] == "\n"
                pos += 1
            if pos == len(buf):
                if eof:
                    break
                eof = not read_more()
                continue
            char, where = buf[pos], f"{path}[{index}] (line {line})"
            if state == "start" or state == "end":
                if state == "end" or char != "[":
                    raise InputError(f"{path}:{line}: a .json input must hold one array of records")
                state, pos = "first", pos + 1
            elif char == "]" and state in ("first", "sep"):
                state, pos = "end", pos + 1
            elif state == "sep":
                if char != ",":
                    raise InputError(f"{where}: invalid JSON: expected ',' or ']' after the previous record")
                state, pos = "value", pos + 1
            else:
                try:
                    record, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if eof:
                        error_line = line + e.lineno - 1 - buf.count("\n", 0, pos)
                        raise InputError(f"{where}: invalid JSON: {e.msg} (line {error_line})") from None
                    eof = not read_more()  # the record may just be incomplete
                    continue
                if end == len(buf) and not eof:  # a record at the very end of buf may continue in the next chunk
                    eof = not read_more()
                    continue
                line += buf.count("\n", pos, end)
                yield where, record
                index, pos, state = index + 1, end, "sep"
    if state != "end":
        raise InputError(f"{path}: {'empty file' if state == 'start' else 'the array is not closed'}: "
                         "a .json input must hold one array of records")


def iter_records(path, hasher):
    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")
    if path.endswith(".jsonl"):
        return iter_jsonl(path, hasher)
    if path.endswith(".json"):
        return iter_json_array(path, hasher)
    raise InputError(f"{path}: unsupported extension (expected .jsonl or .json)")


# ----------------------------------------------------------------------------------------------------------------
# Schemas: every record becomes [{"role", "content"}, ...]

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "chatgpt": "assistant", "bot": "assistant", "model": "assistant"}


def _text(record, key, where, field=None):
    field = field or key
    if key not in record:
        raise RecordError(where, f"field '{field}' is missing", "missing field")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(where, f"field '{field}' must be a string, got {type(value).__name__}", "wrong type")
    if not value.strip():
        raise RecordError(where, f"field '{field}' is empty", "empty content")
    return value


def _turns(turns, where, list_key, role_key, content_key):
    if not isinstance(turns, list) or not turns:
        raise RecordError(where, f"field '{list_key}' must be a non-empty list", "wrong type")
    messages = []
    for i, turn in enumerate(turns):
        field = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"field '{field}' must be an object", "wrong type")
        role = ROLE_ALIASES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise RecordError(where, f"field '{field}.{role_key}' has unknown role {turn.get(role_key)!r}",
                              "unknown role")
        messages.append({"role": role, "content": _text(turn, content_key, where, f"{field}.{content_key}")})
    # order: an optional system message, then user/assistant alternating, ending with the assistant
    expected = "user"
    for i, m in enumerate(messages):
        if m["role"] == "system" and i == 0:
            continue
        if m["role"] != expected:
            raise RecordError(where, f"field '{list_key}[{i}].{role_key}' is {m['role']!r} where {expected!r} was "
                              "expected (roles must be: optional system, then user/assistant alternating)",
                              "roles out of order")
        expected = "assistant" if expected == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise RecordError(where, f"field '{list_key}' must end with an assistant message", "roles out of order")
    return messages


def to_messages(record, where):
    """Recognise a record's schema by its keys and normalise it to a list of messages."""
    if not isinstance(record, dict):
        raise RecordError(where, f"a record must be a JSON object, got {type(record).__name__}", "wrong type")
    if "messages" in record:
        return _turns(record["messages"], where, "messages", "role", "content")
    if "conversations" in record:
        return _turns(record["conversations"], where, "conversations", "from", "value")
    pairs = [("user", "assistant"), ("prompt", "completion"), ("question", "answer")]
    for user_key, assistant_key in pairs:
        if user_key in record or assistant_key in record:
            return [{"role": "user", "content": _text(record, user_key, where)},
                    {"role": "assistant", "content": _text(record, assistant_key, where)}]
    if "instruction" in record or "output" in record:
        user = _text(record, "instruction", where)
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise RecordError(where, f"field 'input' must be a string, got {type(extra).__name__}", "wrong type")
        if extra.strip():
            user = f"{user.strip()}\n{extra.strip()}"
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": _text(record, "output", where)}]
    raise RecordError(where, f"unrecognised schema, keys seen: {sorted(record)}; expected one of user/assistant, "
                      "messages, instruction/input/output, conversations, prompt/completion, question/answer",
                      "unknown schema")


# ----------------------------------------------------------------------------------------------------------------
# Tokenising into one temporary stream, then splitting by conversation


class TokenWriter:
    """Appends rendered conversations to flat files (ids, mask) and remembers turn/conversation offsets."""

    def __init__(self, folder, name):
        self.ids = open(os.path.join(folder, f"{name}.bin"), "wb")
        self.mask = open(os.path.join(folder, f"{name}_mask.bin"), "wb")
        self.n_tokens, self.convs, self.turns, self.lengths, self.learned = 0, [], [], [], 0

    def add(self, ids, mask, turn_starts):
        self.convs.append(self.n_tokens)
        self.turns += [self.n_tokens + t for t in turn_starts]
        self.ids.write(np.asarray(ids, dtype=np.uint16).tobytes())
        self.mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.n_tokens += len(ids)
        self.lengths.append(len(ids))
        self.learned += int(np.sum(mask, dtype=np.int64))

    def close(self, folder, name):
        self.ids.close()
        self.mask.close()
        np.save(os.path.join(folder, f"{name}_convs.npy"), np.asarray(self.convs, dtype=np.int64))
        np.save(os.path.join(folder, f"{name}_turns.npy"), np.asarray(self.turns, dtype=np.int64))


class Progress:
    """Prints a progress line every few seconds, only for inputs slow enough to need one."""

    def __init__(self):
        self.start = self.last = time.time()

    def update(self, n_convs, n_tokens, force=False):
        now = time.time()
        if force and now - self.start > 3 or now - self.last > 3:
            self.last = now
            print(f"  ... {n_convs:,} conversations, {n_tokens:,} tokens, {now - self.start:.0f}s", file=sys.stderr)


def tokenize_inputs(paths, writer, skip_invalid, stats, progress):
    """Read, validate and render every record of paths into writer. Returns the sha256 of each source."""
    hashes, batch = {}, []

    def flush():
        for ids, mask, turns in chat.render_conversations(batch):
            writer.add(ids, mask, turns)
        batch.clear()
        progress.update(len(writer.convs), writer.n_tokens)

    for path in paths:
        hasher = hashlib.sha256()
        records = iter_records(path, hasher)
        while True:
            try:
                where, record = next(records)
                if isinstance(record, RecordError):
                    raise record
                messages = to_messages(record, where)
            except StopIteration:
                break
            except RecordError as e:
                if not skip_invalid:
                    raise
                stats["skipped"][e.reason] += 1
                continue
            stats["multiline_replies"] |= any("\n" in m["content"].strip() for m in messages
                                              if m["role"] == "assistant")
            batch.append(messages)
            if len(batch) >= BATCH:
                flush()
        flush()
        hashes[path] = hasher.hexdigest()
    progress.update(len(writer.convs), writer.n_tokens, force=True)
    return hashes


def choose_val(n_convs, val_fraction, seed):
    """Indices of the val conversations: deterministic from the seed, at least one, never all."""
    if n_convs < 2:
        raise InputError(f"only {n_convs} usable conversation(s): at least 2 are needed to split train/val "
                         "(or pass --val_file)")
    n_val = min(n_convs - 1, max(1, round(n_convs * val_fraction)))
    return set(np.random.default_rng(seed).permutation(n_convs)[:n_val].tolist())


def split_stream(folder, stream, val, writers):
    """Copy each conversation of the tokenised stream into the train or val writer, whole."""
    ids = np.memmap(os.path.join(folder, "all.bin"), dtype=np.uint16, mode="r")
    mask = np.memmap(os.path.join(folder, "all_mask.bin"), dtype=np.uint8, mode="r")
    turns = np.asarray(stream.turns, dtype=np.int64)
    ends = stream.convs[1:] + [stream.n_tokens]
    for i, (a, b) in enumerate(zip(stream.convs, ends)):
        conv_turns = turns[np.searchsorted(turns, a):np.searchsorted(turns, b)] - a
        writers["val" if i in val else "train"].add(ids[a:b], mask[a:b], conv_turns.tolist())


def summarize(writers, stats):
    lengths = np.asarray(writers["train"].lengths + writers["val"].lengths)
    tokens = {s: writers[s].n_tokens for s in SPLITS}
    learned = sum(writers[s].learned for s in SPLITS)
    return {
        "conversations": {s: len(writers[s].convs) for s in SPLITS},
        "tokens": tokens,
        "skipped": dict(stats["skipped"]),
        "length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99, 100)},
        "longer_than_block_size": {str(b): int((lengths > b + 1).sum()) for b in BLOCK_SIZES},
        "learned_token_share": round(learned / max(1, sum(tokens.values())), 4),
    }


def print_summary(meta):
    c, t = meta["conversations"], meta["tokens"]
    skipped = ", ".join(f"{n} {reason}" for reason, n in meta["skipped"].items()) or "none"
    print(f"conversations: {c['train'] + c['val']:,} read ({c['train']:,} train / {c['val']:,} val), skipped: {skipped}")
    print(f"tokens: {t['train']:,} train / {t['val']:,} val; conversation length "
          + ", ".join(f"{k} {v}" for k, v in meta["length_percentiles"].items()))
    print("conversations longer than block_size: "
          + ", ".join(f"{b}: {n}" for b, n in meta["longer_than_block_size"].items()))
    print(f"share of tokens learned (loss mask = 1): {meta['learned_token_share']:.1%}; "
          f"multi-line replies: {meta['multiline_replies']}")


def prepare(inputs, out_dir="data/chat", val_fraction=0.1, val_file=None, seed=1337, skip_invalid=False):
    """Build the dataset in a temporary folder inside out_dir, then move it into place. Returns meta."""
    if not 0 < val_fraction < 1 and val_file is None:
        raise InputError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".prepare-", dir=out_dir)
    try:
        stats, progress = {"skipped": Counter(), "multiline_replies": False}, Progress()
        writers = {s: TokenWriter(tmp, s) for s in SPLITS}
        if val_file is None:
            stream = TokenWriter(tmp, "all")
            hashes = tokenize_inputs(inputs, stream, skip_invalid, stats, progress)
            stream.close(tmp, "all")
            split_stream(tmp, stream, choose_val(len(stream.convs), val_fraction, seed), writers)
        else:
            hashes = tokenize_inputs(inputs, writers["train"], skip_invalid, stats, progress)
            hashes.update(tokenize_inputs([val_file], writers["val"], skip_invalid, stats, progress))
        for s in SPLITS:
            writers[s].close(tmp, s)
            if not writers[s].convs:
                raise InputError(f"no usable conversations for the {s} split")
        meta = {"tokenizer": chat.TOKENIZER, "vocab_size": chat.VOCAB_SIZE, "template": chat.TEMPLATE,
                "multiline_replies": stats["multiline_replies"],
                "default_stop": chat.default_stop(stats["multiline_replies"]),
                **summarize(writers, stats), "sources": hashes, "seed": seed,
                "val_fraction": None if val_file else val_fraction}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        # move into place; meta.json last, so a reader never sees a new meta with old data
        names = [f"{s}{suffix}" for s in SPLITS for suffix in (".bin", "_mask.bin", "_turns.npy", "_convs.npy")]
        for name in names + ["meta.json"]:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl or .json chat data")
    parser.add_argument("--out_dir", default="data/chat")
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--val_file", default=None, help="take val from this file instead of splitting")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--skip_invalid", action="store_true", help="skip bad records (counted) instead of failing")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.inputs, args.out_dir, args.val_fraction, args.val_file, args.seed, args.skip_invalid)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, RecordError):
            print("(pass --skip_invalid to skip such records; nothing was written)", file=sys.stderr)
        return 1
    print_summary(meta)
    print(f"wrote {args.out_dir}/{{train,val}}.bin and their masks, offsets and meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
