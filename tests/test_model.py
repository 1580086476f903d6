"""model.py: attention paths, the masked loss, the fused head loss, the CPU Linear path, the KV cache,
the optimizer groups, the size/FLOP counts, and torch.compile."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import helpers
from chat_gpt2.engine import KVCache
from model import GPT, GPTConfig, Linear, head_loss

TINY = dict(block_size=16, vocab_size=96, n_layer=2, n_head=4, n_embd=32)
tiny_gpt = partial(helpers.tiny_model, residual_scale=1, train=True, **TINY)  # GPT-2's init, as constructed


def tokens(B=2, T=12, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def twin(model, **overrides):
    """A copy of model with the same weights and a changed config."""
    other = GPT(GPTConfig(**{**vars(model.config), **overrides}))
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("train_mode", [False, True])
def test_sdpa_and_manual_attention_agree(train_mode):
    flash = tiny_gpt(dropout=0.0, flash=True)
    manual = twin(flash, flash=False)
    flash.train(train_mode)
    manual.train(train_mode)
    x = tokens()
    a, _ = flash(x, all_logits=True)
    b, _ = manual(x, all_logits=True)
    assert a.shape == (2, 12, TINY["vocab_size"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # and with a KV cache (prefix, then a multi-token continuation, then one token)
    caches = KVCache(flash.config, max_rows=2), KVCache(manual.config, max_rows=2)
    for part in (x[:, :5], x[:, 5:11], x[:, 11:]):
        a, _ = flash(part, kv_cache=caches[0], all_logits=True)
        b, _ = manual(part, kv_cache=caches[1], all_logits=True)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flash", [True, False])
def test_kv_cache_matches_full_forward(flash):
    model = tiny_gpt(flash=flash).eval()
    x = tokens(T=14)
    full, _ = model(x, all_logits=True)
    cache = KVCache(model.config, max_rows=2)
    prefix, _ = model(x[:, :9], kv_cache=cache, all_logits=True)
    cont, _ = model(x[:, 9:], kv_cache=cache, all_logits=True)
    assert cache.lengths.tolist() == [14, 14]
    torch.testing.assert_close(prefix, full[:, :9], atol=1e-5, rtol=0)
    torch.testing.assert_close(cont, full[:, 9:], atol=1e-5, rtol=0)
    # token by token, without all_logits: the last position's logits each step
    cache.lengths.zero_()  # start again
    for t in range(14):
        step, _ = model(x[:, t:t + 1], kv_cache=cache)
        torch.testing.assert_close(step[:, -1], full[:, t], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="block_size"):
        model(x[:, :3], kv_cache=cache)  # 14 + 3 > 16


def test_logits_without_targets_are_last_position_only():
    model = tiny_gpt().eval()
    x = tokens()
    last, loss = model(x)
    full, _ = model(x, all_logits=True)
    assert loss is None and last.shape == (2, 1, TINY["vocab_size"])
    torch.testing.assert_close(last[:, 0], full[:, -1])


def hand_loss(logits, targets, mask):
    """Token-weighted mean cross-entropy over the positions where mask is 1 and the target is not -1."""
    total, count = 0.0, 0
    for b in range(targets.size(0)):
        for t in range(targets.size(1)):
            if mask[b, t] > 0 and targets[b, t] != -1:
                row = logits[b, t].double()
                total += (torch.logsumexp(row, 0) - row[targets[b, t]]).item()
                count += 1
    return total / count


def test_masked_loss_equals_hand_computation():
    model = tiny_gpt().eval()
    x, y = tokens(seed=1), tokens(seed=2)
    mask = torch.zeros(2, 12)
    mask[0, 3:7] = 1
    mask[1, 10:] = 1
    y[1, 11] = -1  # ignored even where the mask is 1
    logits, _ = model(x, all_logits=True)
    _, loss = model(x, y, mask)
    assert loss.item() == pytest.approx(hand_loss(logits, y, mask), abs=1e-5)
    # the rows' lengths differ (4 vs 1 learned tokens): a mean of per-row means would differ
    per_row = (hand_loss(logits[:1], y[:1], mask[:1]) + hand_loss(logits[1:], y[1:], mask[1:])) / 2
    assert abs(loss.item() - per_row) > 1e-4
    # no mask: every target but the -1 counts
    _, loss_all = model(x, y)
    assert loss_all.item() == pytest.approx(hand_loss(logits, y, torch.ones(2, 12)), abs=1e-5)


def test_targets_minus_one_are_ignored():
    model = tiny_gpt().eval()
    x, y = tokens(seed=1), tokens(seed=2)
    logits, _ = model(x, all_logits=True)
    y[:, ::2] = -1
    _, loss = model(x, y)
    expected = F.cross_entropy(logits.reshape(-1, TINY["vocab_size"]), y.reshape(-1), ignore_index=-1)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_all_masked_batch_gives_zero_loss_and_backward_works():
    model = tiny_gpt()
    x, y = tokens(), tokens(seed=3)
    _, loss = model(x, y, torch.zeros(2, 12))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)
    _, loss = model(x, torch.full_like(y, -1))
    assert loss.item() == 0.0


def test_masked_loss_gradient_only_from_learned_positions():
    """Changing a target where the mask is 0 changes neither the loss nor the gradients."""
    model = tiny_gpt()
    x, y = tokens(), tokens(seed=3)
    mask = torch.ones(2, 12)
    mask[:, :6] = 0
    _, loss_a = model(x, y, mask)
    loss_a.backward()
    grad_a = model.lm_head.weight.grad.clone()
    model.zero_grad()
    y2 = y.clone()
    y2[:, :6] = (y2[:, :6] + 1) % TINY["vocab_size"]
    _, loss_b = model(x, y2, mask)
    loss_b.backward()
    assert loss_a.item() == loss_b.item()
    torch.testing.assert_close(grad_a, model.lm_head.weight.grad)


# ---------------------------------------------------------------------------------------------------------------
# The fused head loss (cross-entropy in chunks) and the CPU Linear path


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


@pytest.mark.parametrize("shape", [(1, 1, 24), (8, 1, 24), (2, 8, 24), (3, 24), (4, 9, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_few_rows_path_matches_f_linear(shape, bias):
    """model.Linear's CPU path for <= 16 rows (cached decoding) computes W @ x.T: same values and gradients."""
    torch.manual_seed(0)
    layer, x = Linear(24, 40, bias=bias), torch.randn(*shape, requires_grad=True)
    out = layer(x)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-6)
    grads = torch.autograd.grad(out.sum(), [x, layer.weight])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, torch.autograd.grad(expected.sum(),
                                                                                          [x, layer.weight])))


# ---------------------------------------------------------------------------------------------------------------
# Optimizer, sizes, FLOPs, block size, init


def test_configure_optimizers_decays_only_2d_params():
    model = tiny_gpt()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}  # tied weight once
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed  # wte is lm_head
    assert not any(n.endswith(".bias") or ".ln_" in n for n in decayed)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_configure_optimizers_uses_fused_adamw_on_cpu():
    opt = tiny_gpt(block_size=32, vocab_size=512, bias=False).configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert opt.defaults["fused"] is True


def test_get_num_params():
    model = tiny_gpt()
    V, B, C, L = TINY["vocab_size"], TINY["block_size"], TINY["n_embd"], TINY["n_layer"]
    per_block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    total = V * C + B * C + L * per_block + 2 * C  # token embedding tied to lm_head: counted once
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - B * C
    no_bias = tiny_gpt(bias=False)
    assert no_bias.get_num_params(non_embedding=False) == total - L * (C + 3 * C + C + C + 4 * C + C) - C


def test_flops_per_token():
    model = tiny_gpt()
    cfg = model.config
    f = model.flops_per_token()
    assert f > 0 and isinstance(f, int)
    assert f >= 6 * model.get_num_params()
    assert model.flops_per_token(seq_len=8) < f  # attention cost grows with the sequence
    assert f == 6 * model.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_crop_block_size():
    model = tiny_gpt().eval()
    x = tokens(T=8)
    before, _ = model(x, all_logits=True)
    model.crop_block_size(8)
    after, _ = model(x, all_logits=True)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape[0] == 8
    torch.testing.assert_close(before, after)
    with pytest.raises(ValueError):
        model(tokens(T=9))


def test_weights_are_tied_and_initialised():
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * TINY["n_layer"]), rel=0.3)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


def test_compiled_forward_matches_eager():
    """The one inductor test (compiling on CPU is slow): a compiled model computes what the eager one does."""
    model = tiny_gpt(block_size=32, vocab_size=512, n_head=2, bias=False, n_layer=1).eval()
    idx = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, _ = model(idx, all_logits=True)
        compiled, _ = torch.compile(model)(idx, all_logits=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_train_flops_count_only_what_a_frozen_run_computes():
    """LoRA: no weight gradient for the base, 4 of 6 FLOPs per weight (the adapters' own 6); trainable_layers=1:
    the lower blocks run forward only, the last block and the head also backward."""
    from chat_gpt2.lora import TARGETS, apply_lora, freeze_layers
    cfg = tiny_gpt().config
    L, C, T = cfg.n_layer, cfg.n_embd, cfg.block_size
    full = tiny_gpt()
    body, head = full.matmul_weights()
    lora = apply_lora(tiny_gpt(), {"rank": 2, "alpha": 2.0, "dropout": 0.0, "targets": list(TARGETS)})
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert lora.train_flops(1, T, 1) == 4 * (body + adapters) + 2 * adapters + 4 * head + 12 * L * C * T
    last = freeze_layers(tiny_gpt(), 1)
    block = sum(p.numel() for p in last.transformer.h[-1].parameters())
    ln_f = sum(p.numel() for p in last.transformer.ln_f.parameters())
    lower = body - block - ln_f
    assert last.train_flops(1, T, 1) == 2 * lower + 6 * (block + ln_f) + 4 * head + 4 * L * C * T + 8 * C * T
    assert full.train_flops(1, T, 1) == full.flops_per_token()
