"""Nothing lost, nothing cryptic: a prepare.py killed at every rename, hostile records, broken prepared files, the
judge's API key, and measurements that must not move the global RNG."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import urllib.error

import numpy as np
import pytest
import torch

import helpers
from chat_gpt2 import dataset, device, judge, records
from chat_gpt2.errors import InputError, RecordError

# Runs prepare.py in a child whose k-th os.replace call kills the process with SIGKILL (no cleanup can run), as a
# crash or `kill -9` would at that step.
KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    k, calls = int(sys.argv[1]), [0]
    real = os.replace
    def replace(src, dst):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.replace = replace
    import prepare
    sys.exit(prepare.main(sys.argv[2:]))
""")


def records_file(path, n, tag):
    return helpers.write_records(path, [{"user": f"{tag} question {i}?", "assistant": f"{tag} answer {i}"}
                                        for i in range(n)])


def dataset_text(folder):
    """The decoded conversations of both splits, or the error loading them gives."""
    try:
        data, meta = dataset.load_dataset(folder)
    except InputError as e:
        return f"refused: {e}"
    return sorted(helpers.decode(data[s].ids[a:b]) for s in dataset.SPLITS
                  for a, b in zip(data[s].convs, list(data[s].convs[1:]) + [len(data[s].ids)]))


def make_legacy(folder):
    """Turn a prepared dataset into the old layout: regular files, no .dataset link, no build folder."""
    for name in dataset.DATASET_FILES:
        real = os.path.realpath(os.path.join(folder, name))
        os.remove(os.path.join(folder, name))
        shutil.copy(real, os.path.join(folder, name))
    shutil.rmtree(os.path.realpath(os.path.join(folder, dataset.CURRENT)))
    os.remove(os.path.join(folder, dataset.CURRENT))


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["symlinked", "legacy-files"])
def test_prepare_killed_at_every_rename_leaves_old_or_new_never_a_mix(tmp_path, legacy):
    old_src, new_src = records_file(tmp_path / "old.jsonl", 12, "old"), records_file(tmp_path / "new.jsonl", 12, "new")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=helpers.REPO))
    reference = {}
    for name, src in (("old", old_src), ("new", new_src)):
        dataset.build_dataset([src], out_dir=str(tmp_path / name))
        reference[name] = dataset_text(str(tmp_path / name))
    outcomes = set()
    # renames: the .dataset switch, then (converting a legacy folder only) one per file name
    for k in range(1, 2 + (1 + len(dataset.DATASET_FILES) if legacy else 1)):
        out = str(tmp_path / f"run{k}")
        dataset.build_dataset([old_src], out_dir=out)
        if legacy:
            make_legacy(out)
        p = subprocess.run([sys.executable, str(killer), str(k), new_src, f"--out_dir={out}"], env=helpers.env(),
                           capture_output=True, text=True, timeout=120)
        seen = dataset_text(out)
        assert seen in (reference["old"], reference["new"]) or seen.startswith("refused: ") and "builds" in seen, k
        outcomes.add("killed" if p.returncode == -signal.SIGKILL else "finished")
        dataset.clean_out_dir(out)  # the next start: leftovers removed, an interrupted switch completed
        assert dataset_text(out) in (reference["old"], reference["new"]), k
        current = [os.readlink(f"{out}/.dataset")] if os.path.islink(f"{out}/.dataset") else []  # [] : legacy kept
        assert [n for n in os.listdir(out) if n.startswith(".prepare-")] == current
        assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert outcomes == {"killed", "finished"}  # some k hit a rename, the largest ran past all of them


def test_a_mixed_dataset_is_refused(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    dataset.build_dataset([records_file(tmp_path / "a.jsonl", 10, "a")], out_dir=a)
    dataset.build_dataset([records_file(tmp_path / "b.jsonl", 10, "b")], out_dir=b)
    make_legacy(a)
    make_legacy(b)
    shutil.copy(f"{b}/train_turns.npy", f"{a}/train_turns.npy")  # sizes may match: the copy is still refused
    os.remove(f"{a}/train_turns.npy")
    os.symlink(f"{b}/train_turns.npy", f"{a}/train_turns.npy")
    with pytest.raises(InputError, match="different builds"):
        dataset.load_dataset(a)


def test_a_live_runs_build_folder_is_kept(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    live, dead = out / f".prepare-{os.getpid()}-abc", out / ".prepare-999999999-abc"
    live.mkdir(), dead.mkdir()
    (out / "notes.tmp999999999").write_text("a user's file, not ours")
    assert dataset.clean_out_dir(str(out)) == [dead.name]
    assert live.is_dir() and (out / "notes.tmp999999999").exists()


# ---------------------------------------------------------------------------------------------------------------
# Hostile records: a clean error naming file:line, or a counted skip, never a traceback


def read_all(path):
    return list(records.read_conversations(str(path)))


def test_deep_nesting_and_huge_integers_are_record_errors(tmp_path):
    good = json.dumps({"user": "Hi", "assistant": "Hello"})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, "[" * 100_000 + "]" * 100_000, '{"user": "x", "assistant": "y", "id": 1'
                               + "0" * 5000 + "}", good]) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: unreadable JSON: nested too deeply"):
        read_all(path)
    out = tmp_path / "out"
    meta = dataset.build_dataset([str(path)], out_dir=str(out), skip_invalid=True)
    assert meta["skipped"] == {"invalid JSON": 2} and sum(meta["conversations"].values()) == 2
    array = tmp_path / "bad.json"
    array.write_text(f"[{good},\n" + '{"user": "x", "assistant": "y", "n": ' + "9" * 5000 + "}]")
    with pytest.raises(InputError, match=r"bad.json\[1\] \(line 2\): unreadable JSON: Exceeds the limit"):
        read_all(array)


def test_oversized_record_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"user": "x" * 5000, "assistant": "y"}) + "\n"
                    + json.dumps({"user": "Hi", "assistant": "Hello"}) + "\n")
    items = list(records.iter_records(str(path), __import__("hashlib").sha256()))
    assert isinstance(items[0][1], RecordError) and "larger than" in str(items[0][1])
    assert items[1] == (f"{path}:2", {"user": "Hi", "assistant": "Hello"})  # the next line is read normally


def test_a_directory_given_as_input(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        read_all(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Broken prepared datasets: the error names the file


@pytest.fixture
def prepared(tmp_path):
    out = tmp_path / "data"
    dataset.build_dataset([records_file(tmp_path / "a.jsonl", 10, "a")], out_dir=str(out))
    make_legacy(str(out))
    return out


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "meta.json").write_text(""), "meta.json: not a prepared dataset"),
    (lambda d: (d / "meta.json").write_text('{"template": {}}'), "meta.json: not a prepared dataset"),
    (lambda d: (d / "train.bin").write_bytes(b"\x00" * 3), r"train.bin: unreadable .*multiple of 2"),
    (lambda d: (d / "val_turns.npy").write_bytes(b"garbage"), "val_turns.npy: unreadable"),
    (lambda d: (d / "val.bin").write_bytes(b""), r"val.bin: 0 tokens"),
])
def test_broken_prepared_files_are_named(prepared, damage, match):
    damage(prepared)
    with pytest.raises(InputError, match=match):
        dataset.load_dataset(str(prepared))


def test_dataset_given_as_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no prepared dataset at 'data/x'"):
        dataset.load_dataset("data/x")  # not data/data/x
    with pytest.raises(FileNotFoundError, match=r"no prepared dataset at 'data/chat'"):
        dataset.load_dataset("chat")


# ---------------------------------------------------------------------------------------------------------------
# The judge endpoint's API key


def test_api_key_only_over_https_or_to_this_host():
    assert judge.key_may_go_to("https://api.example.com/v1/chat/completions")
    assert judge.key_may_go_to("http://127.0.0.1:8000/v1/chat/completions")
    assert judge.key_may_go_to("http://localhost:8000/v1/chat/completions")
    assert not judge.key_may_go_to("http://api.example.com/v1/chat/completions")
    assert not judge.key_may_go_to("ftp://127.0.0.1/x")


def test_judge_endpoint_follows_no_redirect_and_sends_no_key_over_http(monkeypatch):
    from http.server import BaseHTTPRequestHandler, HTTPServer
    import threading
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.2:9/steal")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    try:
        row = {"prompt": "p", "reference": "r", "response": "r"}
        with pytest.raises(judge.JudgeError, match="redirect to http://127.0.0.2:9/steal refused"):
            judge.judge_with_endpoint(f"http://127.0.0.1:{server.server_port}/v1", "m", row, 5)
    finally:
        server.shutdown()
    assert seen == [("/v1/chat/completions", "Bearer sk-secret")]  # loopback http: the key is sent, once


# ---------------------------------------------------------------------------------------------------------------
# Measuring the peak FLOP/s must not move the global RNG (a resumed run's dropout masks depend on it)


def test_peak_measurement_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    device.measure_matmul_peak("cpu", "float32", sizes=(64,), repeats=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.isfinite(device.measure_matmul_peak("cpu", "float32", sizes=(64,), repeats=1))
