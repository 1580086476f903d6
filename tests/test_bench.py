"""bench.py: --mode=train (the JSON fields, --profile's breakdown and MFU ceilings) and --mode=generate.

Speed itself is measured by `python bench.py --mode=train --preset=...`, not here: these tests check the report."""
import json
import os
import tempfile

import pytest

import bench
from helpers import write_records

BENCH_FIELDS = {
    "mode", "preset", "device", "dtype", "compile", "threads", "torch", "n_layer", "n_head", "n_embd", "batch_size",
    "block_size", "n_params", "flops_per_token", "steps", "warmup_steps", "warmup_s", "ms_per_iter",
    "ms_per_iter_best", "tokens_per_s", "tokens_per_s_best", "achieved_gflops", "peak_gflops_fp32",
    "peak_gflops_dtype", "mfu", "mfu_vs_fp32_peak", "gpu", "known_peak_gflops", "mfu_vs_known_peak",
    "peak_rss_mb", "max_memory_allocated_mb", "loss_first", "loss_last", "baseline", "load_avg_1min",
    "cpu_ms_per_iter",
}


def test_bench_train_tiny_preset_json(capsys):
    bench.main(["--mode=train", "--preset=tiny", "--steps=2", "--warmup=1", "--device=cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert BENCH_FIELDS <= set(result), BENCH_FIELDS - set(result)
    assert result["mode"] == "train" and result["preset"] == "tiny" and result["steps"] == 2
    assert result["tokens_per_s"] > 0 and result["peak_gflops_fp32"] > 0 and 0 < result["mfu"] < 1
    assert result["peak_rss_mb"] > 0 and result["gpu"] is None


def test_bench_train_profile_breakdown(capsys):
    """--profile adds where the step's time goes: its phases, the matmul-bound work timed alone, MFU ceilings."""
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


def test_bench_generate_quick_preset(capsys):
    bench.main(["--mode=generate", "--device=cpu", "--gen_new_tokens=8", "--gen_batch_sizes=[1, 2]"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["mode"] == "generate" and result["preset"] == "quick" and result["new_tokens"] == 8
    half = "ours, KV cache, bfloat16"  # --gen_half's default: the weights converted
    impls = {"ours, KV cache", "ours, no cache"} | ({"transformers, use_cache"} if bench._has_transformers() else set())
    assert {(r["impl"], r["batch"]) for r in result["rows"]} == {(i, b) for i in impls | {half} for b in (1, 2)}
    full = [r for r in result["rows"] if r["impl"] != half]
    assert all(r["tokens_per_s"] > 0 and r["same_tokens"] for r in full)  # greedy fp32 paths: identical tokens
    assert all(r["tokens_per_s"] > 0 and 0 <= r["same_token_share"] <= 1 for r in result["rows"] if r["impl"] == half)
    assert set(result["speedups"]) == {"1", "2"} and "cache_vs_no_cache" in result["speedups"]["1"]
    assert all("half_vs_fp32" in result["speedups"][b] for b in ("1", "2"))
    assert "tokens/s" in out  # the table


@pytest.mark.slow
def test_bench_prepare_measures_both_and_cleans_up(tmp_path, monkeypatch, capsys):
    """--mode=prepare: the bare loop and prepare.py on the same repeated files give the same chat tokens (the bare
    text loop has no closing <|endoftext|>), and nothing is left in the temporary folder."""
    chat_src = write_records(tmp_path / "pc.jsonl", [{"prompt": f"Question {i}?", "completion": f"Answer {i}.\nMore."}
                                                     for i in range(50)])
    text_src = tmp_path / "t.txt"
    text_src.write_text("To be, or not to be: that is the question.\n" * 40, encoding="utf-8")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.mkdir(tmp_path / "tmp")
    bench.main(["--mode=prepare", f"--prepare_chat={chat_src}", f"--prepare_text={text_src}", "--prepare_mb=0.02",
                "--prepare_runs=1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    chat_row, text_row = result["rows"]
    assert chat_row["kind"] == "chat" and chat_row["copies"] == round(0.02e6 / os.path.getsize(chat_src))
    assert chat_row["tokens"] == chat_row["tokens_bare"] and text_row["tokens"] == text_row["tokens_bare"] + 1
    for row in (chat_row, text_row):
        assert row["bare_s"] > 0 and row["prepare_s"] > 0 and row["prepare_peak_rss_mb"] > 10
        assert row["ratio"] == round(row["bare_s"] / row["prepare_s"], 3)
    assert os.listdir(tmp_path / "tmp") == []
