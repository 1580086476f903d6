"""The prepared dataset (chat or text), read back for train.py and eval.py: load_dataset -> one
ChatData per split, memory-mapped, whose batches are windows that start on a turn boundary. build.py
builds it (prepare.py). Its files, all aligned token for token, in one folder (their names are
defined here):

    {train,val}.bin        token ids, uint16 (or uint32: meta.json's token_dtype, see token_dtype)
    {train,val}_mask.bin   uint8, 1 where the assistant's output is learned (see chat.py); chat only
    {train,val}_turns.npy  int64 offsets where a turn starts (training windows start only there)
    {train,val}_convs.npy  int64 offsets where a conversation starts
    meta.json              format, token dtype, kind ("chat" or "text"), tokenizer, vocab size,
                           template, counts, sources
    tokenizer.json         a trained tokenizer (prepare.py --tokenizer=DIR; tokenizer.py), if any
Plain text (kind "text": .txt files, {"text"} records) is every token learned, each document closed
by <|endoftext|>; it has no mask file (format 2), its "conversations" are the documents, and its
windows start anywhere. Each name is a symlink into the build folder `.dataset` points to
(build.py); a folder of plain files (an older or copied dataset) reads the same.

Format versions (meta.json "format"; docs/data.md): 1 (no "format" key): uint16 ids, a mask file
for every split, text included; 2: ids in meta.json's "token_dtype" (uint16 up to 65,536 ids, else
uint32), no mask file for text. Both are read; another version is refused.
"""
import json
import os

import numpy as np

from . import chat
from .errors import InputError, MissingFileError
from .tokenizer import attach

SPLITS = ("train", "val")
# per split: train.bin, train_mask.bin, ...
SPLIT_FILES = (".bin", "_mask.bin", "_turns.npy", "_convs.npy")
DATASET_FILES = tuple(f"{s}{suffix}" for s in SPLITS for suffix in SPLIT_FILES) + ("meta.json",)
# held-out conversations (--test_fraction), for eval.py --data; a trained tokenizer (tokenizer.py)
OPTIONAL_FILES = ("test.jsonl", "tokenizer.json")
# a classification dataset (kind "classify", classify_data.py): per split its tokens, text offsets
# and labels
CLASSIFY_SPLITS = ("train", "val", "test")
CLASSIFY_FILES = tuple(f"{s}{suffix}" for s in CLASSIFY_SPLITS
                       for suffix in (".bin", "_offsets.npy", "_labels.npy")) + ("meta.json",)
# a preference dataset (kind "preference", preference.py): per split the three sides' tokens and
# where each pair's sides start
PREFERENCE_FILES = tuple(f"{s}{suffix}" for s in SPLITS for suffix in
                         ("_prompt.bin", "_chosen.bin", "_rejected.bin", "_pairs.npy")) + ("meta.json",)
# every name a build may publish
ALL_FILES = tuple(dict.fromkeys(DATASET_FILES + CLASSIFY_FILES + PREFERENCE_FILES
                                + OPTIONAL_FILES))
# a format-2 text dataset: every token learned, no mask file
TEXT_FILES = tuple(name for name in DATASET_FILES if not name.endswith("_mask.bin"))
CURRENT = ".dataset"  # symlink to the build folder the names point into
# tokens of the mask summed at a time when finding windows with something to learn
SCAN_TOKENS = 1 << 24
FORMAT = 2  # meta.json's "format" of what is written now; no "format" key: version 1
TOKEN_DTYPES = ("uint16", "uint32")  # meta.json's "token_dtype" (format 2)


def token_dtype(vocab_size):
    """The dtype token ids are stored in: uint16 while every id fits (at most 65,536 ids, as
    GPT-2's 50,257), else uint32. Every writer of token files takes it from here."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def format_fields(vocab_size):
    """The fields every writer puts in meta.json: {"format": 2, "token_dtype": "uint16"}."""
    return {"format": FORMAT, "token_dtype": token_dtype(vocab_size).name}


def stored_dtype(meta):
    """The dtype of a dataset's token files (read_meta has checked its meta.json)."""
    return np.dtype(meta["token_dtype"] if meta.get("format", 1) >= 2 else np.uint16)


def read_tokens(folder, name, meta):
    """A token file of a prepared dataset, memory-mapped in its stored dtype: every reader of
    token ids goes through here."""
    return read_array(os.path.join(folder, name), stored_dtype(meta))


def write_tokens(path, ids, vocab_size):
    """ids (any integer array) written to path in token_dtype(vocab_size) (classification and
    preference data; chat and text data stream through build.TokenWriter)."""
    np.asarray(ids).astype(token_dtype(vocab_size)).tofile(path)


def check_format(meta, meta_path):
    """A meta.json's format version (1 or 2) and token dtype, or an InputError naming the field."""
    version = meta.get("format", 1)
    if isinstance(version, bool) or version not in (1, FORMAT):
        raise InputError(f"{meta_path}: field 'format': version {version!r} is not one this "
                         f"version of chat-gpt2 reads (1 to {FORMAT}): update it, or prepare the "
                         "dataset again")
    if version >= 2 and meta.get("token_dtype") not in TOKEN_DTYPES:
        raise InputError(f"{meta_path}: field 'token_dtype': {meta.get('token_dtype')!r} is not "
                         f"one of {', '.join(TOKEN_DTYPES)}: prepare the dataset again")


def dataset_files(meta):
    """The file names a dataset with this meta.json has (by kind and format)."""
    kind = meta.get("kind")
    if kind in ("classify", "preference"):
        return CLASSIFY_FILES if kind == "classify" else PREFERENCE_FILES
    return TEXT_FILES if kind == "text" and meta.get("format", 1) >= 2 else DATASET_FILES


class ChatData:
    """One split of a prepared dataset, memory-mapped. Batches are windows of block_size + 1 tokens
    starting at a turn boundary (so an answer is never trained without its question); a window may
    run into the following conversations and is padded (target -1, mask 0) at the end of the split.
    Plain-text data (kind "text") has no questions to keep: its windows start anywhere, as in
    nanoGPT."""

    def __init__(self, folder, split, meta):
        self.kind, self._useful = meta.get("kind") or "chat", {}
        self.eot = chat.get_encoder(meta["tokenizer"]).eot_token  # the tokenizer's: pads windows
        expected_tokens = int(meta["tokens"][split])
        path = os.path.join(folder, f"{split}.bin")
        self.ids = read_tokens(folder, f"{split}.bin", meta)
        if f"{split}_mask.bin" in dataset_files(meta):
            self.mask = read_array(os.path.join(folder, f"{split}_mask.bin"), np.uint8)
        else:  # every token learned: a read-only view of one 1, no array of the split's length
            self.mask = np.broadcast_to(np.ones(1, dtype=np.uint8), self.ids.shape)
        self.starts = read_array(os.path.join(folder, f"{split}_turns.npy"))
        self.convs = read_array(os.path.join(folder, f"{split}_convs.npy"))
        if len(self.ids) != expected_tokens or len(self.mask) != expected_tokens:
            raise InputError(f"{path}: {len(self.ids)} tokens / {len(self.mask)} mask entries but "
                             f"meta.json says {expected_tokens}: the dataset is incomplete, run "
                             "prepare.py again")

    def get_batch(self, batch_size, block_size, generator):
        # here, not at the top: prepare.py (building datasets) runs without torch's slow import
        import torch
        if self.kind == "text":
            starts = torch.randint(max(1, len(self.ids) - block_size), (batch_size,),
                                   generator=generator).numpy()
        else:
            starts = self.useful_starts(block_size)
            starts = starts[torch.randint(len(starts), (batch_size,), generator=generator).numpy()]
        x = np.full((batch_size, block_size), self.eot, dtype=np.int64)
        y = np.full((batch_size, block_size), -1, dtype=np.int64)
        m = np.zeros((batch_size, block_size), dtype=np.float32)
        for row, start in enumerate(starts):
            window = self.ids[start:start + block_size + 1].astype(np.int64)
            n = len(window) - 1  # block_size, or fewer at the end of the split
            x[row, :n] = window[:-1]
            y[row, :n] = window[1:]
            m[row, :n] = self.mask[start + 1:start + n + 1]
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)

    def useful_starts(self, block_size):
        """The turn starts whose window has a learned token among its block_size targets: a window
        of a long conversation whose reply lies beyond it would train nothing (all of them when none
        has one)."""
        if block_size not in self._useful:
            keep = np.zeros(len(self.starts), dtype=bool)
            # in pieces: a cumulative sum of the whole mask is large
            for a in range(0, len(self.ids), SCAN_TOKENS):
                lo, hi = np.searchsorted(self.starts, [a, a + SCAN_TOKENS])
                if lo == hi:
                    continue
                window = self.mask[a + 1:a + SCAN_TOKENS + block_size + 1]
                learned = np.concatenate([[0], np.cumsum(window, dtype=np.int64)])
                s = np.asarray(self.starts[lo:hi]) - a
                keep[lo:hi] = learned[np.minimum(s + block_size, len(learned) - 1)] > learned[s]
            self._useful[block_size] = self.starts[keep] if keep.any() else self.starts
        return self._useful[block_size]

    def first_prompt(self):
        """Token ids of the first val conversation up to its first reply (for sample replies)."""
        end = self.convs[1] if len(self.convs) > 1 else len(self.ids)
        if self.kind == "text":  # everything is learned: a few words to continue
            return self.ids[:min(8, end - 1)].astype(np.int64).tolist()
        learned = np.flatnonzero(self.mask[:end])
        return self.ids[:learned[0] if len(learned) else end].astype(np.int64).tolist()


def read_array(path, dtype=None):
    """A .bin memory-mapped as dtype, or a .npy loaded; a failure is an InputError naming it."""
    try:
        if dtype is None:
            return np.load(path)
        if os.path.getsize(path) % np.dtype(dtype).itemsize:
            raise ValueError(f"its size is not a multiple of {np.dtype(dtype).itemsize} bytes")
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")
    except (OSError, ValueError, EOFError) as e:
        why = f"{type(e).__name__}: {e}"
        raise InputError(f"{path}: unreadable ({why}): run prepare.py again") from None


def dataset_folder(dataset):
    """--dataset names a folder under data/ (`chat`) or is a path (`data/chat`, `/abs/folder`)."""
    return dataset if os.path.isdir(dataset) or os.sep in dataset else os.path.join("data", dataset)


def read_meta(folder, names=None):
    """A dataset's meta.json, checked: all of names (default: its kind's) come from one build."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        raise MissingFileError(f"no prepared dataset at {folder!r} (missing meta.json): run "
                               f"`python prepare.py YOUR_DATA.jsonl --out_dir={folder}` first")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        {split: int(meta["tokens"][split]) for split in SPLITS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{meta_path}: not a prepared dataset's meta.json ({type(e).__name__}: "
                         f"{e}): run prepare.py again") from None
    check_format(meta, meta_path)
    meta["tokenizer"] = attach(meta.get("tokenizer", chat.TOKENIZER), folder)  # its text too
    names = names or dataset_files(meta)
    homes = {os.path.dirname(os.path.realpath(os.path.join(folder, name))) for name in names}
    if len(homes) > 1:
        raise InputError(f"{folder}: the dataset's files come from {len(homes)} different builds "
                         "(an interrupted or mixed copy): run prepare.py again")
    return meta


def load_dataset(dataset):
    """({split: ChatData}, meta) of a prepared dataset; a missing or broken file is an error."""
    folder = dataset_folder(dataset)
    meta = read_meta(folder)
    kind = meta.get("kind")  # datasets prepared before plain text existed have none: chat
    if kind in ("classify", "preference"):
        what = "a classification" if kind == "classify" else "a preference"
        raise InputError(f"{folder}: {what} dataset (kind {kind}): read it with "
                         f"classify_data.load_prepared")
    data = {split: ChatData(folder, split, meta) for split in SPLITS}
    return data, meta
