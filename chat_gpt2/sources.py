"""Inputs that are tables rather than lines: parquet files streamed as records (a row is a record,
its columns the keys), and Hugging Face Hub datasets named hf://datasets/OWNER/NAME[@REVISION][/GLOB]
resolved to their parquet files in the Hub cache (huggingface_hub downloads them there first;
HF_HUB_OFFLINE=1 uses only the cache). docs/data.md#parquet-files-and-hugging-face-hub-datasets.

Memory stays bounded by one row group (how the file was written) plus PARQUET_BATCH_ROWS rows as
Python objects: pyarrow reads the file a record batch at a time, never the whole table. pyarrow and
huggingface_hub are imported here only when such an input is given.
"""
import fnmatch
import os
from urllib.parse import unquote

from .errors import InputError

HUB_PREFIX = "hf://datasets/"
HUB_FILES = "*.parquet"  # the files of a Hub dataset read when its name has no GLOB (at any depth)
PARQUET_BATCH_ROWS = 1024  # rows turned into Python records at a time
HASH_BYTES = 1 << 20  # the file is hashed in pieces as its rows are read (the progress line)


def is_hub(name):
    return name.startswith(HUB_PREFIX)


def expand_inputs(inputs):
    """The inputs with every Hub dataset name replaced by its local parquet files (sorted)."""
    return [path for name in inputs for path in (hub_files(name) if is_hub(name) else [name])]


def parse_hub_name(name):
    """hf://datasets/OWNER/NAME[@REVISION][/GLOB] -> (repo id, revision or None, glob or None)."""
    parts = name[len(HUB_PREFIX):].split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise InputError(f"{name}: a Hub dataset is hf://datasets/OWNER/NAME[@REVISION][/GLOB], "
                         "e.g. hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet")
    repo, revision = parts[1].split("@", 1) if "@" in parts[1] else (parts[1], None)
    # a revision with a slash is URL-encoded: @refs%2Fconvert%2Fparquet
    return (f"{parts[0]}/{repo}", unquote(revision) if revision else None,
            (parts[2] if len(parts) > 2 else "") or None)


def hub_files(name):
    """The local paths of a Hub dataset's parquet files matching its GLOB (default: every parquet
    file, only the train split's when the file names say which split they hold), downloaded into
    the Hub cache unless they are there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    repo, revision, pattern = parse_hub_name(name)
    try:
        folder = snapshot_download(repo, repo_type="dataset", revision=revision,
                                   allow_patterns=[pattern or HUB_FILES])
    except LocalEntryNotFoundError:
        raise InputError(f"{name}: not in the Hub cache and cannot be downloaded (offline, or "
                         "HF_HUB_OFFLINE=1): download it once with network, or set HF_HUB_CACHE "
                         "to where it is") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    found = sorted(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
                   for root, _, files in os.walk(folder, followlinks=True) for f in files)
    found = [f for f in found if fnmatch.fnmatch(f, pattern or HUB_FILES)]
    if pattern is None:
        found = train_split(found)
    if not found:
        raise InputError(f"{name}: no file matches {pattern or HUB_FILES!r} in {repo}"
                         + (f"@{revision}" if revision else ""))
    return [os.path.join(folder, f) for f in found]


def train_split(files):
    """The train split's files when some file or folder name says which split it holds (the Hub's
    train-00000-of-00004.parquet, train/0000.parquet), else all of them."""
    def split_of(path):
        for part in path.split("/"):
            for split in ("train", "validation", "valid", "test", "dev"):
                if part == split or part.startswith((f"{split}-", f"{split}.", f"{split}_")):
                    return split
        return None
    splits = [split_of(f) for f in files]
    return [f for f, s in zip(files, splits) if s == "train"] if "train" in splits else files


def open_parquet(path):
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path, pre_buffer=False)  # local files: no read-ahead of column chunks
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise InputError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def parquet_columns(path, schema_names, columns, wanted_keys):
    """The columns to read: columns (each must exist: else an error naming the file and the
    column), or those named like wanted_keys (the record keys that carry content)."""
    if columns:
        missing = [c for c in columns if c not in schema_names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r}; its columns: "
                             f"{', '.join(schema_names)}")
        return list(columns)
    found = [c for c in schema_names if c in wanted_keys]
    if not found:
        raise InputError(f"{path}: no text or chat column (its columns: {', '.join(schema_names)}):"
                         " pass --text_column=NAME for plain text, or name the columns as a "
                         "record's keys (docs/data.md)")
    return found


def iter_parquet(path, hasher, columns=None, wanted_keys=()):
    """(where, record) per row of a parquet file, where = "path:row N" (N from 0, as pyarrow and
    pandas number rows), record = {column: value} of the columns read (parquet_columns). hasher
    gets the file's bytes in order, as far as the rows read reach."""
    pf = open_parquet(path)
    names = pf.schema_arrow.names
    read = parquet_columns(path, names, columns, wanted_keys)
    size, total, row = os.path.getsize(path), max(1, pf.metadata.num_rows), 0
    with open(path, "rb") as raw:
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=read):
                for record in batch.to_pylist():
                    yield f"{path}:row {row}", record
                    row += 1
                feed(raw, hasher, size * row // total)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: unreadable parquet after row {row} "
                             f"({str(e).splitlines()[0]})") from None
        feed(raw, hasher, size)


def feed(f, hasher, upto):
    """hasher.update the bytes of f from where it is up to offset upto, in pieces."""
    while f.tell() < upto:
        hasher.update(f.read(min(HASH_BYTES, upto - f.tell())))
