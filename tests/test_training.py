"""chat_gpt2/training.py: the learning-rate schedule, early stopping, one train step (token-weighted over micro-batches,
and in bf16 autocast); chat_gpt2/objectives.py: the objective chosen by the dataset's kind, language modelling's
evaluation and report (classification's: test_classify_model.py)."""
import numpy as np
import pytest
import torch

import helpers
from chat_gpt2 import dataset, objectives, training
from chat_gpt2.classify_data import load_prepared
from model import GPT, GPTConfig

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


def _loss_trajectory(data, dtype, steps=25):
    """Losses of `steps` train.py steps on the tiny dataset from the same seed, in dtype (autocast for bf16)."""
    # the real vocab: the head and its loss are in the comparison
    model = helpers.tiny_model(seed=1, residual_scale=1, train=True, block_size=32, bias=False)
    optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    cfg = {"gradient_accumulation_steps": 1, "batch_size": 8, "block_size": 32, "grad_clip": 1.0}
    run = {"device": "cpu", "dtype": dtype, "ddp": False}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(2)
    return [training.train_step(model, optimizer, scaler, data, gen, cfg, run).item() for _ in range(steps)]


def test_bf16_and_fp32_loss_trajectories_match(tiny_dataset):
    data, _ = dataset.load_dataset(tiny_dataset)
    fp32 = _loss_trajectory(data["train"], "float32")
    bf16 = _loss_trajectory(data["train"], "bfloat16")
    assert fp32[-1] < fp32[0] - 2.0  # it learns, so the comparison covers real training, not noise around 10.8
    diffs = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert max(diffs) < 0.05 * max(fp32[-1], 1.0), (fp32, bf16)


def test_the_objectives_weights_set_each_micro_batchs_share(tiny_dataset):
    """forward_backward weights each micro-batch as the objective says: with one weight for all, the
    loss and the gradient are those of the plain mean of the micro-batches' losses."""
    data, _ = dataset.load_dataset(tiny_dataset)
    model = helpers.tiny_model(residual_scale=1, train=True, block_size=16, dropout=0.0)
    gen = torch.Generator().manual_seed(5)
    batches = [data["train"].get_batch(2, 16, gen) for _ in range(3)]
    assert len({training.learned(b) for b in batches}) > 1  # token weighting would differ
    run = {"device": "cpu", "dtype": "float32", "ddp": False}
    loss = training.forward_backward(model, torch.amp.GradScaler("cpu", enabled=False), batches, run,
                                     weight_of=lambda batch: 1.0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    plain_mean = sum(training.masked_loss(model, b) for b in batches) / 3
    plain_mean.backward()
    assert loss.item() == pytest.approx(plain_mean.item(), abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The language-modelling objective


RUN = {"device": "cpu", "dtype": "float32", "ddp": False, "rank": 0, "master": True, "world": 1}


def test_the_objective_follows_the_datasets_kind(tiny_dataset):
    data, meta = load_prepared(tiny_dataset)
    cfg = {"batch_size": 2, "block_size": 16}
    assert type(objectives.objective_for(meta, data, cfg, RUN)) is objectives.LanguageModelling
    older = {k: v for k, v in meta.items() if k != "kind"}  # prepared before meta.json had a kind
    assert type(objectives.objective_for(older, data, cfg, RUN)) is objectives.LanguageModelling


def test_language_modelling_evaluates_the_token_weighted_loss_of_fixed_batches(tiny_dataset):
    data, meta = load_prepared(tiny_dataset)
    cfg = {"seed": 3, "eval_iters": 2, "batch_size": 2, "block_size": 16, "sample_max_tokens": 4}
    task = objectives.objective_for(meta, data, cfg, RUN)
    model = helpers.tiny_model(residual_scale=1, block_size=16, dropout=0.0)
    losses = task.evaluate(model)
    for i, split in enumerate(("train", "val")):
        gen = torch.Generator().manual_seed(3 + i)  # seed + 7919 * rank + the split's index
        batches = [data[split].get_batch(2, 16, gen) for _ in range(2)]
        with torch.no_grad():
            weighted = sum(training.masked_loss(model, b).item() * training.learned(b) for b in batches)
        assert losses[split] == pytest.approx(weighted / sum(training.learned(b) for b in batches), rel=1e-5)
    assert task.evaluate(model) == losses and model.training  # the same batches each time; back to train()
    fields, text = task.report(model, losses)  # bits per byte, the greedy sample reply to the val's first prompt
    assert fields == {"train_bpb": losses["train_bpb"], "val_bpb": losses["val_bpb"]}
    assert text.startswith(f", val {losses['val_bpb']:.4f} bits/byte\n  sample: ") and " -> " in text
    assert task.report(model, losses) == (fields, text)
    assert objectives.LanguageModelling(data, meta, {**cfg, "sample_max_tokens": 0}, RUN).report(model, losses) \
        == (fields, text.split("\n")[0])
