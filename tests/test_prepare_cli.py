"""prepare.py as a command: its summary, the files it writes, its one-line errors (exit code 1), and a prepare.py
killed at every rename (the old dataset or the new one, never a mix)."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import helpers
import prepare
from chat_gpt2 import build, dataset
from helpers import GOOD, dataset_text, make_legacy, read_meta, records_file, run, script, state, write_records


@pytest.mark.slow
def test_prepare_cli_summary_and_files(cli_run):
    """conftest's cli_run: `python prepare.py chat.jsonl --out_dir=data/chat --seed=3` from a fresh folder."""
    assert "32 read (29 train / 3 val)" in cli_run["prepare"].replace(",", "")
    out = cli_run["cwd"] / "data" / "chat"
    assert "wrote data/chat/{train,val}.bin" in cli_run["prepare"]
    for name in ("train.bin", "val.bin", "train_mask.bin", "val_mask.bin", "train_turns.npy", "val_turns.npy",
                 "train_convs.npy", "val_convs.npy", "meta.json"):
        assert os.path.getsize(out / name) > 0, name
    meta = read_meta(out)
    assert meta["conversations"] == {"train": 29, "val": 3} and meta["seed"] == 3


def test_cli_error_exit_code_and_message(tmp_path, existing_dataset, capsys):
    out, before = existing_dataset
    path = write_records(tmp_path / "d.jsonl", [GOOD, {"user": 1, "assistant": "b"}])
    assert prepare.main([path, f"--out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}:2: field 'user' must be a string" in err and "--skip_invalid" in err
    assert state(out) == before



# ---------------------------------------------------------------------------------------------------------------
# Killed at every rename


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


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["symlinked", "legacy-files"])
def test_prepare_killed_at_every_rename_leaves_old_or_new_never_a_mix(tmp_path, legacy):
    old_src, new_src = records_file(tmp_path / "old.jsonl", 12, "old"), records_file(tmp_path / "new.jsonl", 12, "new")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=helpers.REPO))
    reference = {}
    for name, src in (("old", old_src), ("new", new_src)):
        build.build_dataset([src], out_dir=str(tmp_path / name))
        reference[name] = dataset_text(str(tmp_path / name))
    outcomes = set()
    # renames: the .dataset switch, then (converting a legacy folder only) one per file name
    for k in range(1, 2 + (1 + len(dataset.DATASET_FILES) if legacy else 1)):
        out = str(tmp_path / f"run{k}")
        build.build_dataset([old_src], out_dir=out)
        if legacy:
            make_legacy(out)
        p = subprocess.run([sys.executable, str(killer), str(k), new_src, f"--out_dir={out}"], env=helpers.env(),
                           capture_output=True, text=True, timeout=120)
        seen = dataset_text(out)
        assert seen in (reference["old"], reference["new"]) or seen.startswith("refused: ") and "builds" in seen, k
        outcomes.add("killed" if p.returncode == -signal.SIGKILL else "finished")
        build.clean_out_dir(out)  # the next start: leftovers removed, an interrupted switch completed
        assert dataset_text(out) in (reference["old"], reference["new"]), k
        current = [os.readlink(f"{out}/.dataset")] if os.path.islink(f"{out}/.dataset") else []  # [] : legacy kept
        assert [n for n in os.listdir(out) if n.startswith(".prepare-")] == current
        assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert outcomes == {"killed", "finished"}  # some k hit a rename, the largest ran past all of them


def test_help_shows_defaults_and_a_misspelt_option_gets_a_suggestion(tmp_path):
    """prepare.py is parsed by the configurator: --help lists every key with its default and meaning (from the
    comments of prepare.DEFAULTS), a misspelt key is refused with the closest one (exit 2, nothing written)."""
    p = run([script("prepare.py"), "--help"], tmp_path)
    assert p.stdout.startswith("usage: prepare.py [config.py ...] [INPUTS ...]")
    for key, default in prepare.DEFAULTS.items():
        assert f"  --{key}={default!r}  (" in p.stdout, key
    assert "--out_dir='data/chat'  (str)  the dataset folder to write" in p.stdout
    assert "--val_fraction=0.1  (float)" in p.stdout and "--skip_invalid=False  (bool)" in p.stdout
    p = run([script("prepare.py"), "x.jsonl", "--val_fractoin=0.2"], tmp_path, check=False)
    assert p.returncode == 2 and "unknown config key 'val_fractoin' (did you mean 'val_fraction'?)" in p.stderr
    p = run([script("prepare.py"), "--out_dir=data/x"], tmp_path, check=False)
    assert p.returncode == 2 and "error: no input files" in p.stderr
    assert os.listdir(tmp_path) == []


def test_positional_inputs_and_bare_flags_as_before(tmp_path, capsys):
    """Every spelling the argparse version took: inputs anywhere among the options, `--key value`, bare boolean
    flags before an input, --val_file, an empty --test_fraction meaning 0."""
    a = write_records(tmp_path / "a.jsonl", [GOOD] * 3 + [{"user": 1, "assistant": "bad"}])
    b = write_records(tmp_path / "b.json", [{"user": f"q{i}", "assistant": f"a{i}"} for i in range(6)])
    out = str(tmp_path / "out")
    assert prepare.main(["--skip_invalid", a, "--out_dir", out, b, "--dedupe", "--seed=5"]) == 0
    meta = read_meta(out)
    assert list(meta["sources"]) == [a, b] and meta["seed"] == 5 and meta["skipped"] == {"wrong type": 1}
    assert meta["duplicates"] == {"repeats": 2, "removed": 2, "val_in_train": 0}
    assert sum(meta["conversations"].values()) == 7 and "test" not in meta
    val = write_records(tmp_path / "val.jsonl", [GOOD, {"user": "v", "assistant": "w"}])
    assert prepare.main([b, f"--out_dir={out}", f"--val_file={val}"]) == 0
    assert read_meta(out)["conversations"] == {"train": 6, "val": 2} and read_meta(out)["val_fraction"] is None
    capsys.readouterr()
    assert prepare.main([b, f"--out_dir={out}", "--test_fraction=x"]) == 1
    assert prepare.main([b, f"--out_dir={out}", "--task=clasify"]) == 1
    err = capsys.readouterr().err
    assert "error: --test_fraction must be a number, got 'x'" in err and "error: --task must be chat or classify" in err
