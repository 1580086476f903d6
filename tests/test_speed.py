"""Training speed (issue 5): mixed precision on CPU, the fused head loss, compile, checkpoints, bench.py's JSON.

Speed itself is measured by `python bench.py --mode=train --preset=...`, not here: these tests check that the fast
paths compute the same thing as the plain ones."""
import json

import pytest
import torch
import torch.nn.functional as F

import helpers
from chat_gpt2 import training
from chat_gpt2.dataset import load_dataset
from chat_gpt2.device import cpu_has_bf16, resolve_compile, resolve_dtype
from chat_gpt2.model import GPT, GPTConfig, head_loss


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=512, bias=False, dropout=0.0)
    return GPT(GPTConfig(**{**config, **overrides}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_loss_matches_cross_entropy(dtype):
    torch.manual_seed(0)
    x0, w0 = torch.randn(37, 16), torch.randn(300, 16) * 0.1  # 37 rows: the last chunk is partial
    targets = torch.randint(0, 300, (37,))
    results = []
    for fn in (head_loss, lambda x, w, t: F.cross_entropy(F.linear(x, w).float(), t)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = fn(x, w, targets)
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, **tol)


def test_head_loss_empty_and_no_grad():
    w = torch.randn(50, 8, requires_grad=True)
    loss = head_loss(torch.zeros(0, 8, requires_grad=True), w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and w.grad.abs().sum() == 0  # an all-masked batch: loss 0, no NaN
    with torch.no_grad():
        x, t = torch.randn(5, 8), torch.randint(0, 50, (5,))
        torch.testing.assert_close(head_loss(x, w, t), F.cross_entropy(x @ w.t(), t))


def test_cpu_defaults():
    assert resolve_dtype("auto", "cpu") == "float32"  # inference stays fp32
    assert resolve_dtype("auto", "cpu", training=True) == ("bfloat16" if cpu_has_bf16() else "float32")
    assert resolve_dtype("float16", "cpu", training=True) == "float16"  # an explicit dtype always wins
    opt = tiny_model().configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert opt.defaults["fused"] is True
    assert resolve_compile(None, "cuda") and not resolve_compile(None, "cpu") and not resolve_compile(None, "mps")
    assert resolve_compile("true", "cpu") and not resolve_compile(False, "cuda") and resolve_compile("off", "cuda") is False
    with pytest.raises(ValueError):
        resolve_compile("maybe", "cpu")


def _loss_trajectory(data, dtype, steps=25):
    """Losses of `steps` train.py steps on the tiny dataset from the same seed, in dtype (autocast for bf16)."""
    model = tiny_model(seed=1, vocab_size=50304)  # the real vocab: the head and its loss are in the comparison
    optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    cfg = {"gradient_accumulation_steps": 1, "batch_size": 8, "block_size": 32, "grad_clip": 1.0}
    run = {"device": "cpu", "dtype": dtype, "ddp": False}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(2)
    return [training.train_step(model, optimizer, scaler, data, gen, cfg, run).item() for _ in range(steps)]


def test_bf16_and_fp32_loss_trajectories_match(tiny_dataset):
    data, _ = load_dataset(tiny_dataset)
    fp32 = _loss_trajectory(data["train"], "float32")
    bf16 = _loss_trajectory(data["train"], "bfloat16")
    assert fp32[-1] < fp32[0] - 2.0  # it learns, so the comparison covers real training, not noise around 10.8
    diffs = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert max(diffs) < 0.05 * max(fp32[-1], 1.0), (fp32, bf16)


def test_compiled_forward_matches_eager():
    """The one inductor test (compiling on CPU is slow): a compiled model computes what the eager one does."""
    model = tiny_model(n_layer=1).eval()
    idx = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, _ = model(idx, all_logits=True)
        compiled, _ = torch.compile(model)(idx, all_logits=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


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


def test_train_log_reports_mfu(tiny_dataset, tmp_path):
    helpers.train_inprocess(helpers.tiny_train_args(tiny_dataset, str(tmp_path), max_iters=2, eval_interval=2,
                                                    eval_iters=1))
    steps = [r for r in helpers.read_metrics(str(tmp_path)) if r["event"] == "step"]
    # the FLOPs done, not nanoGPT's count of the head on every token: a fraction of a measured peak
    assert steps and all(0 < r["mfu"] < 1 for r in steps)


BENCH_FIELDS = {
    "mode", "preset", "device", "dtype", "compile", "threads", "torch", "n_layer", "n_head", "n_embd", "batch_size",
    "block_size", "n_params", "flops_per_token", "steps", "warmup_steps", "warmup_s", "ms_per_iter",
    "ms_per_iter_best", "tokens_per_s", "tokens_per_s_best", "achieved_gflops", "peak_gflops_fp32",
    "peak_gflops_dtype", "mfu", "mfu_vs_fp32_peak", "gpu", "known_peak_gflops", "mfu_vs_known_peak",
    "peak_rss_mb", "max_memory_allocated_mb", "loss_first", "loss_last", "baseline", "load_avg_1min",
    "cpu_ms_per_iter",
}


def test_bench_train_tiny_preset_json(capsys):
    import bench
    bench.main(["--mode=train", "--preset=tiny", "--steps=2", "--warmup=1", "--device=cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert BENCH_FIELDS <= set(result), BENCH_FIELDS - set(result)
    assert result["mode"] == "train" and result["preset"] == "tiny" and result["steps"] == 2
    assert result["tokens_per_s"] > 0 and result["peak_gflops_fp32"] > 0 and 0 < result["mfu"] < 1
    assert result["peak_rss_mb"] > 0 and result["gpu"] is None


def test_bench_train_profile_breakdown(capsys):
    """--profile adds where the step's time goes: its phases, the matmul-bound work timed alone, MFU ceilings."""
    import bench
    bench.main(["--mode=train", "--preset=tiny", "--steps=1", "--warmup=1", "--device=cpu", "--profile"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    b = result["breakdown"]
    assert set(b["phase_ms"]) == {"forward", "backward", "clip", "optimizer"}
    assert all(ms > 0 for ms in b["phase_ms"].values())
    assert set(b["kernel_ms"]) == {"matmul_fwd", "matmul_bwd", "attention_fwd", "attention_bwd"}
    assert b["kernel_ms"]["matmul_fwd"] > 0 and b["kernel_ms"]["matmul_bwd"] > 0
    ceiling = b["mfu_ceiling"]
    # each ceiling counts more of the step's work as taking time, so they can only go down
    assert ceiling["matmuls"] >= ceiling["matmuls_attention"] >= ceiling["matmuls_attention_clip_adamw"] > 0
    # the first ceiling is the step's FLOPs done in the time of the matmuls alone, against the measured peak
    # (the JSON's figures are rounded, hence the tolerance)
    flops = result["flops_per_token"] * result["batch_size"] * result["block_size"]
    matmul_s = (b["kernel_ms"]["matmul_fwd"] + b["kernel_ms"]["matmul_bwd"]) / 1000
    assert ceiling["matmuls"] == pytest.approx(flops / matmul_s / (result["peak_gflops_dtype"] * 1e9), rel=0.03)
    assert "MFU ceiling if only the matmuls took time" in out and "step phases (ms)" in out
