"""Half-precision inference: --dtype=bfloat16|float16 converts the weights and the KV cache, not just autocast;
--dtype=auto picks bf16 on CPUs with native bf16 only; eval.py stays fp32 unless asked."""
import json

import pytest
import torch

import eval as eval_py
import gen_helpers
import helpers
import sample
from chat_gpt2 import device
from chat_gpt2.engine import KVCache, SamplingParams, generate, load_engine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return gen_helpers.save_tiny_checkpoint(tmp_path_factory.mktemp("half") / "tiny.pt")


def engine_for(ckpt, dtype):
    return load_engine({"out_dir": "", "ckpt": ckpt, "device": "cpu", "dtype": dtype})[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weights_and_cache_are_converted(ckpt, dtype):
    engine = engine_for(ckpt, dtype)
    assert {p.dtype for p in engine.model.parameters()} == {getattr(torch, dtype)}
    prompt = torch.tensor([[1, 2, 3, 4]])
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    cached = torch.stack(list(generate(engine.model, prompt, params, use_cache=True)), dim=1)
    uncached = torch.stack(list(generate(engine.model, prompt, params, use_cache=False)), dim=1)
    assert torch.equal(cached, uncached)  # the half-precision KV cache reproduces full recomputation
    cache = KVCache(engine.model.config)
    with torch.no_grad():
        engine.model(prompt, kv_cache=cache)
    assert cache.layers[0].k.dtype == getattr(torch, dtype)


def test_half_replies_agree_with_fp32_on_most_tokens(ckpt):
    full, half = engine_for(ckpt, "float32"), engine_for(ckpt, "bfloat16")
    prompts = torch.randint(0, 50257, (8, 6), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    a, b = (torch.stack(list(generate(e.model, prompts, params)), dim=1) for e in (full, half))
    assert (a[:, 0] == b[:, 0]).float().mean() >= 0.75  # the first token rarely flips; later ones may diverge


def test_auto_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert device.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.resolve_dtype("auto", "cpu") == "float32"  # emulated bf16 is slower than fp32
    assert device.resolve_dtype("auto", "mps") == "float32"
    with pytest.raises(ValueError, match="dtype must be"):
        device.resolve_dtype("bf16", "cpu")


def test_sample_and_eval_in_half_precision(ckpt, tmp_path, capsys):
    sample.main([f"--ckpt={ckpt}", "--device=cpu", "--dtype=bfloat16", "--prompt=Hi", "--temperature=0",
                 "--max_new_tokens=4"])
    capsys.readouterr()
    data = helpers.write_records(tmp_path / "h.jsonl", [{"user": "Hi", "assistant": "Hello"}] * 2)
    assert eval_py.DEFAULTS["dtype"] == "float32"  # scores compare across machines
    eval_py.main([f"--ckpt={ckpt}", "--device=cpu", f"--data={data}", f"--out={tmp_path / 'r.jsonl'}",
                  "--max_new_tokens=4", "--dtype=bfloat16"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 2
