"""train.py: schedule, early stopping, batches, the training loop, checkpoints, resume, signals, DDP."""
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from helpers import (EOT, checkpoints, decode, env, load_ckpt, read_metrics, run, script, tiny_train_args,
                     train_inprocess)
from chat_gpt2 import dataset, memory, training
from chat_gpt2.checkpoint import save_checkpoint
from chat_gpt2.model import GPT, GPTConfig

# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedule


def lr_cfg(**overrides):
    return {"decay_lr": True, "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": 10, "max_iters": 110,
            "lr_decay_iters": None, **overrides}


def test_get_lr_warmup_peak_decay_and_floor():
    cfg = lr_cfg()
    assert training.get_lr(0, cfg) == pytest.approx(1e-3 / 11)  # warmup start: never 0
    assert training.get_lr(5, cfg) == pytest.approx(1e-3 * 6 / 11)
    assert training.get_lr(9, cfg) == pytest.approx(1e-3 * 10 / 11)  # warmup end
    assert training.get_lr(10, cfg) == pytest.approx(1e-3)  # peak
    assert training.get_lr(60, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # halfway through the cosine
    assert training.get_lr(35, cfg) == pytest.approx(1e-4 + 0.5 * (1 + np.cos(np.pi / 4)) * 9e-4)
    assert training.get_lr(110, cfg) == pytest.approx(1e-4)  # end of decay
    assert training.get_lr(500, cfg) == pytest.approx(1e-4)  # after it: the floor
    lrs = [training.get_lr(it, cfg) for it in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_get_lr_decay_iters_none_follows_max_iters():
    assert training.get_lr(60, lr_cfg()) == training.get_lr(60, lr_cfg(lr_decay_iters=110))
    assert training.get_lr(60, lr_cfg(max_iters=60)) == pytest.approx(1e-4)
    assert training.get_lr(35, lr_cfg(lr_decay_iters=60)) == pytest.approx(1e-4 + 0.5 * 9e-4)  # explicit value wins
    assert training.get_lr(60, lr_cfg(lr_decay_iters=60)) == pytest.approx(1e-4)


def test_get_lr_constant_without_decay():
    assert {training.get_lr(it, lr_cfg(decay_lr=False)) for it in (0, 5, 50, 500)} == {1e-3}


# ---------------------------------------------------------------------------------------------------------------
# Early stopping


def stops(losses, patience, min_delta):
    """(is_best, should_stop) after each val loss."""
    stopper = training.EarlyStopping(patience, min_delta)
    return [stopper.update(v) for v in losses]


def test_early_stopping_counts_evals_without_enough_improvement():
    # 0.25 steps are exact in binary: an improvement of exactly min_delta does not count
    result = stops([2.0, 1.75, 1.75, 1.9], patience=3, min_delta=0.25)
    assert [s for _, s in result] == [False, False, False, True]
    assert [b for b, _ in result] == [True, True, False, False]
    # one real improvement (2.0 -> 1.5) resets the count
    result = stops([2.0, 1.75, 1.5, 1.5, 1.6, 1.6], patience=3, min_delta=0.25)
    assert [s for _, s in result] == [False, False, False, False, False, True]


def test_early_stopping_small_improvements_are_best_but_not_progress():
    result = stops([1.0, 0.99, 0.98, 0.97], patience=3, min_delta=0.1)
    assert [b for b, _ in result] == [True, True, True, True]  # each is a new best checkpoint
    assert [s for _, s in result] == [False, False, False, True]  # but none improves by min_delta


def test_early_stopping_small_improvements_add_up():
    # measured from the last real improvement (1.0), not the previous eval: 0.85 < 1.0 - 0.1 resets
    result = stops([1.0, 0.95, 0.92, 0.85, 0.84, 0.83, 0.82], patience=3, min_delta=0.1)
    assert [s for _, s in result] == [False] * 6 + [True]


def test_early_stopping_patience_zero_never_stops():
    assert not any(s for _, s in stops([1.0] + [2.0] * 20, patience=0, min_delta=0.0))


def test_early_stopping_patience_one_min_delta_zero():
    assert [s for _, s in stops([3.0, 2.0, 2.0], patience=1, min_delta=0.0)] == [False, False, True]


# ---------------------------------------------------------------------------------------------------------------
# Batches


def check_windows(split, x, y, m):
    """Every row is the window of block_size + 1 tokens at some turn start, padded past the end of the split."""
    ids, mask = np.asarray(split.ids, dtype=np.int64), np.asarray(split.mask)
    B, T = x.shape
    for row in range(B):
        matches = []
        for s in split.starts:
            n = min(T, len(ids) - 1 - s)
            if (np.array_equal(x[row, :n], ids[s:s + n]) and np.array_equal(y[row, :n], ids[s + 1:s + 1 + n])
                    and np.array_equal(m[row, :n], mask[s + 1:s + 1 + n])  # the mask of the target token
                    and (x[row, n:] == EOT).all() and (y[row, n:] == -1).all() and (m[row, n:] == 0).all()):
                matches.append(s)
        assert matches, f"row {row} is not a turn-aligned window"
        assert decode(x[row, :2].tolist()) in ("Human:", "System:")


def test_get_batch_windows_start_at_turns_and_masks_follow_targets(tiny_dataset):
    data, meta = dataset.load_dataset(tiny_dataset)
    split = data["train"]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for block_size in (24, 24, 24, 120):  # 120: windows near the end of the split are padded
        x, y, m = split.get_batch(8, block_size, gen)
        assert x.shape == y.shape == m.shape == (8, block_size)
        assert x.dtype == y.dtype == torch.int64 and m.dtype == torch.float32
        check_windows(split, x.numpy(), y.numpy(), m.numpy())
        seen |= set(x[:, :3].numpy().tobytes() for _ in [0])
    # the mask marks exactly the reply tokens of the targets: decoding them gives only replies
    x, y, m = split.get_batch(4, 24, torch.Generator().manual_seed(1))
    learned = decode([t for t, k in zip(y.flatten().tolist(), m.flatten().tolist()) if k and t != EOT])
    assert "Human" not in learned and "Assistant" not in learned and "System" not in learned
    assert any(s != 0 and s not in set(split.convs) for s in split.starts)  # multi-turn data has mid-turn starts


def test_get_batch_on_val_split_shorter_than_block_size(tiny_val_dataset):
    data, meta = dataset.load_dataset(tiny_val_dataset)
    val = data["val"]
    n = len(val.ids)
    assert n < 16 and meta["tokens"]["val"] == n
    x, y, m = val.get_batch(3, 64, torch.Generator().manual_seed(0))
    check_windows(val, x.numpy(), y.numpy(), m.numpy())
    assert (y[:, n - 1:] == -1).all() and m[:, :n - 1].sum() > 0
    assert decode(val.first_prompt()) == "Human: Hi\nAssistant:"


def test_load_dataset_errors(tmp_path, tiny_dataset):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        dataset.load_dataset(str(tmp_path / "nothing"))
    broken = shutil.copytree(tiny_dataset, tmp_path / "broken")
    with open(broken / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(broken / "train.bin") - 2)
    with pytest.raises(ValueError, match="incomplete"):
        dataset.load_dataset(str(broken))


# ---------------------------------------------------------------------------------------------------------------
# One step


def test_logged_loss_is_token_weighted_over_micro_batches(tiny_dataset):
    data, _ = dataset.load_dataset(tiny_dataset)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    cfg = {"gradient_accumulation_steps": 3, "batch_size": 2, "block_size": 16, "grad_clip": 0.0}
    runinfo = {"device": "cpu", "dtype": "float32", "ddp": False}
    gen = torch.Generator().manual_seed(5)
    # the same micro-batches, as one batch: its loss is the token-weighted mean by construction
    twin_gen = torch.Generator().set_state(gen.get_state())
    batches = [data["train"].get_batch(2, 16, twin_gen) for _ in range(3)]
    x, y, m = (torch.cat(parts) for parts in zip(*batches))
    _, expected = model(x, y, m)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    counts = [float(b[2].sum()) for b in batches]
    assert len(set(counts)) > 1, "micro-batches should hold different numbers of learned tokens"
    with torch.no_grad():
        plain_mean = sum(float(model(*b)[1]) for b in batches) / 3

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = training.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), data["train"], gen, cfg,
                            runinfo)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert abs(plain_mean - expected.item()) > 1e-4  # the test tells the two means apart
    for n, p in model.named_parameters():  # SGD, lr 1: the step is exactly minus the token-weighted gradient
        torch.testing.assert_close(p.detach(), before[n] - grads[n], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Whole runs (in process: tiny model, a handful of iterations)

RUN_PATTERN = re.compile(r"^finetuned_\d{8}_\d{6}(_last)?\.pt$")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_val_dataset):
    """7 iters, eval every 3, 2 micro-batches, a val split shorter than block_size. Returns (out_dir, stdout)."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    stdout = train_inprocess(tiny_train_args(tiny_val_dataset, out, max_iters=7, eval_interval=3,
                                             gradient_accumulation_steps=2, sample_max_tokens=4))
    return out, stdout


def test_run_takes_exactly_max_iters_and_evaluates_the_end(finished_run):
    out, stdout = finished_run
    metrics = read_metrics(out)
    assert [r["iter"] for r in metrics if r["event"] == "step"] == list(range(1, 8))
    assert [r["iter"] for r in metrics if r["event"] == "eval"] == [0, 3, 6, 7]
    names = checkpoints(out)
    assert len(names) == 2 and all(RUN_PATTERN.match(n) for n in names)
    best, last = (os.path.join(out, n) for n in names)  # "..._last.pt" sorts after "....pt"? check by name
    if best.endswith("_last.pt"):
        best, last = last, best
    assert load_ckpt(last)["iter_num"] == 7
    assert "reached max_iters=7 after 7 iters" in stdout
    assert "sample:" in stdout  # a sample reply at each eval, from the val split's first prompt


def test_checkpoint_round_trip(finished_run):
    out, _ = finished_run
    for name in checkpoints(out):
        ckpt = load_ckpt(os.path.join(out, name))  # weights_only=True
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])  # strict: every key, no extra
        assert ckpt["model_args"]["n_embd"] == 32 and ckpt["model_args"]["block_size"] == 32
        assert ckpt["tokenizer"] == "gpt2" and ckpt["template"]["user"] == "Human: {content}\n"
        assert ckpt["default_stop"] == "\n" and ckpt["config"]["max_iters"] == 7
        assert ("optimizer" in ckpt) == name.endswith("_last.pt")


def test_best_checkpoint_is_the_best_eval(finished_run):
    out, _ = finished_run
    evals = [r for r in read_metrics(out) if r["event"] == "eval"]
    best_name = [n for n in checkpoints(out) if not n.endswith("_last.pt")][0]
    best = load_ckpt(os.path.join(out, best_name))
    best_eval = min(evals, key=lambda r: r["val_loss"])
    assert best["iter_num"] == best_eval["iter"] and best["val_loss"] == pytest.approx(best_eval["val_loss"])


def test_metrics_and_loss_plot(finished_run):
    out, _ = finished_run
    metrics = read_metrics(out)
    for r in metrics:
        if r["event"] == "step":
            assert np.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0
        else:
            assert np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) and r["best_val_loss"] <= r["val_loss"]
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def scripted_run(tmp_path, monkeypatch, dataset, val_losses, **overrides):
    """A run whose evaluations return val_losses in turn. Returns (out_dir, stdout)."""
    queue = list(val_losses)
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: {"train": 1.0, "val": queue.pop(0)})
    out = str(tmp_path / "out")
    return out, train_inprocess(tiny_train_args(dataset, out, **overrides))


def test_best_checkpoint_never_overwritten_by_worse(tmp_path, monkeypatch, tiny_dataset):
    out, _ = scripted_run(tmp_path, monkeypatch, tiny_dataset, [3.0, 2.0, 2.5, 4.0], max_iters=6, eval_interval=2)
    best_name, last_name = sorted(checkpoints(out), key=lambda n: n.endswith("_last.pt"))
    best, last = load_ckpt(os.path.join(out, best_name)), load_ckpt(os.path.join(out, last_name))
    assert (best["iter_num"], best["val_loss"], best["best_val_loss"]) == (2, 2.0, 2.0)
    assert (last["iter_num"], last["val_loss"], last["best_val_loss"]) == (6, 4.0, 2.0)


def test_early_stopping_ends_the_run(tmp_path, monkeypatch, tiny_dataset):
    out, stdout = scripted_run(tmp_path, monkeypatch, tiny_dataset, [3.0, 2.95, 2.9, 1.0, 1.0], max_iters=20,
                               eval_interval=2, patience=2, min_delta=0.1)
    assert "early stopping" in stdout
    metrics = read_metrics(out)
    assert [r["iter"] for r in metrics if r["event"] == "eval"] == [0, 2, 4]
    assert max(r["iter"] for r in metrics if r["event"] == "step") == 4
    last = load_ckpt(os.path.join(out, [n for n in checkpoints(out) if n.endswith("_last.pt")][0]))
    assert last["iter_num"] == 4 and last["early_stopping"]["stale"] == 2


def test_resume_continues_the_same_run(tmp_path, tiny_dataset):
    """N iters in one go == N/2 iters, then --init_from=resume --max_iters=N: same weights, same logs."""
    common = dict(max_iters=8, eval_interval=4, lr_decay_iters=8, dropout=0.1, gradient_accumulation_steps=2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_inprocess(tiny_train_args(tiny_dataset, a, **common))
    train_inprocess(tiny_train_args(tiny_dataset, b, **{**common, "max_iters": 4}))
    first_half = checkpoints(b)
    stdout = train_inprocess(["--init_from=resume", f"--out_dir={b}", "--max_iters=8", "--wandb_run_name=resumed"])
    assert "resuming" in stdout and "wandb_run_name" in stdout
    assert checkpoints(b) == first_half  # the same run's files, continued

    last_a, last_b = (load_ckpt(os.path.join(d, [n for n in checkpoints(d) if n.endswith("_last.pt")][0]))
                      for d in (a, b))
    assert last_a["iter_num"] == last_b["iter_num"] == 8
    assert last_a["model"].keys() == last_b["model"].keys()
    for k in last_a["model"]:
        torch.testing.assert_close(last_a["model"][k], last_b["model"][k], atol=1e-6, rtol=0)

    def log(d):
        return [(r["event"], r["iter"], r.get("loss"), r.get("train_loss"), r.get("val_loss"))
                for r in read_metrics(d)]
    la, lb = log(a), log(b)
    assert [r[:2] for r in la] == [r[:2] for r in lb]
    np.testing.assert_allclose(np.array([r[2:] for r in la], dtype=float), np.array([r[2:] for r in lb], dtype=float),
                               rtol=0, atol=1e-6)
    # the saved config came back; the command line's overrides won
    cfg = last_b["config"]
    assert cfg["n_embd"] == 32 and cfg["batch_size"] == 4 and cfg["dataset"] == tiny_dataset
    assert cfg["max_iters"] == 8 and cfg["wandb_run_name"] == "resumed" and cfg["init_from"] == "resume"


def test_resolve_config_on_resume(tmp_path):
    saved = {**train.DEFAULTS, "batch_size": 8, "learning_rate": 0.05, "out_dir": str(tmp_path), "n_embd": 48}
    save_checkpoint(str(tmp_path / "finetuned_20250101_000000_last.pt"), {"config": saved})
    save_checkpoint(str(tmp_path / "finetuned_20250102_000000_last.pt"), {"config": {**saved, "n_embd": 64}})
    # batch_size=2 is the default but was typed on the command line: it wins over the saved 8
    cfg, path, *_ = train.resolve_config(["--init_from=resume", f"--out_dir={tmp_path}", "--batch_size=2"])
    assert path.endswith("finetuned_20250102_000000_last.pt")  # the newest run
    assert cfg["batch_size"] == 2 and cfg["learning_rate"] == 0.05 and cfg["n_embd"] == 64
    assert cfg["init_from"] == "resume"
    with pytest.raises(FileNotFoundError, match="_last.pt"):
        train.resolve_config(["--init_from=resume", f"--out_dir={tmp_path / 'empty'}"])


# ---------------------------------------------------------------------------------------------------------------
# Subprocess runs: signals and DDP


@pytest.mark.slow
def test_sigint_saves_last_checkpoint_then_exits(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    args = tiny_train_args(tiny_dataset, out, max_iters=100000, eval_interval=100000)
    proc = subprocess.Popen([sys.executable, script("train.py"), *args], cwd=str(tmp_path), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("iter "):
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout = "".join(lines) + rest
    assert proc.returncode == 0, err
    assert "interrupted by signal 2" in stdout and "Traceback" not in err
    last = [n for n in checkpoints(out) if n.endswith("_last.pt")]
    assert len(last) == 1
    ckpt = load_ckpt(os.path.join(out, last[0]))
    steps = [r["iter"] for r in read_metrics(out) if r["event"] == "step"]
    assert 1 <= ckpt["iter_num"] < 100000 and ckpt["iter_num"] == steps[-1]
    assert "optimizer" in ckpt


@pytest.mark.slow
def test_ddp_torchrun_on_cpu(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    p = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script("train.py"),
             *tiny_train_args(tiny_dataset, out, max_iters=4, eval_interval=2, n_layer=1, batch_size=2)],
            cwd=tmp_path, timeout=300)
    assert "2 process(es)" in p.stdout and "reached max_iters=4" in p.stdout
    last = [n for n in checkpoints(out) if n.endswith("_last.pt")]
    assert len(last) == 1 and len(checkpoints(out)) == 2
    ckpt = load_ckpt(os.path.join(out, last[0]))
    assert ckpt["iter_num"] == 4 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert [r["iter"] for r in read_metrics(out) if r["event"] == "step"] == [1, 2, 3, 4]  # logged once (rank 0)


def test_resume_overrides_reach_early_stopping(tmp_path, monkeypatch, tiny_dataset):
    """--patience / --min_delta given on resume apply to the restored early-stopping state."""
    out, _ = scripted_run(tmp_path, monkeypatch, tiny_dataset, [3.0, 2.0, 1.0], max_iters=4, eval_interval=2)
    queue = [0.9] * 10
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: {"train": 1.0, "val": queue.pop(0)})
    stdout = train_inprocess(["--init_from=resume", f"--out_dir={out}", "--max_iters=20", "--patience=1",
                              "--min_delta=100"])
    assert "early stopping" in stdout
    last = load_ckpt(os.path.join(out, [n for n in checkpoints(out) if n.endswith("_last.pt")][0]))
    assert last["iter_num"] == 6 and last["early_stopping"]["patience"] == 1
