"""Writing outputs safely: export.py replaces only its own exports and follows a symlinked --out; a full disk gives a
one-line error from prepare.py, train.py, eval.py and export.py and never damages what was there."""
import os
import subprocess
import uuid

import pytest

import export
from chat_gpt2.errors import OutputError, OutputExistsError
from helpers import run, script, snapshot, tiny_model, tiny_train_args, write_records


def test_export_replaces_only_a_previous_export(tmp_path):
    model = tiny_model(block_size=16)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # an unrelated project's files with export-like names
    (folder / "vocab.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="holds no previous export"):
        export.export(model, str(folder))
    assert sorted(os.listdir(folder)) == ["config.json", "vocab.json"] and (folder / "config.json").read_text() == "{}"
    out = tmp_path / "hf"
    export.export(model, str(out))
    assert export.MARKER in os.listdir(out)
    export.export(model, str(out))  # a previous export of ours: replaced without --force
    assert sorted(os.listdir(out)) == sorted(export.EXPORT_FILES)


def test_export_through_a_symlink_and_a_dangling_one(tmp_path):
    model = tiny_model(block_size=16)
    target = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    target.mkdir()
    export.export(model, str(link))
    export.export(model, str(link))  # replacing through the link
    assert link.is_symlink() and sorted(os.listdir(target)) == sorted(export.EXPORT_FILES)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]  # no .tmp or .old leftovers
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(OutputExistsError, match="is a symlink to .*gone, which does not exist"):
        export.export(model, str(dangling))


@pytest.fixture
def full_disk(tmp_path):
    """A 1.5 MB tmpfs: a small dataset fits, a checkpoint or an export of a model does not."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root and mount rights): {p.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def one_line_error(p):
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "no space left" in lines[0], p.stderr
    return lines[0]


@pytest.mark.slow
def test_a_full_disk_is_a_clear_error_and_damages_nothing(full_disk, tmp_path, tiny_dataset, tiny_ckpt):
    small = write_records(tmp_path / "small.jsonl", [{"user": f"q{i}", "assistant": f"a{i}"} for i in range(10)])
    big = write_records(tmp_path / "big.jsonl", [{"user": "x " * 2000, "assistant": f"a{i}"} for i in range(300)])
    data = full_disk / "data"
    run([script("prepare.py"), small, f"--out_dir={data}"], tmp_path)
    before = snapshot(data)
    assert "dataset in" in one_line_error(run([script("prepare.py"), big, f"--out_dir={data}"], tmp_path, check=False))
    assert snapshot(data) == before  # the small dataset is still there, whole
    args = tiny_train_args(tiny_dataset, str(full_disk / "out"), n_embd=64, max_iters=2, eval_interval=1)
    assert "finetuned_" in one_line_error(run([script("train.py"), *args], tmp_path, check=False))
    assert not [n for n in os.listdir(full_disk / "out") if ".tmp" in n]
    assert "exporting to" in one_line_error(run([script("export.py"), f"--ckpt={tiny_ckpt}",
                                                 f"--out={full_disk / 'hf'}"], tmp_path, check=False))
    assert not (full_disk / "hf").exists() and not [n for n in os.listdir(full_disk) if ".tmp" in n]
    with open(full_disk / "filler", "wb") as f:  # fill what is left
        try:
            f.write(b"\0" * (2 << 20))
        except OSError:
            pass
    heldout = write_records(tmp_path / "h.jsonl", [{"user": "Hi", "assistant": "Hello"}] * 50)
    p = run([script("eval.py"), f"--ckpt={tiny_ckpt}", f"--data={heldout}", f"--out={full_disk / 'r.jsonl'}",
             "--device=cpu", "--max_new_tokens=20"], tmp_path, check=False)
    assert "r.jsonl" in one_line_error(p) and not (full_disk / "r.jsonl").exists()


def test_output_error_is_a_user_error():
    assert issubclass(OutputError, OSError)
