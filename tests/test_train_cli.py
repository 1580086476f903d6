"""train.py: whole runs (in process, tiny model, a handful of iterations), the step log and its MFU, checkpoints,
resume, --epochs, --compile, pretrained weights, config resolution, one-line errors; as commands: prepare -> train,
signals, DDP, an exact resume in a fresh process. The runs come from conftest.py's finished_run / cli_run fixtures and
helpers.tiny_train_args. LoRA and --trainable_layers runs are in test_lora.py."""
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import helpers
import train
from chat_gpt2 import dataset
from chat_gpt2.checkpoint import save_checkpoint
from chat_gpt2.errors import ConfigError
from chat_gpt2.objectives import LanguageModelling
from helpers import checkpoints, env, load_ckpt, read_meta, read_metrics, script, tiny_train_args, train_inprocess

RUN_PATTERN = re.compile(r"^finetuned_\d{8}_\d{6}(_last)?\.pt$")


@pytest.fixture
def offline(monkeypatch):
    helpers.offline(monkeypatch)


# ---------------------------------------------------------------------------------------------------------------
# A finished run


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


def test_best_checkpoint_is_the_best_eval(finished_run):
    out, _ = finished_run
    evals = [r for r in read_metrics(out) if r["event"] == "eval"]
    best_name = [n for n in checkpoints(out) if not n.endswith("_last.pt")][0]
    best = load_ckpt(os.path.join(out, best_name))
    best_eval = min(evals, key=lambda r: r["val_loss"])
    assert best["iter_num"] == best_eval["iter"] and best["val_loss"] == pytest.approx(best_eval["val_loss"])


# ---------------------------------------------------------------------------------------------------------------
# The step log: ms/iter, tokens/s and MFU


def test_train_log_reports_mfu(tiny_dataset, tmp_path, monkeypatch):
    """The logged MFU is the step's FLOPs over its logged time and the peak, recomputed here from scratch: nanoGPT's
    6N + 12LHQT per token, except that on CPU the LM head (6 * vocab * n_embd per token) runs on learned tokens
    only, which are counted by replaying the run's data generator."""
    peaks, real_peak_flops = [], train.peak_flops

    def spy(*args, **kwargs):
        peaks.append(real_peak_flops(*args, **kwargs))
        return peaks[-1]

    monkeypatch.setattr(train, "peak_flops", spy)
    out = str(tmp_path)
    stdout = train_inprocess(tiny_train_args(tiny_dataset, out, max_iters=2, eval_interval=2, eval_iters=1))
    steps = [r for r in read_metrics(out) if r["event"] == "step"]
    # the FLOPs done, not nanoGPT's count of the head on every token: a fraction of a measured peak
    assert steps and all(0 < r["mfu"] < 1 for r in steps)

    assert len(peaks) == 1
    peak, source = peaks[0]
    assert f"MFU is against the {source} float32 matmul peak of cpu: {peak / 1e9:,.0f} GFLOP/s" in stdout
    batch_size, block_size, n_layer, n_head, n_embd, vocab = 4, 32, 2, 2, 32, 50304  # tiny_train_args, scratch
    model = helpers.model_of(os.path.join(out, checkpoints(out)[0]))
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (n_layer, n_embd, vocab)
    n_params = sum(t.numel() for k, t in model.state_dict().items()
                   if k not in ("lm_head.weight", "transformer.wpe.weight"))  # the head is tied to wte
    flops_per_token = 6 * n_params + 12 * n_layer * n_head * (n_embd // n_head) * block_size
    head = 6 * vocab * n_embd
    tokens_per_iter = batch_size * block_size  # one micro-batch, one process
    data, _ = dataset.load_dataset(tiny_dataset)
    generator = torch.Generator().manual_seed(train.DEFAULTS["seed"])
    assert [r["iter"] for r in steps] == [1, 2]
    for r in steps:
        _, _, mask = data["train"].get_batch(batch_size, block_size, generator)
        learned = float(mask.sum())
        assert 0 < learned < tokens_per_iter
        seconds = r["ms_per_iter"] / 1000
        expected = (tokens_per_iter * (flops_per_token - head) + learned * head) / seconds / peak
        assert r["mfu"] == pytest.approx(expected, rel=1e-6), r
        assert r["tokens_per_s"] == pytest.approx(tokens_per_iter / seconds, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Early stopping, the best checkpoint, resume (evaluations scripted)


def scripted_run(tmp_path, monkeypatch, dataset, val_losses, **overrides):
    """A run whose evaluations return val_losses in turn. Returns (out_dir, stdout)."""
    queue = list(val_losses)
    monkeypatch.setattr(LanguageModelling, "evaluate", lambda self, model: {"train": 1.0, "val": queue.pop(0)})
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


def test_resume_overrides_reach_early_stopping(tmp_path, monkeypatch, tiny_dataset):
    """--patience / --min_delta given on resume apply to the restored early-stopping state."""
    out, _ = scripted_run(tmp_path, monkeypatch, tiny_dataset, [3.0, 2.0, 1.0], max_iters=4, eval_interval=2)
    queue = [0.9] * 10
    monkeypatch.setattr(LanguageModelling, "evaluate", lambda self, model: {"train": 1.0, "val": queue.pop(0)})
    stdout = train_inprocess(["--init_from=resume", f"--out_dir={out}", "--max_iters=20", "--patience=1",
                              "--min_delta=100"])
    assert "early stopping" in stdout
    last = load_ckpt(os.path.join(out, [n for n in checkpoints(out) if n.endswith("_last.pt")][0]))
    assert last["iter_num"] == 6 and last["early_stopping"]["patience"] == 1


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
# --epochs


def test_epochs_flag_beats_a_config_file_and_conflicts_with_max_iters(tmp_path):
    conf = tmp_path / "c.py"
    conf.write_text("max_iters = 7\n")
    cfg, *_ = train.resolve_config([str(conf), "--epochs=2"])
    assert cfg["epochs"] == 2.0  # the command line's epochs decide max_iters, not the file's 7
    cfg, *_ = train.resolve_config([str(conf)])
    assert cfg["epochs"] == 0.0 and cfg["max_iters"] == 7
    conf.write_text("max_iters = 7\nepochs = 1.0\n")
    with pytest.raises(ConfigError, match="config files set both"):
        train.resolve_config([str(conf)])
    cfg, *_ = train.resolve_config([str(conf), "--max_iters=9"])  # the command line picks
    assert cfg["epochs"] == 0.0 and cfg["max_iters"] == 9


def test_epochs_set_max_iters(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    args = [a for a in tiny_train_args(tiny_dataset, out, eval_interval=100) if not a.startswith("--max_iters")]
    stdout = train_inprocess(args + ["--epochs=1.5", "--n_layer=1"])
    tokens_per_iter = 4 * 32  # batch_size x block_size
    expected = math.ceil(1.5 * read_meta(tiny_dataset)["tokens"]["train"] / tokens_per_iter)
    assert f"reached max_iters={expected}" in stdout
    steps = [r for r in read_metrics(out) if r["event"] == "step"]
    assert steps[-1]["iter"] == expected and 1.5 <= steps[-1]["epoch"] < 1.5 + tokens_per_iter / 100
    assert f"(epoch {steps[-1]['epoch']:.2f})" in stdout


# ---------------------------------------------------------------------------------------------------------------
# --compile


def test_compiled_run_saves_clean_checkpoints(tiny_dataset, tmp_path, monkeypatch):
    """train.py --compile wraps the model (torch.compile's OptimizedModule, whose state dict says _orig_mod.): its
    checkpoints must not. Dynamo's eager backend makes the same wrapper without inductor's minutes of C++ builds;
    the losses then match the eager run's exactly."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    losses = {}
    for compile_ in (False, True):
        out = tmp_path / f"compile_{compile_}"
        helpers.train_inprocess(helpers.tiny_train_args(tiny_dataset, str(out), compile=compile_, max_iters=3,
                                                        eval_interval=3, eval_iters=1, n_layer=1))
        losses[compile_] = [r["loss"] for r in helpers.read_metrics(str(out)) if r["event"] == "step"]
        if compile_:
            names = helpers.checkpoints(str(out))
            assert len(names) == 2  # the best and the latest
            for name in names:
                keys = helpers.load_ckpt(str(out / name))["model"].keys()
                assert "lm_head.weight" in keys and not any("_orig_mod." in k or "module." in k for k in keys)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Pretrained weights (a local Hugging Face folder) and one-line errors


def test_train_from_local_checkpoint_in_process(offline, hf_dir, tiny_dataset, tmp_path):
    """The model starts from the checkpoint's weights (the first eval sees them) and saves its real shape."""
    out = str(tmp_path / "out")
    argv = helpers.tiny_train_args(tiny_dataset, out, init_from=hf_dir, max_iters=2, eval_interval=1)
    argv = [a for a in argv if not a.startswith(("--n_layer", "--n_head", "--n_embd"))]  # from the checkpoint
    printed = helpers.train_inprocess(argv)
    assert "memory estimate:" in printed and "loading directory" in printed
    ckpt = helpers.load_ckpt(os.path.join(out, helpers.checkpoints(out)[0]))
    assert ckpt["model_args"]["vocab_size"] == 50257 and ckpt["model_args"]["block_size"] == 32
    assert (ckpt["config"]["n_layer"], ckpt["config"]["n_embd"]) == (2, 32)


@pytest.mark.slow
def test_train_cli_errors_are_one_line(offline, hf_dir, tiny_dataset, tmp_path):
    base = helpers.tiny_train_args(tiny_dataset, str(tmp_path / "out"), max_iters=1)
    for flags, message in [(["--init_from=" + str(tmp_path / "missing")], "no such directory"),
                           (["--init_from=" + hf_dir, "--n_layer=3"], "n_layer=3 was requested")]:
        p = helpers.run(["train.py", *base, *flags], cwd=helpers.REPO, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith("error: ") and message in p.stderr


# ---------------------------------------------------------------------------------------------------------------
# As commands: prepare.py -> train.py, signals, DDP


@pytest.mark.slow
def test_train_cli_outputs(cli_run):
    """conftest's cli_run: train.py with config/finetune_chat.py and overrides, from a fresh folder."""
    cwd = cli_run["cwd"]
    names = checkpoints(cwd / "out")
    best = [n for n in names if re.fullmatch(r"finetuned_\d{8}_\d{6}\.pt", n)]
    assert len(best) == 1 and len(names) == 2, names
    assert cli_run["best"] == str(cwd / "out" / best[0])
    assert f"best model: out/{best[0]}" in cli_run["train"] or f"best model: {cwd / 'out' / best[0]}" in cli_run["train"]
    ckpt = load_ckpt(cli_run["best"])  # weights_only=True
    assert ckpt["config"]["init_from"] == "scratch" and ckpt["model_args"]["n_layer"] == 2
    assert ckpt["config"]["block_size"] == 64 and ckpt["model_args"]["block_size"] == 64
    last = load_ckpt(cli_run["best"].replace(".pt", "_last.pt"))
    assert last["iter_num"] == 12
    steps = [r["iter"] for r in read_metrics(cwd / "out") if r["event"] == "step"]
    assert steps == [3, 6, 9, 12]
    assert os.path.getsize(cwd / "out" / "loss.png") > 0


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
    assert proc.returncode == 130, err  # 128 + SIGINT, as a shell reports Ctrl-C
    assert "interrupted by signal 2" in stdout and "Traceback" not in err
    assert f"to continue: python train.py --init_from=resume --out_dir={out}" in stdout
    last = [n for n in checkpoints(out) if n.endswith("_last.pt")]
    assert len(last) == 1
    ckpt = load_ckpt(os.path.join(out, last[0]))
    steps = [r["iter"] for r in read_metrics(out) if r["event"] == "step"]
    assert 1 <= ckpt["iter_num"] < 100000 and ckpt["iter_num"] == steps[-1]
    assert "optimizer" in ckpt


@pytest.mark.slow
def test_ddp_torchrun_on_cpu(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    p = helpers.train_ddp(tmp_path, tiny_dataset, out, max_iters=4, eval_interval=2, n_layer=1)
    assert "2 process(es)" in p.stdout and "reached max_iters=4" in p.stdout
    last = [n for n in checkpoints(out) if n.endswith("_last.pt")]
    assert len(last) == 1 and len(checkpoints(out)) == 2
    ckpt = load_ckpt(os.path.join(out, last[0]))
    assert ckpt["iter_num"] == 4 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert [r["iter"] for r in read_metrics(out) if r["event"] == "step"] == [1, 2, 3, 4]  # logged once (rank 0)


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bit_exact_with_dropout(tmp_path, tiny_dataset):
    def train(out_dir, *extra):
        args = helpers.tiny_train_args(tiny_dataset, str(out_dir), dropout=0.1, max_iters=8, eval_interval=4,
                                       lr_decay_iters=8, log_interval=2)
        helpers.run([helpers.script("train.py"), *args, *extra], cwd=tmp_path)

    def last_state(out_dir):
        name = next(n for n in helpers.checkpoints(str(out_dir)) if n.endswith("_last.pt"))
        return helpers.load_ckpt(os.path.join(out_dir, name))

    train(tmp_path / "straight")
    train(tmp_path / "split", "--max_iters=4")
    assert last_state(tmp_path / "split")["iter_num"] == 4
    helpers.run([helpers.script("train.py"), f"--out_dir={tmp_path / 'split'}", "--init_from=resume",
                 "--max_iters=8"], cwd=tmp_path)
    straight, resumed = last_state(tmp_path / "straight"), last_state(tmp_path / "split")
    assert resumed["iter_num"] == straight["iter_num"] == 8
    assert straight["model"].keys() == resumed["model"].keys()
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert straight["val_loss"] == resumed["val_loss"]
