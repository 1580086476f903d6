"""config/pretrain_gpt2.py: it parses with train.py's keys, and its numbers agree with what its comments and
docs/training.md say (GPT-2 124M, ~0.5M tokens per step on 8 GPUs, ~10B tokens, nanoGPT's and llm.c's settings)."""
import os
import runpy

import pytest
import torch

import configurator
import train
from helpers import REPO
from model import GPT, GPTConfig

CONFIG = os.path.join(REPO, "config", "pretrain_gpt2.py")


def test_pretrain_gpt2_config_parses_and_its_numbers_agree():
    cfg, explicit = configurator.load(train.DEFAULTS, [CONFIG], prog="train.py")
    assert {"batch_size", "gradient_accumulation_steps", "max_iters", "learning_rate"} <= set(explicit)
    namespace = runpy.run_path(CONFIG)
    gpus = namespace["_gpus"]
    tokens_per_step = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"] * gpus
    assert gpus == 8 and cfg["block_size"] == 1024 and tokens_per_step == namespace["_tokens_per_step"] == 2 ** 19
    assert abs(cfg["max_iters"] * tokens_per_step - 10e9) < 0.001 * 10e9  # 10B tokens
    assert cfg["lr_decay_iters"] == cfg["max_iters"] and 0 < cfg["warmup_iters"] < cfg["max_iters"] // 10
    assert cfg["learning_rate"] == 6e-4 and cfg["min_lr"] == pytest.approx(cfg["learning_rate"] / 10)
    assert (cfg["weight_decay"], cfg["beta1"], cfg["beta2"], cfg["grad_clip"]) == (0.1, 0.9, 0.95, 1.0)
    assert cfg["init_from"] == "scratch" and cfg["dropout"] == 0.0 and cfg["patience"] == 0
    assert 0 < cfg["eval_interval"] < cfg["max_iters"] and cfg["log_interval"] <= cfg["eval_interval"]
    with torch.device("meta"):  # the shape without allocating it
        model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                              block_size=cfg["block_size"], bias=cfg["bias"]))
    assert 123e6 < model.get_num_params(non_embedding=False) - 1024 * 768 < 125e6  # GPT-2 "124M": all but wpe
    # the other GPU counts the comment names keep the tokens per step
    for n, accum in ((1, 32), (4, 8)):
        assert cfg["batch_size"] * cfg["block_size"] * accum * n == tokens_per_step
