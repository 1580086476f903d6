"""model.py: attention paths, the masked loss, the KV cache, the optimizer groups and the size/FLOP counts."""
import math

import pytest
import torch
from torch.nn import functional as F

from chat_gpt2.engine import KVCache
from chat_gpt2.model import GPT, GPTConfig

TINY = dict(block_size=16, vocab_size=96, n_layer=2, n_head=4, n_embd=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def tokens(B=2, T=12, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def twin(model, **overrides):
    """A copy of model with the same weights and a changed config."""
    other = GPT(GPTConfig(**{**vars(model.config), **overrides}))
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("train_mode", [False, True])
def test_sdpa_and_manual_attention_agree(train_mode):
    flash = tiny_model(dropout=0.0, flash=True)
    manual = twin(flash, flash=False)
    flash.train(train_mode)
    manual.train(train_mode)
    x = tokens()
    a, _ = flash(x, all_logits=True)
    b, _ = manual(x, all_logits=True)
    assert a.shape == (2, 12, TINY["vocab_size"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # and with a KV cache (prefix, then a multi-token continuation, then one token)
    caches = KVCache(flash.config), KVCache(manual.config)
    for part in (x[:, :5], x[:, 5:11], x[:, 11:]):
        a, _ = flash(part, kv_cache=caches[0], all_logits=True)
        b, _ = manual(part, kv_cache=caches[1], all_logits=True)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flash", [True, False])
def test_kv_cache_matches_full_forward(flash):
    model = tiny_model(flash=flash).eval()
    x = tokens(T=14)
    full, _ = model(x, all_logits=True)
    cache = KVCache(model.config)
    prefix, _ = model(x[:, :9], kv_cache=cache, all_logits=True)
    cont, _ = model(x[:, 9:], kv_cache=cache, all_logits=True)
    assert cache.length == 14
    torch.testing.assert_close(prefix, full[:, :9], atol=1e-5, rtol=0)
    torch.testing.assert_close(cont, full[:, 9:], atol=1e-5, rtol=0)
    # token by token, without all_logits: the last position's logits each step
    cache.reset()
    for t in range(14):
        step, _ = model(x[:, t:t + 1], kv_cache=cache)
        torch.testing.assert_close(step[:, -1], full[:, t], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="block_size"):
        model(x[:, :3], kv_cache=cache)  # 14 + 3 > 16


def test_logits_without_targets_are_last_position_only():
    model = tiny_model().eval()
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
    model = tiny_model().eval()
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
    model = tiny_model().eval()
    x, y = tokens(seed=1), tokens(seed=2)
    logits, _ = model(x, all_logits=True)
    y[:, ::2] = -1
    _, loss = model(x, y)
    expected = F.cross_entropy(logits.reshape(-1, TINY["vocab_size"]), y.reshape(-1), ignore_index=-1)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_all_masked_batch_gives_zero_loss_and_backward_works():
    model = tiny_model()
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
    model = tiny_model()
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


def test_configure_optimizers_decays_only_2d_params():
    model = tiny_model()
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


def test_get_num_params():
    model = tiny_model()
    V, B, C, L = TINY["vocab_size"], TINY["block_size"], TINY["n_embd"], TINY["n_layer"]
    per_block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    total = V * C + B * C + L * per_block + 2 * C  # token embedding tied to lm_head: counted once
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - B * C
    no_bias = tiny_model(bias=False)
    assert no_bias.get_num_params(non_embedding=False) == total - L * (C + 3 * C + C + C + 4 * C + C) - C


def test_flops_per_token():
    model = tiny_model()
    cfg = model.config
    f = model.flops_per_token()
    assert f > 0 and isinstance(f, int)
    assert f >= 6 * model.get_num_params()
    assert model.flops_per_token(seq_len=8) < f  # attention cost grows with the sequence
    assert f == 6 * model.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_crop_block_size():
    model = tiny_model().eval()
    x = tokens(T=8)
    before, _ = model(x, all_logits=True)
    model.crop_block_size(8)
    after, _ = model(x, all_logits=True)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape[0] == 8
    torch.testing.assert_close(before, after)
    with pytest.raises(ValueError):
        model(tokens(T=9))


def test_weights_are_tied_and_initialised():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * TINY["n_layer"]), rel=0.3)
