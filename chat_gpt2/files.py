"""Writing files so that a crash never leaves a torn one: write a temporary file beside the target, then rename.

Every writer of the project goes through atomic_write (checkpoints, replies, demo data) or temporary_dir (a whole
dataset or export built beside its destination and moved into place at the end).
"""
import contextlib
import json
import os
import shutil
import tempfile


def temp_name(path):
    """The temporary name a file is written under before it replaces path: `<path>.tmp<PID>`."""
    return f"{path}.tmp{os.getpid()}"


@contextlib.contextmanager
def atomic_write(path, mode="w", encoding="utf-8"):
    """Open a temporary file for writing; on success it replaces path in one rename, on failure it is removed.
    mode: "w" (text) or "wb" (binary)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding, newline=None if "b" in mode else "\n") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_jsonl(path, rows):
    """Write rows (JSON-able objects) one per line, atomically."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def temporary_dir(parent, prefix):
    """A fresh hidden folder inside parent (created if needed), removed with whatever is left in it at the end."""
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
