"""train.py when things go wrong: a diverging run, an interrupt on an eval iteration or at max_iters, leftovers of
killed runs, resuming a run that is not there, moved, or saved with a broken config."""
import os
import shutil
import signal

import pytest
import torch

import train
from chat_gpt2.checkpoint import load_checkpoint, save_checkpoint
from chat_gpt2.errors import CheckpointError, ConfigError, DivergedError
from helpers import checkpoints, load_ckpt, read_metrics, run, script, tiny_train_args, train_inprocess


def interrupt_at(monkeypatch, iteration):
    """Make train.py receive SIGINT during the step that reaches `iteration` (as Ctrl-C at that moment would)."""
    real, calls = train.clip_and_step, [0]

    def step(*args, **kwargs):
        real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == iteration:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(train, "clip_and_step", step)


def evals_and_steps(out):
    records = read_metrics(out)
    return ([r["iter"] for r in records if r["event"] == "eval"], [r["iter"] for r in records if r["event"] == "step"])


@pytest.mark.parametrize("stop_at", [6, 9], ids=["eval-iteration", "max_iters"])
def test_an_interrupted_eval_happens_on_resume(tmp_path, tiny_dataset, monkeypatch, stop_at):
    out = str(tmp_path / "out")
    args = tiny_train_args(tiny_dataset, out, max_iters=9, eval_interval=3, log_interval=1)
    interrupt_at(monkeypatch, stop_at)
    with pytest.raises(SystemExit) as e:
        train_inprocess(args)
    assert e.value.code == 130
    monkeypatch.undo()
    assert evals_and_steps(out)[0] == [0, 3, 6][:stop_at // 3]  # the eval at stop_at has not happened yet
    train_inprocess([f"--out_dir={out}", "--init_from=resume"])
    evals, steps = evals_and_steps(out)
    assert evals == [0, 3, 6, 9] and steps == list(range(1, 10))  # each once: none lost, none repeated
    last = load_ckpt(os.path.join(out, next(n for n in checkpoints(out) if n.endswith("_last.pt"))))
    assert last["iter_num"] == 9 and last["evaluated_at"] == 9


def test_a_killed_runs_log_is_cut_back_on_resume(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    train_inprocess(tiny_train_args(tiny_dataset, out, max_iters=6, eval_interval=3, log_interval=1))
    last = os.path.join(out, next(n for n in checkpoints(out) if n.endswith("_last.pt")))
    ckpt = load_checkpoint(last)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # as if the run went on past iter 6 and was killed
        f.write('{"event": "step", "iter": 7, "loss": 1.0}\n')
    train_inprocess([f"--out_dir={out}", "--init_from=resume", "--max_iters=8"])
    evals, steps = evals_and_steps(out)
    assert steps == list(range(1, 9)) and evals == [0, 3, 6, 8] and ckpt["iter_num"] == 6


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing_from_it(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    args = tiny_train_args(tiny_dataset, out, learning_rate=1e4, grad_clip=0.0, max_iters=40, eval_interval=20,
                           warmup_iters=0)
    with pytest.raises(DivergedError, match=r"non-finite training loss \(nan\) at iteration \d+: the run diverged") as e:
        train_inprocess(args)
    assert "--learning_rate" in str(e.value) and "--grad_clip=1.0" in str(e.value) and "float32" in str(e.value)
    for name in checkpoints(out):  # the eval at iteration 0 saved the model before it diverged, nothing after
        ckpt = load_ckpt(os.path.join(out, name))
        assert ckpt["iter_num"] == 0 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    p = run([script("train.py"), *args[:-1], f"--out_dir={tmp_path / 'cli'}"], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: non-finite training loss") and "Traceback" not in p.stderr


def test_leftovers_of_dead_runs_are_removed_at_start(tmp_path, tiny_dataset):
    out = tmp_path / "out"
    out.mkdir()
    dead, live = out / "finetuned_20250101_000000.pt.tmp999999999", out / f"finetuned_20250101_000000.pt.tmp{os.getpid()}"
    other = out / "notes.tmp999999999"  # not ours: kept
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    printed = train_inprocess(tiny_train_args(tiny_dataset, str(out), max_iters=1, eval_interval=1))
    assert f"removed 1 leftover(s) of interrupted runs: {dead.name}" in printed
    assert not dead.exists() and live.exists() and other.exists()


def test_resume_errors_and_a_moved_run(tmp_path, tiny_dataset, capsys):
    with pytest.raises(FileNotFoundError, match=r"no run to resume in .*--out_dir=") as e:
        train.main([f"--out_dir={tmp_path / 'nothing'}", "--init_from=resume"])
    assert "--ckpt" not in str(e.value)
    out = str(tmp_path / "out")
    train_inprocess(tiny_train_args(tiny_dataset, out, max_iters=3, eval_interval=3))
    moved = str(tmp_path / "moved")
    shutil.copytree(out, moved)
    train_inprocess([f"--out_dir={moved}", "--init_from=resume", "--max_iters=4"])
    assert evals_and_steps(moved)[0][-1] == 4 and evals_and_steps(out)[0][-1] == 3  # the copy went on, not the original
    last = os.path.join(moved, next(n for n in checkpoints(moved) if n.endswith("_last.pt")))
    ckpt = load_checkpoint(last)
    ckpt["config"].update(batch_size="lots", retired_key=1)
    save_checkpoint(last, ckpt)
    with pytest.raises(ConfigError, match=r"invalid value 'lots' for 'batch_size' in the config saved in .*_last.pt"):
        train.main([f"--out_dir={moved}", "--init_from=resume", "--max_iters=5"])
    assert "retired_key" in capsys.readouterr().err


@pytest.mark.parametrize("damage", [
    lambda c: c.pop("optimizer"),
    lambda c: c.pop("model_args"),
    lambda c: c.update(rng={"torch": "no state"}),
    lambda c: c["model"].pop(next(iter(c["model"]))),
], ids=["no-optimizer", "no-model_args", "bad-rng", "missing-tensor"])
def test_a_malformed_training_state_is_a_one_line_error(tmp_path, tiny_dataset, damage):
    out = str(tmp_path / "out")
    train_inprocess(tiny_train_args(tiny_dataset, out, max_iters=1, eval_interval=1))
    last = os.path.join(out, next(n for n in checkpoints(out) if n.endswith("_last.pt")))
    ckpt = load_checkpoint(last)
    damage(ckpt)
    save_checkpoint(last, ckpt)
    with pytest.raises(CheckpointError) as e:
        train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=2"])
    assert "\n" not in str(e.value)


KILL_AT_SAVE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
real = os.replace
def replace(src, dst):  # the rename that would complete a checkpoint: die just before it
    if ".tmp" in src and dst.endswith(".pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
import train
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_killed_during_a_save(tmp_path, tiny_dataset):
    """SIGKILL while the first checkpoint is being written: no torn checkpoint, and the next start removes the
    half-written file and trains."""
    from helpers import REPO
    killer = tmp_path / "kill_at_save.py"
    killer.write_text(KILL_AT_SAVE.format(repo=REPO))
    out = str(tmp_path / "out")
    args = tiny_train_args(tiny_dataset, out, max_iters=2, eval_interval=1)
    p = run([str(killer), *args], tmp_path, check=False)
    assert p.returncode == -signal.SIGKILL
    assert checkpoints(out) == [] and len([n for n in os.listdir(out) if ".pt.tmp" in n]) == 1
    p = run([script("train.py"), *args], tmp_path)
    assert "removed 1 leftover(s) of interrupted runs" in p.stdout
    assert not [n for n in os.listdir(out) if ".tmp" in n] and len(checkpoints(out)) == 2
