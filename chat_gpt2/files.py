"""Writing files so that a crash never leaves a torn one: write a
temporary file beside the target, then rename.

Every writer of the project goes through atomic_write (checkpoints, replies, demo data) or
temporary_dir (a whole dataset or export built beside its destination and moved into place at the
end).
"""
import contextlib
import errno
import json
import os
import shutil
import tempfile

from .errors import OutputError

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def disk_error(error, what):
    """An OutputError for a full or read-only disk (also as reported by libraries
    that wrap the OS error, such as torch's zip writer or safetensors), else None."""
    text = str(error)
    if (getattr(error, "errno", None) in DISK_ERRORS or "No space left" in text
            or "os error 28" in text or "unexpected pos" in text):
        return OutputError(f"{what}: no space left on the device (or it is read-only); "
                           "nothing was replaced")
    return None


def temp_name(path):
    """The temporary name a file is written under before it replaces path: `<path>.tmp<PID>`."""
    return f"{path}.tmp{os.getpid()}"


@contextlib.contextmanager
def atomic_write(path, mode="w", encoding="utf-8"):
    """Open a temporary file for writing; on success it replaces path
    in one rename, on failure it is removed.
    mode: "w" (text) or "wb" (binary)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding,
                  newline=None if "b" in mode else "\n") as f:
            yield f
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = disk_error(e, f"writing {path}")
        if full is None:
            raise
        raise full from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_jsonl(path, rows):
    """Write rows (JSON-able objects) one per line, atomically."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_temp_dir(parent, prefix):
    """A fresh folder `<prefix><PID>-<random>` inside parent (created if needed), with the usual
    permissions (not mkdtemp's 0700: it may become the user's output). The PID tells a later run a
    live writer's from a dead one's."""
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def temporary_dir(parent, prefix):
    """make_temp_dir, removed with whatever is left in it at the end."""
    tmp = make_temp_dir(parent, prefix)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid):
    """True when a process with this PID exists (ours included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def writer_pid(name, prefix):
    """The PID in a temporary name `<prefix><PID>-...` or
    `<name>.tmp<PID>`, or None when it holds none."""
    tail = name[len(prefix):] if prefix and name.startswith(prefix) else name.rpartition(".tmp")[2]
    digits = tail.split("-", 1)[0]
    return int(digits) if digits.isdigit() else None


def remove_dead_leftovers(folder, prefixes=(), temp_of=lambda name: False, keep=()):
    """Delete, in folder, the temporary folders `<prefix><PID>-...` and the files `<name>.tmp<PID>`
    (for the names temp_of(name) accepts) left by processes that no longer run; a live process's and
    those in keep stay. Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        base, dot_tmp, _ = name.rpartition(".tmp")
        if name in keep or (prefix is None and not (dot_tmp and temp_of(base))):
            continue
        pid = writer_pid(name, prefix or "")
        if pid is None or pid_alive(pid):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        removed.append(name)
    return removed
