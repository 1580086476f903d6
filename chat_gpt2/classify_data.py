"""Labelled text for classification: reading tables (.csv / .tsv) and records (.jsonl / .json), the
stratified train/val/test split, the prepared dataset (kind "classify") and its batches.

Columns: --text_column (one or more, comma-separated; several are joined with "\\n") and
--label_column, by name (a header row, or a record's keys) or by 0-based index (tables without a
header). With neither: the columns named text and label (any case); else a two-column table is label
then text. A table has a header when its first row holds a column named text or label (any case) or
one of the names given. .csv is quoted the usual way; .tsv has no quoting (a tab-separated value may
start with a quote). UTF-8, with or without a BOM, any line ending.

The prepared folder, per split (train, val, test), published all or nothing like chat data
(build.publish):
    <split>.bin           token ids (dataset.token_dtype): each text's tokens, then <|endoftext|>
    <split>_offsets.npy   int64, n + 1 positions: example i is ids[offsets[i]:offsets[i + 1]]
    <split>_labels.npy    int64 class index into meta["labels"] (sorted, or the order of --labels)
    meta.json             kind "classify", labels, columns, class counts, skipped rows, lengths
"""
import csv
import hashlib
import json
import os
from collections import Counter

import numpy as np
import torch

from . import chat
from .classifier import pad_batch
from .build import build_and_publish
from .dataset import (CLASSIFY_SPLITS, dataset_folder, format_fields, load_dataset, read_array,
                      read_meta, read_tokens, write_tokens)
from .errors import ConfigError, InputError, RecordError
from .preference import load_preference
from .records import JOIN, check_input_file, iter_records, split_names

SPLITS = CLASSIFY_SPLITS
TABLES = (".csv", ".tsv")


# --------------------------------------------------------------------------------------------------
# Reading input files


def table_rows(path, hasher):
    """(line, cells) per row of a .csv / .tsv file; line is where the row starts (a quoted
    field may span lines)."""
    tsv = path.endswith(".tsv")
    with open(path, "rb") as f:
        hasher.update(f.read())
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t" if tsv else ",",
                                quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
            line = 1
            for cells in reader:
                if cells:  # a blank line is no row
                    yield line, cells
                line = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start}): save it as UTF-8") from None
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: unreadable {'TSV' if tsv else 'CSV'}: "
                         f"{e}") from None


def _index(spec):
    return int(spec) if spec.isdigit() else None


def table_columns(path, first, text_spec, label_spec):
    """(text column indexes, label column index, has_header, their names) of a table, from its
    first row."""
    lowered = [c.strip().lower() for c in first]
    named = [s for s in text_spec + [label_spec] if s and _index(s) is None]
    header = bool({"text", "label"} & set(lowered)) or any(s.lower() in lowered for s in named)
    if named and not header:
        raise InputError(f"{path}:1: no header row naming {', '.join(map(repr, named))} "
                         f"(first row: {first}); "
                         f"name columns by 0-based index in a file without a header")

    def find(spec):
        if _index(spec) is not None:
            if _index(spec) >= len(first):
                raise InputError(f"{path}:1: column {spec} does not exist: "
                                 f"the first row has {len(first)} columns")
            return _index(spec)
        if spec.lower() not in lowered:
            raise InputError(f"{path}:1: no column {spec!r} in the header {first}")
        return lowered.index(spec.lower())

    if text_spec or label_spec:
        text = [find(s) for s in text_spec] if text_spec else None
        label = find(label_spec) if label_spec else None
    else:
        text = [lowered.index("text")] if header and "text" in lowered else None
        label = lowered.index("label") if header and "label" in lowered else None
    if len(first) == 2 and (text is None) != (label is None):  # the other one of two columns
        text, label = text or [1 - label], label if label is not None else 1 - text[0]
    if text is None and label is None and len(first) == 2:
        text, label = [1], 0
    if text is None or label is None:
        raise InputError(f"{path}:1: which column is the {'text' if text is None else 'label'}? "
                         f"pass --text_column and --label_column "
                         f"(names, or 0-based indexes without a header); first row: {first}")
    names = [first[i] if header else str(i) for i in text + [label]]
    return text, label, header, names


def table_examples(path, text_spec, label_spec, hasher):
    """(where, {column: value}, text columns, label column) per data row of a table."""
    rows = table_rows(path, hasher)
    first = next(rows, None)
    if first is None:
        raise InputError(f"{path}: empty file: no rows")
    text, label, header, names = table_columns(path, first[1], text_spec, label_spec)
    columns = {"text": names[:-1], "label": names[-1], "header": header}
    for line, cells in ([] if header else [first]) + [r for r in rows]:
        values = {n: cells[i] for n, i in zip(names, text + [label]) if i < len(cells)}
        yield f"{path}:{line}", values, columns


def record_examples(path, text_spec, label_spec, hasher):
    """The same for .jsonl / .json records: the columns are keys (by default text / label, any
    case)."""
    if any(_index(s) is not None for s in text_spec + [label_spec] if s):
        raise ConfigError(f"{path}: records have no column order: "
                          f"name their keys in --text_column/--label_column")
    for where, record in iter_records(path, hasher):
        if isinstance(record, RecordError):
            raise record
        if not isinstance(record, dict):
            raise RecordError(where, f"a record must be a JSON object, got {type(record).__name__}",
                              "wrong type")
        keys = {k.lower(): k for k in record}
        text = text_spec or [keys.get("text", "text")]
        label = label_spec or keys.get("label", "label")
        yield where, record, {"text": text, "label": label, "header": True}


def check_example(where, values, columns, labels):
    """(text, label) of one row, or RecordError naming the column: missing, empty, or a label
    not in labels."""
    parts = []
    for name in columns["text"] + [columns["label"]]:
        if name not in values or values[name] is None:
            raise RecordError(where, f"column {name!r}: missing", "missing column")
    for name in columns["text"]:
        if not isinstance(values[name], str):
            raise RecordError(where, f"column {name!r}: text must be a string, "
                                     f"got {type(values[name]).__name__}", "wrong type")
        parts.append(values[name])
    text, label = JOIN.join(parts), values[columns["label"]]
    if not text.strip():
        raise RecordError(where, f"column {'+'.join(map(repr, columns['text']))}: empty text",
                          "empty text")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RecordError(where, f"column {columns['label']!r}: "
                                 f"a label is a string or an integer, got "
                                 f"{type(label).__name__}", "wrong type")
    label = str(label).strip()
    if not label:
        raise RecordError(where, f"column {columns['label']!r}: empty label", "empty label")
    if labels and label not in labels:
        raise RecordError(where, f"column {columns['label']!r}: "
                                 f"label {label!r} is not one of --labels "
                                 f"{','.join(labels)}", "label not in --labels")
    return text, label


def read_examples(path, text_column="", label_column="", labels=(), skip_invalid=False, stats=None):
    """[(text, label)] of one input file, its columns and sha256. Bad rows raise RecordError, or
    with skip_invalid are counted in stats["skipped"] by reason. labels: the allowed labels
    (empty: any)."""
    check_input_file(path)
    text_spec, label_spec = split_names(text_column), str(label_column or "")
    hasher, stats = hashlib.sha256(), (stats if stats is not None
                                       else {"skipped": Counter(), "rows": 0})
    if path.endswith(TABLES):
        rows = table_examples(path, text_spec, label_spec, hasher)
    elif path.endswith((".jsonl", ".json")):
        rows = record_examples(path, text_spec, label_spec, hasher)
    else:
        raise InputError(f"{path}: unsupported extension for --task=classify "
                         "(expected .csv, .tsv, .jsonl, .json)")
    examples, columns = [], None
    while True:
        try:
            where, values, columns = next(rows)
            stats["rows"] += 1
            examples.append(check_example(where, values, columns, labels))
        except StopIteration:
            break
        except RecordError as e:
            if not skip_invalid:
                raise
            stats["skipped"][e.reason] += 1
    return examples, columns, hasher.hexdigest()


def column_flags(columns):
    """The --text_column / --label_column values that read a file as the dataset was read
    (from a checkpoint's "classify"["columns"])."""
    return ",".join(columns["text"]), columns["label"]


def read_labelled(path, columns, labels):
    """(texts, label indexes into labels) of a labelled file read with the columns the model was
    trained on; a row whose label is not one of labels is an error naming file:line."""
    examples, _, _ = read_examples(path, *column_flags(columns), labels=labels)
    if not examples:
        raise InputError(f"{path}: no rows")
    index = {label: i for i, label in enumerate(labels)}
    return ([t for t, _ in examples],
            np.asarray([index[label] for _, label in examples], dtype=np.int64))


def read_texts(path, columns):
    """The texts of a file to classify: a .txt holds one per non-empty line; a .jsonl / .json holds
    records with the text column(s) the model was trained on (joined the same way); a table is read
    as in training."""
    check_input_file(path)
    if path.endswith(".txt"):
        with open(path, encoding="utf-8-sig") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    if path.endswith(TABLES):  # read as in training, the label column included (and ignored)
        return [text for text, _ in read_examples(path, *column_flags(columns))[0]]
    texts = []
    for where, record, _ in record_examples(path, columns["text"], "", hashlib.sha256()):
        missing = [k for k in columns["text"] if not isinstance(record.get(k), str)]
        if missing:
            raise RecordError(where, f"column {missing[0]!r}: missing or not a string",
                              "missing column")
        texts.append(JOIN.join(record[k] for k in columns["text"]))
    return texts


# --------------------------------------------------------------------------------------------------
# The split and the prepared dataset


def sort_labels(labels):
    """Integers in numeric order (2 before 10), anything else as strings."""
    labels = set(labels)
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def stratified_split(labels, val_fraction, test_fraction, seed, balance=False):
    """{split: sorted example indexes}: each class split on its own in the same proportions,
    deterministic from seed; balance first downsamples every class to the smallest one's count.
    Train keeps at least one per class."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    keep = counts.min() if balance else None
    parts = {s: [] for s in SPLITS}
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))[:keep]
        n = len(idx)
        n_test = min(round(n * test_fraction), n - 1)
        n_val = min(round(n * val_fraction), n - 1 - n_test)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {s: np.sort(np.concatenate(p)).astype(np.int64) for s, p in parts.items()}


def write_split(folder, split, ids_list, label_ids, vocab_size):
    """<split>.bin, <split>_offsets.npy, <split>_labels.npy; returns the split's token count."""
    lengths = np.asarray([len(ids) for ids in ids_list], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(ids_list) if ids_list else np.zeros(0)
    write_tokens(os.path.join(folder, f"{split}.bin"), flat, vocab_size)
    np.save(os.path.join(folder, f"{split}_offsets.npy"), offsets)
    np.save(os.path.join(folder, f"{split}_labels.npy"), np.asarray(label_ids, dtype=np.int64))
    return int(offsets[-1])


def build_classify_dataset(inputs, out_dir, text_column="", label_column="", labels="",
                           balance=False, val_fraction=0.1, test_fraction=0.2, seed=1337,
                           skip_invalid=False):
    """Read, split, tokenise and publish a classification dataset at out_dir (all or
    nothing). Returns meta."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ConfigError(f"--val_fraction ({val_fraction}) and --test_fraction ({test_fraction}) "
                          f"must each be in [0, 1) (val above 0) and leave something to train on")
    options = dict(text_column=text_column, label_column=label_column, labels=split_names(labels),
                   balance=balance, val_fraction=val_fraction, test_fraction=test_fraction,
                   seed=seed, skip_invalid=skip_invalid)
    return build_and_publish(out_dir, lambda tmp: _build(tmp, inputs, options))


def _build(tmp, inputs, o):
    stats, examples, hashes, columns = {"skipped": Counter(), "rows": 0}, [], {}, None
    for path in inputs:
        found, file_columns, hashes[path] = read_examples(
            path, o["text_column"], o["label_column"], o["labels"], o["skip_invalid"], stats)
        examples += found
        columns = columns or file_columns
    label_names = o["labels"] or sort_labels(label for _, label in examples)
    if len(label_names) < 2:
        raise InputError(f"{len(examples)} usable row(s) with {len(label_names)} label(s) "
                         f"{label_names}: a classifier needs at least 2 labels")
    index = {name: i for i, name in enumerate(label_names)}
    y = np.asarray([index[label] for _, label in examples], dtype=np.int64)
    parts = stratified_split(y, o["val_fraction"], o["test_fraction"], o["seed"], o["balance"])
    if not len(parts["train"]) or not len(parts["val"]):
        raise InputError(f"only {len(examples)} usable row(s): too few to split train/val/test")
    ids = chat.get_encoder().encode_ordinary_batch([text for text, _ in examples])
    ids = [np.asarray(t + [chat.EOT], dtype=np.int64) for t in ids]
    vocab_size = chat.VOCAB_SIZE
    tokens = {s: write_split(tmp, s, [ids[i] for i in parts[s]], y[parts[s]], vocab_size)
              for s in SPLITS}
    used = np.concatenate([parts[s] for s in SPLITS])
    lengths = np.asarray([len(ids[i]) for i in used])
    meta = {**format_fields(vocab_size), "kind": "classify", "labels": label_names,
            "columns": {**columns, "join": JOIN},
            "tokenizer": chat.TOKENIZER, "vocab_size": vocab_size, "template": None,
            "default_stop": None,
            "multiline_replies": False, "rows": {"read": stats["rows"], "used": len(examples)},
            "skipped": dict(stats["skipped"]), "balanced": bool(o["balance"]),
            "examples": {s: len(parts[s]) for s in SPLITS}, "tokens": tokens,
            "class_counts": {s: {n: int((y[parts[s]] == i).sum())
                                 for i, n in enumerate(label_names)} for s in SPLITS},
            "length_percentiles": {f"p{q}": int(np.percentile(lengths, q))
                                   for q in (50, 90, 99, 100)},
            "sources": hashes, "seed": o["seed"], "val_fraction": o["val_fraction"],
            "test_fraction": o["test_fraction"]}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


# --------------------------------------------------------------------------------------------------
# Reading the prepared dataset: batches


class ClassifyData:
    """One split of a classification dataset, memory-mapped; right-padded batches of whole
    examples."""

    def __init__(self, folder, split, meta=None):
        path = os.path.join(folder, f"{split}.bin")
        self.ids = read_tokens(folder, f"{split}.bin", meta or read_meta(folder))
        self.offsets = read_array(os.path.join(folder, f"{split}_offsets.npy"))
        self.labels = read_array(os.path.join(folder, f"{split}_labels.npy"))
        if len(self.offsets) != len(self.labels) + 1 or (
                len(self.offsets) and self.offsets[-1] != len(self.ids)):
            raise InputError(f"{path}: {len(self.ids)} tokens, {len(self.offsets)} offsets and "
                             f"{len(self.labels)} labels do not agree: "
                             f"the dataset is incomplete, run prepare.py again")

    def __len__(self):
        return len(self.labels)

    def batch(self, indexes, block_size):
        """(ids (B, T), lengths (B,), labels (B,)): T the longest example, at most block_size; a
        longer text keeps its end (the last tokens, <|endoftext|> last); padding (<|endoftext|>)
        follows each example's last token."""
        texts = [self.ids[self.offsets[i]:self.offsets[i + 1]][-block_size:] for i in indexes]
        return pad_batch(texts) + (
            torch.as_tensor(np.asarray(self.labels[list(indexes)], dtype=np.int64)),)

    def get_batch(self, batch_size, block_size, generator):
        """A random batch in the shape training.train_step / evaluate expect: (x, y, m) with the
        label as the target of each example's last real token, the only position whose mask is 1."""
        indexes = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        return as_targets(*self.batch(indexes, block_size))


def as_targets(x, lengths, labels):
    """(x, y, m): y -1 and m 0 everywhere but at each row's last real token (lengths - 1): the
    label, mask 1."""
    rows = torch.arange(len(x))
    y = torch.full(x.shape, -1, dtype=torch.long)
    m = torch.zeros(x.shape, dtype=torch.float32)
    y[rows, lengths - 1] = labels
    m[rows, lengths - 1] = 1.0
    return x, y, m


def load_prepared(dataset):
    """({split: data}, meta) of any kind of prepared dataset: ClassifyData splits (train, val,
    test) for a classification dataset, PreferenceData for preference pairs, else
    dataset.load_dataset's ChatData."""
    folder = dataset_folder(dataset)
    meta = read_meta(folder)
    if meta.get("kind") == "preference":
        return load_preference(folder)
    if meta.get("kind") != "classify":
        return load_dataset(dataset)
    if not isinstance(meta.get("labels"), list) or len(meta["labels"]) < 2:
        raise InputError(f"{folder}/meta.json: no list of labels: "
                         "run prepare.py --task=classify again")
    return {s: ClassifyData(folder, s, meta) for s in SPLITS}, meta
