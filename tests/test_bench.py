"""bench.py and its modes (benchmarks/): the JSON fields and report of each --mode, dispatched by bench.py.

Speed itself is measured by `python bench.py --mode=train --preset=...`, not here: these tests check the report."""
import json
import os
import tempfile

import pytest

import bench
from benchmarks.generate_speed import has_transformers
from chat_gpt2.errors import ConfigError
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
    impls = {"ours, KV cache", "ours, no cache"} | ({"transformers, use_cache"} if has_transformers() else set())
    assert {(r["impl"], r["batch"]) for r in result["rows"]} == {(i, b) for i in impls | {half} for b in (1, 2)}
    full = [r for r in result["rows"] if r["impl"] != half]
    assert all(r["tokens_per_s"] > 0 and r["same_tokens"] for r in full)  # greedy fp32 paths: identical tokens
    assert all(r["tokens_per_s"] > 0 and 0 <= r["same_token_share"] <= 1 for r in result["rows"] if r["impl"] == half)
    assert set(result["speedups"]) == {"1", "2"} and "cache_vs_no_cache" in result["speedups"]["1"]
    assert all("half_vs_fp32" in result["speedups"][b] for b in ("1", "2"))
    prefill = result["prefill"]  # capped at the quick model's block_size
    assert prefill["tokens"] == 128 and set(prefill["tokens_per_s"]) == {"float32", "bfloat16 weights"}
    assert all(v > 0 for v in prefill["tokens_per_s"].values()) and "(prefill)" in out
    assert "tokens/s" in out  # the table


def test_bench_generate_without_the_uncached_loop(capsys):
    bench.main(["--mode=generate", "--device=cpu", "--gen_new_tokens=4", "--gen_batch_sizes=[1]",
                "--gen_no_cache=false", "--gen_hf=false", "--gen_half=", "--gen_prefill_tokens=0"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["impl"] for r in result["rows"]] == ["ours, KV cache"]
    assert result["speedups"] == {"1": {}}


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
                f"--prepare_parquet={text_src}", "--prepare_runs=1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    chat_row, text_row, parquet_row = result["rows"]
    assert chat_row["kind"] == "chat" and chat_row["copies"] == round(0.02e6 / os.path.getsize(chat_src))
    assert chat_row["tokens"] == chat_row["tokens_bare"] and text_row["tokens"] == text_row["tokens_bare"] + 1
    assert parquet_row["kind"] == "parquet" and parquet_row["tokens"] == parquet_row["tokens_bare"]  # one per doc
    for row in (chat_row, text_row, parquet_row):
        assert row["bare_s"] > 0 and row["prepare_s"] > 0 and row["prepare_peak_rss_mb"] > 10
        assert row["ratio"] == round(row["bare_s"] / row["prepare_s"], 3)
    assert os.listdir(tmp_path / "tmp") == []


def test_bench_half_reports_agreement_and_perplexity(tiny_ckpt, tiny_dataset, capsys):
    """--mode=half: a trained model in fp32 vs its to_half copy, on prompts from the val split."""
    bench.main(["--mode=half", f"--ckpt={tiny_ckpt}", f"--dataset={tiny_dataset}", "--device=cpu",
                "--half_prompts=3", "--half_new_tokens=5"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["mode"] == "half" and result["prompts"] == 3 and result["new_tokens"] == 5
    assert 0 <= result["same_token_share"] <= 1 and 0 <= result["same_next_token_share"] <= 1
    assert len(result["first_difference"]) == 3
    assert all(f is None or 0 <= f < 5 for f in result["first_difference"])
    assert abs(result["perplexity_change"]) < 0.01 and result["perplexity_fp32"] > 1
    assert "greedy tokens, bfloat16 vs fp32" in out and "the same next token after fp32's tokens" in out


def test_bench_half_needs_a_checkpoint_and_its_data():
    with pytest.raises(ConfigError, match="--mode=half needs --ckpt=PATH"):
        bench.main(["--mode=half", "--device=cpu"])


@pytest.mark.slow
def test_bench_sample_times_sample_py_end_to_end(capsys):
    """--mode=sample: sample.py as processes, fp32 and bf16, short and long, against transformers."""
    bench.main(["--mode=sample", "--device=cpu", "--sample_short=2", "--gen_new_tokens=6", "--sample_runs=1"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["mode"] == "sample" and (result["short"], result["long"]) == (2, 6)
    impls = [r["impl"] for r in result["rows"]]
    assert impls[:2] == ["sample.py --dtype=float32", "sample.py --dtype=bfloat16"]
    for row in result["rows"][:2]:
        assert row["seconds_long"] > 0 and row["seconds_short"] > 0 and "tokens_per_s" in row
    if has_transformers():
        assert impls[2].startswith("transformers") and result["rows"][2]["vs_transformers"] == 1.0
    assert "vs transformers" in out


def test_bench_preference_tiny_shape(capsys):
    """--mode=preference: each variant's step in its own process; LoRA trains only its adapters, and the
    rates are the batch's pairs over the step's time."""
    bench.main(["--mode=preference", "--pref_shapes=tiny", "--pref_lengths=6,8,8", "--block_size=16",
                "--steps=1", "--warmup=1", "--device=cpu", "--dtype=float32"])
    out = capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads(out.strip().splitlines()[-1])["variants"]}
    assert set(rows) == {"sft", "dpo", "dpo_precomputed", "dpo_lora"}
    assert rows["dpo_lora"]["trainable_params"] < rows["dpo"]["trainable_params"] == rows["sft"]["trainable_params"]
    for r in rows.values():
        assert r["shape"] == "tiny" and r["ms_per_step"] > 0 and r["peak_rss_mb"] > 0
        assert r["pairs_per_s"] == pytest.approx(4 / (r["ms_per_step"] / 1000), rel=0.01)
        assert r["pair_tokens_per_s"] == pytest.approx(r["pairs_per_s"] * 22, rel=0.01)
    assert "dpo_precomputed" in out and "pair tok/s" in out
    with pytest.raises(SystemExit, match="unknown shape 'huge'"):
        bench.main(["--mode=preference", "--pref_shapes=huge"])


def test_each_mode_is_a_module_whose_keys_bench_py_parses():
    """--mode=X runs benchmarks/X's bench(cfg); every mode's keys are bench.py's keys (with --help meanings), and
    the keys shared by all modes (device, dtype, seed) are bench.py's own."""
    assert set(bench.MODES) == {"train", "generate", "half", "sample", "finetune", "prepare", "parallel",
                                "preference"}
    for module in bench.MODES.values():
        assert callable(module.bench) and set(module.DEFAULTS) <= set(bench.DEFAULTS)
        assert not {"mode", "device", "dtype", "seed"} & set(module.DEFAULTS)
    assert len(bench.DEFAULTS) == 4 + sum(len(m.DEFAULTS) for m in bench.MODES.values())  # no key defined twice
    assert set(bench.key_meanings()) == set(bench.DEFAULTS)
    with pytest.raises(SystemExit, match="unknown --mode='nope'"):
        bench.main(["--mode=nope"])


def test_baseline_is_nanogpts_recipe_for_the_device():
    """--baseline: nanoGPT's full-logits loss everywhere; on the CPU its CPU recipe too (fp32, PyTorch's default
    AdamW); on CUDA ours otherwise (bf16 autocast, compile, fused AdamW: nanoGPT's CUDA recipe), so only the loss
    changes there (tools/gpu_bench.py's nanogpt recipe)."""
    import torch
    import torch.nn.functional as F
    from benchmarks import train_speed
    cfg = {**bench.DEFAULTS, "device": "cpu", "dtype": "bfloat16", "baseline": True}
    _, run, model, _, optimizer, _ = train_speed.train_setup(cfg)
    assert run["dtype"] == "float32" and type(optimizer) is torch.optim.AdamW and not optimizer.defaults["fused"]
    hidden, targets = torch.randn(16, model.config.n_embd), torch.randint(model.config.vocab_size, (16,))
    expected = F.cross_entropy(model.lm_head(hidden).float(), targets)  # every position's fp32 logits
    assert torch.allclose(model._masked_loss(hidden, targets, None), expected)
    ours = train_speed.train_setup({**cfg, "baseline": False})
    assert ours[1]["dtype"] == "bfloat16" and "_masked_loss" not in vars(ours[2])
    kept = ours[4]
    assert train_speed._baseline(ours[2], kept, cpu=False) is kept  # CUDA: the optimizer stays ours (fused)
    assert "_masked_loss" in vars(ours[2])
