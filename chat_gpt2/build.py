"""Building the prepared dataset (prepare.py): chat records or plain text -> the token memmaps,
masks and offsets that dataset.py reads (its docstring lists the files). The records are tokenised
into one temporary stream, which is then split train/val by whole conversation (a single .txt
document: by position).

Replacing a dataset is all or nothing: a build is written to its own folder
`.prepare-<PID>-<random>`, then one rename switches the symlink `.dataset` to it; each file name is
a symlink `name -> .dataset/name`, so readers see the old dataset or the new one, never a mix,
whenever the process is killed. Leftovers of killed runs are removed at the next start. (Where
symlinks are unavailable the files are moved into place one by one, meta.json last.)
classify_data.py publishes its datasets the same way (publish, clean_out_dir).
"""
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tiktoken

from . import chat
from .dataset import ALL_FILES, CURRENT, SPLITS, format_fields, token_dtype
from .errors import ConfigError, InputError, RecordError
from .files import disk_error, make_temp_dir, remove_dead_leftovers, temp_name
from .records import (PREFERENCE_KEYS, column_text, document_text, is_document, iter_records,
                      iter_text, split_names, to_conversations)
from .hf_tokenizer import tokenizer_json
from .tokenizer import GPT2_PATTERN, bytes_to_unicode, check_training, stored, write_tokenizer

BUILD_PREFIX = ".prepare-"  # a build's own folder: .prepare-<PID>-<random>
BLOCK_SIZES = (128, 256, 512, 1024)  # meta.json counts the conversations longer than each
# conversations (or {"text"} documents) tokenised per call of tiktoken's threaded batch encoder
BATCH = 512
TEXT_BATCH = 4  # pieces of a .txt file (about 1 MiB each) tokenised per call of the batch encoder
# tokens of the stream copied into train and val at a time (whole conversations)
SPLIT_TOKENS = 1 << 20
PROGRESS_SECONDS = 3  # a progress line this often, once a build has taken this long


# --------------------------------------------------------------------------------------------------
# Tokenise into one temporary stream, then split by conversation


class TokenWriter:
    """Appends rendered conversations (or documents) to flat files (ids in token_dtype(vocab_size),
    mask), remembering where each conversation and turn starts and each conversation's digest (for
    repeats). continues=True appends to the previous conversation (a long document written piece
    by piece). A mask of None is every token learned (text): text data writes no mask file."""

    def __init__(self, folder, name, vocab_size):
        self.dtype = token_dtype(vocab_size)
        self.ids_path = os.path.join(folder, f"{name}.bin")
        self.mask_path = os.path.join(folder, f"{name}_mask.bin")
        self.ids, self.mask = open(self.ids_path, "wb"), None  # the mask: opened by the first one
        self.n_tokens, self.n_convs, self.learned, self.digests = 0, 0, 0, []
        self._convs, self._turns = [], []  # int64 arrays, one per write

    def add(self, ids, mask, turn_starts, continues=False):
        self.add_batch(ids, mask, [] if continues else [0], turn_starts)

    def add_batch(self, ids, mask, conv_starts, turn_starts, digests=()):
        """ids, mask (None: all learned): conversations back to back; conv_starts, turn_starts:
        offsets into them."""
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        if mask is not None and self.mask is None:  # chat data: the tokens so far were all learned
            self.mask = open(self.mask_path, "wb")
            self.mask.write(np.ones(self.n_tokens, dtype=np.uint8).data)
        if mask is None and self.mask is not None:
            mask = np.ones(len(ids), dtype=np.uint8)
        self._convs.append(self.n_tokens + np.asarray(conv_starts, dtype=np.int64))
        self._turns.append(self.n_tokens + np.asarray(turn_starts, dtype=np.int64))
        self.ids.write(ids.data)
        if mask is not None:
            self.mask.write(np.ascontiguousarray(mask, dtype=np.uint8).data)
        self.n_tokens += len(ids)
        self.n_convs += len(conv_starts)
        self.learned += len(ids) if mask is None else int(np.sum(mask, dtype=np.int64))
        self.digests += digests

    def offsets(self):
        """(conversation starts, turn starts) so far, int64 arrays."""
        none = [np.zeros(0, dtype=np.int64)]
        return tuple(np.concatenate(parts or none) for parts in (self._convs, self._turns))

    def lengths(self):
        convs, _ = self.offsets()
        return np.diff(np.append(convs, self.n_tokens))

    def close(self, folder, name):
        self.ids.close()
        if self.mask is not None:
            self.mask.close()
        convs, turns = self.offsets()
        np.save(os.path.join(folder, f"{name}_convs.npy"), convs)
        np.save(os.path.join(folder, f"{name}_turns.npy"), turns)


class Progress:
    """A progress line on stderr every PROGRESS_SECONDS, for inputs slow enough to need one: bytes
    read of all the inputs, the rate, the time left."""

    def __init__(self, paths):
        self.start = self.last = time.time()
        self.total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
        self.read = 0  # bytes, counted by ReadCounter

    def update(self, n_convs, n_tokens, final=False):
        now = time.time()
        slow = now - self.start > PROGRESS_SECONDS
        if now - self.last < PROGRESS_SECONDS and not (final and slow):
            return
        self.last, elapsed = now, now - self.start
        rate = self.read / max(elapsed, 1e-9)
        where = (f"read {self.read / 1e6:,.1f} MB in {elapsed:.0f}s ({rate / 1e6:.1f} MB/s)"
                 if final else
                 f"{self.read / 1e6:,.1f} / {self.total / 1e6:,.1f} MB "
                 f"({self.read / max(self.total, 1):.0%}), {rate / 1e6:.1f} MB/s, ETA "
                 f"{max(0, self.total - self.read) / max(rate, 1):.0f}s")
        print(f"  ... {where}; {n_convs:,} conversations, {n_tokens:,} tokens", file=sys.stderr,
              flush=True)


class ReadCounter:
    """A source's sha256 that also counts the bytes records.py feeds it (for the progress line)."""

    def __init__(self, progress):
        self.sha, self.progress = hashlib.sha256(), progress

    def update(self, data):
        self.sha.update(data)
        self.progress.read += len(data)

    def hexdigest(self):
        return self.sha.hexdigest()


def tokenize_inputs(paths, writer, skip_invalid, stats, progress):
    """Read, validate and render every record (or .txt document) of paths into writer. Returns the
    sha256 of each source. stats["kind"] becomes "chat" or "text" with the first input; the other
    kind later is an error. A batch is rendered in a second thread while the next one is read
    (tiktoken's encoder releases the GIL), and written in order: at most two batches in memory."""
    hashes, batch, pending = {}, [], []

    # write the batch being rendered, then start rendering this one (twice: both written)
    def flush():
        if pending:
            write_new(*pending.pop().result(), writer, stats)
            progress.update(writer.n_convs, writer.n_tokens)
        if batch:
            pending.append(pool.submit(render, list(batch), stats["kind"], stats["template"],
                                       stats["enc"], stats["threads"]))
            batch.clear()

    with ThreadPoolExecutor(1) as pool:
        for path in paths:
            hasher = ReadCounter(progress)
            if path.endswith(".txt"):
                set_kind(stats, "text", path)
                flush()
                flush()  # the documents before this file are written before it
                tokenize_text_file(path, hasher, writer, progress, stats["enc"], stats["threads"])
            for where, kind, content in usable_records(path, hasher, skip_invalid, stats):
                set_kind(stats, kind, where)
                if held_out(content, stats):
                    continue
                batch.append(content)
                if len(batch) >= BATCH:
                    flush()
            hashes[path] = hasher.hexdigest()
        flush()
        flush()
    progress.update(writer.n_convs, writer.n_tokens, final=True)
    return hashes


def special_meta(template, tokenizer=chat.TOKENIZER):
    """meta.json's special_tokens ({marker: id}) of a template that has any, in the numbering of
    tokenizer (GPT-2's or a trained one's record), else nothing (a dataset without them reads as
    before)."""
    ids = chat.special_token_ids(template, chat.get_encoder(tokenizer)) if template else {}
    return {"special_tokens": ids} if ids else {}


def tokenizer_meta(options):
    """meta.json's tokenizer fields: its record (without its text), vocabulary size (its own),
    the template and the template's special tokens' ids."""
    tokenizer, template = options["tokenizer"], options["template"]
    return {"tokenizer": stored(tokenizer), "vocab_size": chat.get_encoder(tokenizer).n_vocab,
            "template": template, **special_meta(template, tokenizer)}


def render(batch, kind, template, enc, threads):
    """(chat.Rendered, the digest of each conversation's tokens) of a batch of conversations or
    "text" documents (every token learned, <|endoftext|> closing each), encoded with enc in threads
    tiktoken threads."""
    dtype = token_dtype(enc.n_vocab)
    if kind == "text":
        rendered = chat.documents(*chat.encode_closed(enc, batch, dtype=dtype, threads=threads))
    else:
        rendered = chat.render_batch(batch, template, enc, dtype, threads)
    raw, starts, size = memoryview(rendered.ids).cast("B"), rendered.starts, rendered.ids.itemsize
    return rendered, [hashlib.blake2b(raw[size * a:size * b], digest_size=16).digest()
                      for a, b in zip(starts, starts[1:])]


def write_new(rendered, digests, writer, stats):
    """Write a chat.Rendered batch, less repeats of an earlier conversation if stats["dedupe"]."""
    keep = [first_time(d, stats) for d in digests]
    if not all(keep):
        rendered = rendered.select(keep)
        digests = [d for d, k in zip(digests, keep) if k]
    mask = None if stats["kind"] == "text" else rendered.mask  # text: every token, no mask file
    writer.add_batch(rendered.ids, mask, rendered.starts[:-1], rendered.turns, digests)


def held_out(messages, stats):
    """--test_fraction: about that share of the conversations (a seeded draw per conversation, in
    input order) go to test.jsonl as {"messages"} records instead of the dataset."""
    if stats.get("test") is None or stats["test_rng"].random() >= stats["test_fraction"]:
        return False
    stats["test"].write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    stats["n_test"] += 1
    return True


def first_time(key, stats):
    """Counts exact repeats (the same tokens: key, their digest) of an earlier conversation or
    document; False for a repeat that --dedupe drops. (A .txt document is streamed, not
    compared.)"""
    if key not in stats["seen"]:
        stats["seen"].add(key)
        return True
    stats["repeats"] += 1
    return not stats["dedupe"]


def val_in_train(writers):
    """How many val conversations (documents) copy a train one exactly: a val loss that flatters."""
    train = set(writers["train"].digests)
    return sum(d in train for d in writers["val"].digests)


def usable_records(path, hasher, skip_invalid, stats):
    """(where, "text" or "chat", the text or the messages) per usable record of a .jsonl / .json
    file; a bad record raises RecordError, or with skip_invalid is counted in stats["skipped"] by
    its reason."""
    if path.endswith(".txt"):
        return
    columns = stats["text_columns"]
    records = iter_records(path, hasher, columns)
    while True:
        try:
            where, record = next(records)
            if isinstance(record, RecordError):
                raise record
            if columns:  # --text_column: these columns are a plain-text document
                yield where, "text", column_text(record, columns, where)
                continue
            if is_document(record):
                yield where, "text", document_text(record, where)
                continue
            found = to_conversations(record, where, stats["template"], stats["oasst_paths"])
        except StopIteration:
            return
        except RecordError as e:
            if not skip_invalid:
                raise
            stats["skipped"][e.reason] += 1
            continue
        if PREFERENCE_KEYS & record.keys() and not stats["warned_preference"]:
            # once: a preference file would repeat it for every record
            stats["warned_preference"] = True
            print(f"warning: {where}: preference data: 'chosen' / 'rejected' are ignored here (and "
                  "in every other record); the reply learned is 'output' / 'completion' (for DPO: "
                  "prepare the file with --task=preference)", file=sys.stderr)
        for messages in found:
            stats["multiline_replies"] |= any("\n" in m["content"].strip() for m in messages
                                              if m["role"] == "assistant")
            yield where, "chat", messages


def set_kind(stats, kind, where):
    """Text or chat, never both: the first input decides, a later one of the other kind fails."""
    if stats["kind"] is None:
        stats["kind"], stats["kind_where"] = kind, where
    elif stats["kind"] != kind:
        raise InputError(f"{where}: {kind} data, but {stats['kind_where']} is {stats['kind']} "
                         f"data: plain text (.txt files, {{\"text\": ...}} records) and chat "
                         "records cannot be mixed in one dataset; prepare them into separate "
                         "folders (pretrain on the text, then fine-tune on the chat)")


def tokenize_text_file(path, hasher, writer, progress, enc, threads=8):
    """A .txt file as one document, streamed: pieces cut where the tokenizer cuts anyway
    (records.iter_text), TEXT_BATCH of them (or one per thread) encoded at a time in threads
    tiktoken threads."""
    pieces, first = iter_text(path, hasher), True
    digest = hashlib.blake2b(digest_size=16)
    while batch := list(itertools.islice(pieces, max(TEXT_BATCH, threads))):
        encoded = enc.encode_ordinary_batch(batch, num_threads=threads)
        ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=writer.dtype)
        digest.update(ids.data)
        writer.add(ids, None, [0] if first else [], continues=not first)
        first = False
        progress.update(writer.n_convs, writer.n_tokens)
    if first:
        raise InputError(f"{path}: empty file: a .txt input is one document of plain text")
    eot = np.array([enc.eot_token], dtype=writer.dtype)
    digest.update(eot.data)
    writer.add(eot, None, [], continues=True)
    writer.digests.append(digest.digest())


def choose_val(n_convs, val_fraction, seed):
    """Indices of the val conversations: deterministic from the seed, at least one, never all."""
    if n_convs < 2:
        raise InputError(f"only {n_convs} usable conversation(s) or document(s): at least 2 are "
                         "needed to split train/val (or pass --val_file)")
    n_val = min(n_convs - 1, max(1, round(n_convs * val_fraction)))
    return set(np.random.default_rng(seed).permutation(n_convs)[:n_val].tolist())


def split_stream(stream, val, writers):
    """Copy each conversation of the tokenised stream into the train or val writer, whole:
    SPLIT_TOKENS of the stream at a time (whole conversations), each split's part in one write."""
    convs, turns = stream.offsets()
    ends = np.append(convs[1:], stream.n_tokens)
    is_val = np.zeros(len(convs), dtype=bool)
    is_val[list(val)] = True
    a = 0
    while a < len(convs):
        b = max(a + 1, int(np.searchsorted(convs, convs[a] + SPLIT_TOKENS)))  # conversations a..b-1
        lo, hi = convs[a], ends[b - 1]
        part_turns = turns[np.searchsorted(turns, lo):np.searchsorted(turns, hi)]
        turn_conv = np.searchsorted(convs, part_turns, side="right") - 1
        tokens_val = np.repeat(is_val[a:b], ends[a:b] - convs[a:b])
        ids, mask = read_stream(stream, lo, hi)
        for split, chosen in (("train", ~is_val), ("val", is_val)):
            picked = chosen[a:b]
            lengths = (ends[a:b] - convs[a:b])[picked]
            new_starts = np.cumsum(lengths) - lengths
            # old offset - new offset, per picked conversation
            shift = np.zeros(b - a, dtype=np.int64)
            shift[picked] = convs[a:b][picked] - lo - new_starts
            keep = chosen[turn_conv]
            tokens = tokens_val if split == "val" else ~tokens_val
            part_mask = None if mask is None else mask[tokens]
            writers[split].add_batch(ids[tokens], part_mask, new_starts,
                                     part_turns[keep] - lo - shift[turn_conv[keep] - a],
                                     [stream.digests[i] for i in np.flatnonzero(picked) + a])
        a = b


def split_by_position(stream, val_fraction, writers):
    """A single document (one .txt corpus): its first 1 - val_fraction trains, the rest is val."""
    n = stream.n_tokens
    n_val = max(2, round(n * val_fraction))  # a split needs 2 tokens for one (input, target) pair
    if n - n_val < 2:
        raise InputError(f"the only document has {n} token(s): too short to split train/val "
                         "(or pass --val_file)")
    for split, a, b in (("train", 0, n - n_val), ("val", n - n_val, n)):
        for start in range(a, b, SPLIT_TOKENS):  # in pieces: a corpus larger than memory is fine
            end = min(b, start + SPLIT_TOKENS)
            writers[split].add(*read_stream(stream, start, end), [0] if start == a else [],
                               continues=start > a)


def read_stream(stream, lo, hi):
    """Tokens lo:hi of the tokenised stream (a closed TokenWriter): (ids, mask; None for text),
    read (not memory-mapped: freed after)."""
    def read(path, dtype):
        return np.fromfile(path, dtype=dtype, count=hi - lo, offset=lo * dtype.itemsize)
    mask = None if stream.mask is None else read(stream.mask_path, np.dtype(np.uint8))
    return read(stream.ids_path, stream.dtype), mask


def summarize(writers, stats):
    lengths = np.concatenate([writers[s].lengths() for s in SPLITS])
    tokens = {s: writers[s].n_tokens for s in SPLITS}
    learned = sum(writers[s].learned for s in SPLITS)
    return {
        "conversations": {s: writers[s].n_convs for s in SPLITS},
        "tokens": tokens,
        "skipped": dict(stats["skipped"]),
        "length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99, 100)},
        "longer_than_block_size": {str(b): int((lengths > b + 1).sum()) for b in BLOCK_SIZES},
        "learned_token_share": round(learned / max(1, sum(tokens.values())), 4),
    }


def build_dataset(inputs, out_dir="data/chat", val_fraction=0.1, val_file=None, seed=1337,
                  skip_invalid=False, template="human_assistant", oasst_paths="best", dedupe=False,
                  test_fraction=0.0, text_column="", threads=8, tokenizer=chat.TOKENIZER):
    """Build the dataset in a folder of its own inside out_dir, then make it the dataset (publish).
    Returns meta. template: a built-in template's name, a JSON template file, or a template dict
    (see chat.load_template). oasst_paths: "best" (an OpenAssistant tree's best-ranked branch) or
    "all" (every path ending on a reply). dedupe: drop exact repeats of a conversation (same
    tokens); they are counted either way. test_fraction: about this share of the conversations is
    held out to out_dir/test.jsonl (chat data only). text_column: names of record keys (parquet
    columns), comma-separated: each record's are joined into a plain-text document. threads:
    tiktoken's encoding threads. tokenizer: "gpt2" or a trained tokenizer's record
    (tokenizer.load_tokenizer), copied into the dataset."""
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"--test_fraction must be at least 0 and below 1, got {test_fraction}")
    if not 0 < val_fraction < 1 and val_file is None:
        raise InputError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"--threads must be a whole number of at least 1, got {threads!r}")
    if oasst_paths not in ("best", "all"):
        raise ConfigError(f"--oasst_paths must be best or all, got {oasst_paths!r}")
    if isinstance(template, dict):
        chat.check_template(template, "template")
    else:
        template = chat.load_template(template)
    enc = chat.template_encoder(template, chat.get_encoder(tokenizer))  # + its special tokens
    options = {"template": template, "oasst_paths": oasst_paths, "dedupe": dedupe,
               "test_fraction": test_fraction, "text_columns": split_names(text_column),
               "threads": threads, "tokenizer": tokenizer, "enc": enc}
    return build_and_publish(out_dir, lambda tmp: _build(tmp, inputs, val_fraction, val_file, seed,
                                                         skip_invalid, options))


def build_and_publish(out_dir, write):
    """write(tmp) fills a fresh folder inside out_dir with a dataset, which then becomes out_dir's
    dataset at once (publish); on any failure the folder goes and out_dir's dataset stays as it
    was (a full disk: one clear error). Returns what write returns (the meta)."""
    clean_out_dir(out_dir)
    tmp = make_temp_dir(out_dir, BUILD_PREFIX)
    try:
        meta = write(tmp)
        publish(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = isinstance(e, OSError) and disk_error(e, f"writing the dataset in {out_dir}")
        if full:
            raise full from None
        raise
    return meta


def _build(tmp, inputs, val_fraction, val_file, seed, skip_invalid, options):
    """Write every file of the dataset into the folder tmp; returns meta."""
    template = options["template"]
    stats = {"skipped": Counter(), "multiline_replies": False, "kind": None,
             "warned_preference": False, "seen": set(), "repeats": 0, **options}
    progress = Progress(list(inputs) + ([val_file] if val_file else []))
    vocab_size = options["enc"].n_vocab  # the ids' range (dtype): the special tokens' included
    writers = {s: TokenWriter(tmp, s, vocab_size) for s in SPLITS}
    if options["test_fraction"]:
        stats.update(test=open(os.path.join(tmp, "test.jsonl"), "w", encoding="utf-8"), n_test=0,
                     test_rng=np.random.default_rng(seed + 1))
    if val_file is None:
        stream = TokenWriter(tmp, "all", vocab_size)
        hashes = tokenize_inputs(inputs, stream, skip_invalid, stats, progress)
        stream.close(tmp, "all")
        if stats["kind"] == "text" and stream.n_convs == 1:
            split_by_position(stream, val_fraction, writers)
        else:
            split_stream(stream, choose_val(stream.n_convs, val_fraction, seed), writers)
    else:
        hashes = tokenize_inputs(inputs, writers["train"], skip_invalid, stats, progress)
        # the val file is val: nothing of it is held out
        test, stats["test"] = stats.get("test"), None
        hashes.update(tokenize_inputs([val_file], writers["val"], skip_invalid, stats, progress))
        stats["test"] = test
    if stats.get("test") is not None:
        stats["test"].close()
        if stats["kind"] == "text":
            raise ConfigError("--test_fraction holds out conversations for eval.py --data: not for "
                              "plain text")
    for s in SPLITS:
        writers[s].close(tmp, s)
        if not writers[s].n_convs:
            raise InputError(f"no usable conversations for the {s} split")
    text = stats["kind"] == "text"
    n_docs = stream.n_convs if val_file is None else sum(writers[s].n_convs for s in SPLITS)
    multiline = stats["multiline_replies"]
    meta = {**format_fields(vocab_size), "kind": stats["kind"],
            **({"documents": n_docs} if text else {}), **tokenizer_meta(options),
            "multiline_replies": multiline,
            "default_stop": None if text else chat.default_stop(multiline, template),  # text: none
            **summarize(writers, stats), "sources": hashes, "seed": seed,
            **({"text_columns": stats["text_columns"]} if stats["text_columns"] else {}),
            "val_fraction": None if val_file else val_fraction,
            "duplicates": {"repeats": stats["repeats"],
                           "removed": stats["repeats"] if stats["dedupe"] else 0,
                           "val_in_train": val_in_train(writers)},
            **({"test": {"file": "test.jsonl", "conversations": stats["n_test"],
                         "fraction": options["test_fraction"]}}
               if options["test_fraction"] else {})}
    for name in os.listdir(tmp):
        if name.startswith("all"):  # the tokenised stream before the split
            os.remove(os.path.join(tmp, name))
    if isinstance(options["tokenizer"], dict):  # a trained tokenizer travels with its data
        write_tokenizer(options["tokenizer"]["json"], tmp)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def publish(build, out_dir):
    """Make the complete folder build the dataset at out_dir: one rename of the CURRENT symlink,
    then each name a link into it (already so after the first build: nothing else changes), then the
    previous build is deleted."""
    link = os.path.join(out_dir, CURRENT)
    previous = os.readlink(link) if os.path.islink(link) else None
    try:
        os.symlink(os.path.basename(build), temp_name(link))
    # no symlinks here (e.g. Windows without the privilege): move the files, meta.json last
    except OSError:
        for name in sorted(ALL_FILES, key="meta.json".__eq__):
            if not os.path.exists(os.path.join(build, name)):
                continue
            os.replace(os.path.join(build, name), os.path.join(out_dir, name))
        shutil.rmtree(build, ignore_errors=True)
        return
    os.replace(temp_name(link), link)
    link_names(out_dir)
    if previous and previous != os.path.basename(build):
        shutil.rmtree(os.path.join(out_dir, previous), ignore_errors=True)


def link_names(out_dir):
    """Each dataset file name in out_dir a symlink to CURRENT/name (replacing old regular files, one
    rename each). A name the current build lacks (test.jsonl; a chat build's files after a
    classification one) loses its link."""
    for name in ALL_FILES:
        path, target = os.path.join(out_dir, name), os.path.join(CURRENT, name)
        if not os.path.exists(os.path.join(out_dir, target)):
            if os.path.islink(path):  # the previous build had one, this one has none
                os.remove(path)
            continue
        if os.path.islink(path) and os.readlink(path) == target:
            continue
        os.symlink(target, temp_name(path))
        os.replace(temp_name(path), path)


def clean_out_dir(out_dir):
    """Before a build: delete what killed runs left (their build folders and temporary links; never
    the current build, never a live run's) and finish linking the current build if a kill
    interrupted that. Says what it did."""
    link = os.path.join(out_dir, CURRENT)
    current = os.readlink(link) if os.path.islink(link) else None
    ours = set(ALL_FILES) | {CURRENT}
    removed = remove_dead_leftovers(out_dir, (BUILD_PREFIX,), temp_of=ours.__contains__,
                                    keep=(current,))
    if current and os.path.isdir(os.path.join(out_dir, current)):
        link_names(out_dir)
    if removed:
        print(f"removed {len(removed)} leftover(s) of interrupted runs in {out_dir}: "
              f"{', '.join(removed)}", file=sys.stderr)
    return removed


# --------------------------------------------------------------------------------------------------
# A tokenizer's corpus and its training (prepare.py --task=tokenizer; tokenizer.py says the rest)


def corpus_texts(paths, template="human_assistant", oasst_paths="best", skip_invalid=False,
                 text_column=""):
    """The texts a tokenizer trains on, one string at a time: each .txt file in pieces (as
    prepare.py reads it), each {"text"} record (or --text_column's), each conversation as the
    template renders it (the text the dataset will hold; <|endoftext|> is a special token and is
    not part of it)."""
    template = template if isinstance(template, dict) else chat.load_template(template)
    stats = {"skipped": Counter(), "multiline_replies": False, "warned_preference": False,
             "template": template, "oasst_paths": oasst_paths,
             "text_columns": split_names(text_column)}
    for path in paths:
        if path.endswith(".txt"):
            yield from iter_text(path, hashlib.sha256())
        for _, kind, content in usable_records(path, hashlib.sha256(), skip_invalid, stats):
            yield content if kind == "text" else chat.render_text(content, template)


def train_bpe(texts, vocab_size, special_tokens=()):
    """tokenizer.json's text of a byte-level BPE with GPT-2's split trained on texts (an iterable
    of strings) up to vocab_size tokens in all (fewer when the corpus has fewer pairs to merge)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    specials = check_training(vocab_size, special_tokens)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    seen = []

    def counted():  # an empty corpus is an error, not a 256-byte tokenizer
        for text in texts:
            seen.append(len(text))
            yield text

    hf.train_from_iterator(counted(), trainer)
    if not sum(seen):
        raise InputError("the corpus is empty: nothing to train a tokenizer on")
    merges = json.loads(hf.to_str())["model"]["merges"]
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:  # "a b" (older tokenizers) or ["a", "b"]
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        ranks.setdefault(bytes(byte_of[c] for c in left + right), len(ranks))
    enc = tiktoken.Encoding("trained", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(specials)})
    return json.dumps(tokenizer_json(enc), ensure_ascii=False)
