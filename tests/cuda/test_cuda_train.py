"""train.py on the GPU, through its command line, with the device's defaults (on CUDA: bf16 autocast,
torch.compile, fused AdamW, pinned memory and non-blocking copies) on a tiny model (the 124M shape:
test_cuda_124m.py): a compiled run's checkpoints and its bit-exact resume; fp16 with a GradScaler; LoRA,
--trainable_layers, --grad_checkpointing and a classifier; and a GPU-trained checkpoint used on the CPU by
sample.py, eval.py, export.py and a resumed run."""
import json
import math
import os
import re
import shutil

import pytest
import torch

import _lib
import helpers
from _lib import DEVICE, ON_CUDA, step_losses

pytestmark = [pytest.mark.cuda, _lib.requires_device]
# the tests reading default_run share one worker under pytest-xdist (one run instead of one per worker)
shares_default_run = pytest.mark.xdist_group("default_run")


def assert_plain_keys(ckpt):
    """A checkpoint's weights are saved under the model's own names: not a torch.compile or DDP wrapper's."""
    wrapped = [k for k in ckpt["model"] if k.startswith(("_orig_mod.", "module.")) or "._orig_mod." in k]
    assert not wrapped, wrapped[:3]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, tiny_dataset):
    """A tiny run with the device's defaults: 6 iterations, evals (and checkpoints) at 0, 3 and 6, a sample reply
    at each eval. Returns (out_dir, CompletedProcess)."""
    out = tmp_path_factory.mktemp("cuda-default") / "out"
    p = _lib.script("train.py", *_lib.train_flags(tiny_dataset, str(out), sample_max_tokens=4),
                    cwd=out.parent, env=_lib.COMPILE_LOG)
    return out, p


@shares_default_run
def test_tiny_run_with_the_device_defaults(default_run):
    out, p = default_run
    assert f"device {DEVICE}, dtype {_lib.default_dtype()}" in p.stdout
    assert (_lib.COMPILED in p.stderr) == ON_CUDA  # compile=None: on for CUDA, off on the CPU
    losses = step_losses(out)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert [r["iter"] for r in helpers.read_metrics(str(out)) if r["event"] == "eval"] == [0, 3, 6]
    assert "  sample: " in p.stdout  # the eval-time reply, generated on the device
    mfu = [float(m) for m in re.findall(r"MFU ([\d.]+)%", p.stdout)]
    assert mfu and all(m > 0 for m in mfu)


@shares_default_run
def test_compiled_checkpoints_hold_the_models_own_names(default_run):
    out, _ = default_run
    best, last = _lib.best_and_last(out)
    reference = helpers.tiny_model(residual_scale=1, block_size=32).state_dict()
    for ckpt in (best, last):
        assert_plain_keys(ckpt)
        assert set(ckpt["model"]) == set(reference)
        assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    assert last["iter_num"] == 6 and ("cuda" in last["rng"] or not ON_CUDA)  # the GPU's RNG, for resume


def test_resume_is_bit_exact(tmp_path, tiny_dataset):
    """6 iterations in one go == 3, then --init_from=resume to 6 in a fresh process: the same losses and weights,
    bit for bit, dropout included (both runs with deterministic algorithms: tests/cuda/_deterministic.py)."""
    common = dict(dropout=0.1, max_iters=6, eval_interval=3, lr_decay_iters=6)
    straight, split = tmp_path / "straight", tmp_path / "split"
    _lib.script("train.py", *_lib.train_flags(tiny_dataset, str(straight), **common), cwd=tmp_path,
                deterministic=True)
    _lib.script("train.py", *_lib.train_flags(tiny_dataset, str(split), **{**common, "max_iters": 3}),
                cwd=tmp_path, deterministic=True)
    first = step_losses(split)
    assert first == step_losses(straight)[:3], (
        f"two runs from the same seed differ before any resume ({first} vs {step_losses(straight)[:3]}): "
        f"the device is not deterministic here, so resume cannot be compared bit for bit")
    p = _lib.script("train.py", "--init_from=resume", f"--out_dir={split}", "--max_iters=6", f"--device={DEVICE}",
                    cwd=tmp_path, deterministic=True)
    assert "resuming" in p.stdout
    assert step_losses(split) == step_losses(straight)
    (_, a), (_, b) = _lib.best_and_last(straight), _lib.best_and_last(split)
    assert a["iter_num"] == b["iter_num"] == 6 and a["val_loss"] == b["val_loss"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_float16_with_a_grad_scaler(tmp_path, tiny_dataset):
    """--dtype=float16 (a GPU without bf16): autocast in fp16 with a GradScaler. The CPU dry run trains in fp16
    too (emulated: train.py's matmul peak for the MFU stays a small one, chat_gpt2.device.peak_flops), without
    a GradScaler (train.py enables it on CUDA only)."""
    out, dtype = tmp_path / "out", "float16"
    p = _lib.script("train.py", *_lib.train_flags(tiny_dataset, str(out), dtype=dtype, max_iters=4,
                                                  eval_interval=2), cwd=tmp_path)
    assert f"device {DEVICE}, dtype {dtype}" in p.stdout
    losses = step_losses(out)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    _, last = _lib.best_and_last(out)
    assert_plain_keys(last)
    if ON_CUDA:  # the GradScaler runs (CUDA only): its scale is saved for resume
        assert math.isfinite(last["scaler"]["scale"]) and last["scaler"]["scale"] > 0


def test_lora_compiled(tmp_path, tiny_dataset):
    out = tmp_path / "out"
    p = _lib.script("train.py", *_lib.train_flags(tiny_dataset, str(out), lora_rank=4, learning_rate=1e-2,
                                                  max_iters=4, eval_interval=2), cwd=tmp_path, env=_lib.COMPILE_LOG)
    assert "LoRA rank 4" in p.stdout and (_lib.COMPILED in p.stderr) == ON_CUDA
    best, _ = _lib.best_and_last(out)
    assert_plain_keys(best)
    assert best["lora"]["rank"] == 4 and best["model"] and all("lora_" in k for k in best["model"])
    assert all(math.isfinite(x) for x in step_losses(out))
    # the adapters merge into their base on the CPU
    reply = _lib.script("sample.py", f"--ckpt={_lib.best_path(out)}", "--device=cpu", "--dtype=float32",
                        "--prompt=Hi", "--temperature=0", "--max_new_tokens=4", cwd=tmp_path)
    assert reply.returncode == 0


def test_trainable_layers_compiled(tmp_path, tiny_dataset):
    """--trainable_layers=1: the last block and ln_f train, the first block keeps its initial weights exactly."""
    out = tmp_path / "out"
    p = _lib.script("train.py", *_lib.train_flags(tiny_dataset, str(out), trainable_layers=1, max_iters=4,
                                                  eval_interval=2), cwd=tmp_path, env=_lib.COMPILE_LOG)
    assert "(the last 1 blocks + ln_f)" in p.stdout and (_lib.COMPILED in p.stderr) == ON_CUDA
    best, last = _lib.best_and_last(out)
    assert_plain_keys(best)
    initial = helpers.tiny_model(seed=1337, residual_scale=1, block_size=32).state_dict()  # train.py's init
    trained = [k for k in best["model"] if k.startswith(("transformer.h.1.", "transformer.ln_f."))]
    assert len(last["optimizer"]["state"]) == len(trained)  # AdamW holds state for these alone
    for name, tensor in best["model"].items():
        if name.startswith("transformer.h.0."):
            assert torch.equal(tensor, initial[name]), name
    name = "transformer.h.1.mlp.c_fc.weight"
    assert not torch.equal(best["model"][name], initial[name])


@shares_default_run
def test_grad_checkpointing_compiled_follows_the_plain_run(tmp_path, tiny_dataset, default_run):
    """Recomputing the blocks in backward is the same arithmetic: the losses follow default_run's (same seed,
    data and settings), up to the rounding a differently fused graph may give."""
    out = tmp_path / "out"
    p = _lib.script("train.py", *_lib.train_flags(tiny_dataset, str(out), grad_checkpointing=True,
                                                  sample_max_tokens=4), cwd=tmp_path, env=_lib.COMPILE_LOG)
    assert (_lib.COMPILED in p.stderr) == ON_CUDA
    plain = step_losses(default_run[0])
    checkpointed = step_losses(out)
    assert checkpointed[0] == pytest.approx(plain[0], abs=1e-2)
    assert checkpointed == pytest.approx(plain, abs=5e-2)
    assert_plain_keys(_lib.best_and_last(out)[0])


LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def classify_dataset(tmp_path_factory):
    """A separable two-class task (the words say the class), prepared by prepare.py --task=classify."""
    root = tmp_path_factory.mktemp("cuda-classify")
    rows = [{"text": f"{'apple banana cherry' if i % 2 else 'zebra yak walrus'} {i % 7}", "label": LABELS[i % 2]}
            for i in range(80)]
    src = helpers.write_records(root / "labelled.jsonl", rows)
    _lib.script("prepare.py", src, "--task=classify", f"--out_dir={root / 'data'}", cwd=root)
    return str(root / "data")


def test_classifier_compiled(tmp_path, classify_dataset):
    out = tmp_path / "out"
    p = _lib.script("train.py", *_lib.train_flags(classify_dataset, str(out), max_iters=40, eval_interval=20,
                                                  batch_size=8, learning_rate=3e-3, warmup_iters=5),
                    cwd=tmp_path, env=_lib.COMPILE_LOG)
    assert f"dtype {_lib.default_dtype()}" in p.stdout and (_lib.COMPILED in p.stderr) == ON_CUDA
    accuracy = re.search(r"^test accuracy: ([\d.]+)%", p.stdout, re.M)
    assert accuracy and float(accuracy.group(1)) >= 90.0, p.stdout[-2000:]
    best, _ = _lib.best_and_last(out)
    assert_plain_keys(best)
    assert best["classify"]["labels"] == LABELS and "score.weight" in best["model"]
    r = _lib.script("classify.py", f"--ckpt={_lib.best_path(out)}", "--device=cpu", "--text=apple banana cherry 3",
                    cwd=tmp_path)
    assert r.stdout.split()[0] == "pos"


# ---------------------------------------------------------------------------------------------------------------
# A GPU-trained checkpoint on the CPU


@shares_default_run
def test_gpu_checkpoint_on_the_cpu(default_run, tiny_dataset, tmp_path):
    """sample.py replies as the full-forward reference on the CPU; eval.py's val loss and replies; export.py with
    its logit check against transformers."""
    out, _ = default_run
    best = _lib.best_path(out)
    question = "What is 2 plus 3?"
    reply = _lib.script("sample.py", f"--ckpt={best}", "--device=cpu", "--dtype=float32", f"--prompt={question}",
                        "--temperature=0", "--max_new_tokens=8", cwd=tmp_path).stdout
    assert reply == helpers.greedy_reply(best, helpers.prompt(question), 8, ["\n"]) + "\n"
    held_out = helpers.write_records(tmp_path / "held_out.jsonl", helpers.chat_records(4))
    r = _lib.script("eval.py", f"--ckpt={best}", "--device=cpu", f"--dataset={tiny_dataset}", f"--data={held_out}",
                    "--max_new_tokens=4", f"--out={tmp_path / 'replies.jsonl'}", cwd=tmp_path)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert math.isfinite(summary["val_loss"]) and summary["n"] == 4 and 0 <= summary["f1"] <= 1
    r = _lib.script("export.py", f"--ckpt={best}", f"--out={tmp_path / 'hf'}", "--check", cwd=tmp_path)
    assert os.path.isfile(tmp_path / "hf" / "config.json") and "check:" in r.stdout


@shares_default_run
def test_gpu_run_resumes_on_the_cpu(default_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)
    p = _lib.script("train.py", "--init_from=resume", f"--out_dir={out}", "--max_iters=8", "--device=cpu",
                    "--dtype=float32", "--compile=False", cwd=tmp_path)
    assert "resuming" in p.stdout and "device cpu" in p.stdout
    _, last = _lib.best_and_last(out)
    assert last["iter_num"] == 8 and all(math.isfinite(x) for x in step_losses(out))
