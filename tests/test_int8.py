"""int8 weight-only inference (--dtype=int8): GPT.to_half(torch.int8), Linear.quantize, int8_matmul."""
import copy
import json

import pytest
import torch

import eval as eval_py
import helpers
import model as model_module
import sample
from benchmarks.generate_speed import greedy_tokens
from chat_gpt2.device import autocast, resolve_dtype
from chat_gpt2.errors import ConfigError
from chat_gpt2.inference import load_engine, to_half
from model import GPT, REFINE_TOP, GPTConfig, int8_matmul, int8_matmul_dense, quantize_int8


def int8_engine(ckpt, dtype="int8"):
    return load_engine({"out_dir": "", "ckpt": ckpt, "device": "cpu", "dtype": dtype})[0]


def test_every_linear_is_quantised_and_the_rest_keeps_its_dtype(tiny_ckpt):
    model = int8_engine(tiny_ckpt).model
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" in linears and len(linears) == 1 + 4 * model.config.n_layer
    for name, p in model.named_parameters():  # the tied wte is lm_head's weight: named once, as wte
        owner, kind = name.rsplit(".", 1)
        if name == "transformer.wte.weight" or owner in linears and kind == "weight":
            assert p.dtype == torch.int8 and not p.requires_grad, name
        elif owner in linears:
            assert p.dtype == torch.bfloat16, name  # biases: the compute dtype
        else:
            assert p.dtype == torch.float32, name  # norms, wpe
    assert model.transformer.wte.weight is model.lm_head.weight
    for layer in linears.values():
        assert layer.scales.dtype == torch.bfloat16 and layer.scales.shape == (layer.out_features,)


def test_quantised_weights_are_within_half_a_step_per_channel():
    weight = torch.randn(48, 40) * torch.linspace(0.01, 3, 48)[:, None]  # channels of many sizes
    weight[5] = 0.0  # an all-zero channel
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (q.float() * scales.float()[:, None] - weight).abs()
    assert (error <= scales.float()[:, None] * 0.51).all()  # round to nearest (and the clamp at 127)
    assert (q[5] == 0).all()
    # each channel uses its own range: its largest weight lands near +-127
    assert (q.abs().amax(1)[weight.abs().amax(1) > 0] >= 126).all()


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_matmul_is_the_dequantised_product(rows):
    weight = torch.randn(96, 64)
    q, scales = quantize_int8(weight)
    x = torch.randn(rows, 64).bfloat16()
    exact = x.float() @ (q.float() * scales.float()[:, None]).t()
    for out in (int8_matmul(x, q, scales), int8_matmul_dense(x, q, scales)):
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
        torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)


def test_a_device_without_the_kernel_takes_the_dense_product(monkeypatch):
    """CUDA / MPS builds without torch._weight_int8pack_mm run the same code: the first failure is
    remembered per device type and the dequantised product answers."""
    calls = []

    def missing(*args):
        calls.append(1)
        raise NotImplementedError("no kernel for this backend")
    monkeypatch.setattr(torch, "_weight_int8pack_mm", missing)
    monkeypatch.setattr(model_module, "_NO_INT8_KERNEL", set())
    q, scales = quantize_int8(torch.randn(16, 8))
    x = torch.randn(3, 8).bfloat16()
    for _ in range(2):
        assert torch.equal(int8_matmul(x, q, scales), int8_matmul_dense(x, q, scales))
    assert calls == [1] and model_module._NO_INT8_KERNEL == {"cpu"}


def test_residual_stream_stays_fp32_and_top_logits_are_fp32_sums(tiny_ckpt):
    """As with bf16 weights: blocks add to an fp32 residual, the matmuls run in bf16, and the
    REFINE_TOP largest logits are exact fp32 products of the head's fp32 weight (kept beside its int8
    one) with ln_f's output."""
    model = int8_engine(tiny_ckpt).model
    seen, hidden = {}, {}
    for name, module in [("block", model.transformer.h[0]), ("qkv", model.transformer.h[0].attn.c_attn),
                         ("ln_f", model.transformer.ln_f)]:
        module.register_forward_hook(lambda m, args, out, name=name: seen.update({name: out.dtype}))
    model.transformer.ln_f.register_forward_hook(lambda m, args, out: hidden.update(x=out))
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3, 4]]))
    assert seen == {"block": torch.float32, "qkv": torch.bfloat16, "ln_f": torch.float32}
    assert logits.dtype == torch.float32
    top = logits[0, -1].topk(REFINE_TOP).indices
    fp32_head = int8_engine(tiny_ckpt, "float32").model.lm_head.weight
    exact = fp32_head[top] @ hidden["x"][0, -1]
    torch.testing.assert_close(logits[0, -1, top], exact, rtol=1e-5, atol=1e-5)


def test_token_embeddings_are_the_fp32_head_rows_and_blocks_keep_no_fp32_copy(tiny_ckpt):
    fp32, int8 = int8_engine(tiny_ckpt, "float32").model, int8_engine(tiny_ckpt).model
    idx = torch.tensor([[0, 7, 50000]])
    assert torch.equal(int8.lm_head.dense_weight(idx), fp32.transformer.wte(idx))
    assert int8.lm_head.weight.dtype == torch.int8  # what a decoding step reads
    block = int8.transformer.h[0].mlp.c_fc
    assert getattr(block, "dense", None) is None  # the blocks' dense weights are dequantised
    rows = block.dense_weight(torch.tensor([0, 5]))
    steps = block.scales[[0, 5]].float().unsqueeze(-1)
    assert ((rows - fp32.transformer.h[0].mlp.c_fc.weight[[0, 5]]).abs() <= steps * 0.51).all()


def trained_tiny_model(steps=150):
    """A small GPT trained for a few seconds on a fixed pattern (each token determined by the one
    before it), so that its greedy tokens are confident, as a trained model's mostly are."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        seq = torch.randint(0, 64, (16, 1))
        for _ in range(32):
            seq = torch.cat([seq, (5 * seq[:, -1:] + 3) % 64], dim=1)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_int8_greedy_tokens_agree_with_fp32_on_a_trained_model():
    model = trained_tiny_model()
    int8 = to_half(copy.deepcopy(model), "int8", "cpu")
    prompts = torch.randint(0, 64, (8, 4), generator=torch.Generator().manual_seed(1))
    fp32_tokens, int8_tokens = (greedy_tokens(m, prompts, 24) for m in (model, int8))
    # the model learned the pattern: its tokens are not noise, so agreement means something
    continued = torch.cat([prompts, fp32_tokens], dim=1)
    assert ((5 * continued[:, 4:-1] + 3) % 64 == continued[:, 5:]).float().mean() > 0.8
    assert (fp32_tokens == int8_tokens).float().mean() >= 0.9


def test_eval_perplexity_in_int8_is_close_to_fp32(tiny_dataset, tiny_ckpt, capsys):
    perplexity = {}
    for dtype in ("float32", "int8"):
        eval_py.main([f"--ckpt={tiny_ckpt}", "--device=cpu", f"--dataset={tiny_dataset}", "--batch_size=3",
                      f"--dtype={dtype}"])
        perplexity[dtype] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert perplexity["int8"] == pytest.approx(perplexity["float32"], rel=0.01)
    assert perplexity["int8"] != perplexity["float32"]  # the int8 weights did run


def test_sample_runs_in_int8(tiny_ckpt, capsys):
    sample.main([f"--ckpt={tiny_ckpt}", "--device=cpu", "--dtype=int8", "--prompt=Hi", "--temperature=0",
                 "--max_new_tokens=4", "--num_samples=1"])
    assert capsys.readouterr().out.strip()


def test_int8_is_a_dtype_for_inference_only(tiny_dataset, tmp_path):
    assert resolve_dtype("int8", "cpu") == "int8"
    with autocast("cpu", "int8"):  # no autocast: the int8 Linears multiply in bf16 themselves
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ConfigError, match=r"^--dtype=int8 is for inference"):
        helpers.train_inprocess(helpers.tiny_train_args(tiny_dataset, str(tmp_path / "out"), dtype="int8"))
    assert not (tmp_path / "out").exists()


def test_bench_counts_the_weight_bytes_a_step_reads(tiny_ckpt):
    """bench.py --mode=generate's weight MB per step: every Linear's weight, bias and scales, the tied head once;
    int8 is a quarter of fp32's weight bytes (plus its bf16 biases and scales)."""
    from benchmarks.generate_speed import weight_bytes
    fp32, int8 = int8_engine(tiny_ckpt, "float32").model, int8_engine(tiny_ckpt).model
    linears = [m for m in int8.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    extras = sum(m.out_features + (m.bias.numel() if m.bias is not None else 0) for m in linears)
    assert weight_bytes(int8) == weights + 2 * extras
    assert weight_bytes(fp32) == 4 * (weights + sum(m.bias.numel() for m in linears if m.bias is not None))
