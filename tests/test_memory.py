"""chat_gpt2/memory.py: a training run's memory estimate (only trainable state for LoRA / frozen layers), and the
refusal (with a fix to try) when it cannot fit."""
import pytest

from chat_gpt2 import memory
from chat_gpt2.lora import TARGETS, apply_lora, freeze_layers, lora_settings
from model import GPT, GPTConfig


def test_count_params_matches_the_model():
    for bias in (True, False):
        config = GPTConfig(block_size=48, vocab_size=50304, n_layer=3, n_head=2, n_embd=32, bias=bias)
        assert memory.count_params(config) == GPT(config).get_num_params(non_embedding=False)


def test_memory_estimate_and_refusal(monkeypatch, capsys):
    import train
    cfg = dict(train.DEFAULTS, batch_size=8, block_size=1024)
    gpt2 = GPTConfig(block_size=1024, vocab_size=50257)  # 124M parameters
    run = {"device": "cpu", "dtype": "float32", "ddp": False, "world": 1, "master": True}
    need = memory.estimate_memory(gpt2, cfg, "float32")
    assert need["weights"] == 4 * 124_439_808 and need["optimizer"] == 2 * need["weights"]
    assert 8 * 2 ** 30 < need["total"] < 14 * 2 ** 30  # 1.9 GiB of state + activations and logits of 8 x 1024
    monkeypatch.setattr(memory, "available_memory", lambda device: 100 * 2 ** 30)
    assert memory.check_memory(gpt2, cfg, run) == need
    assert "memory estimate:" in capsys.readouterr().out
    monkeypatch.setattr(memory, "available_memory", lambda device: 5 * 2 ** 30)  # the activations do not fit
    with pytest.raises(RuntimeError, match=r"--batch_size=2 --gradient_accumulation_steps=4 \(about the same") as e:
        memory.check_memory(gpt2, cfg, run)
    print(f"\n{e.value}")
    monkeypatch.setattr(memory, "available_memory", lambda device: 2.5 * 2 ** 30)  # not even one sequence
    with pytest.raises(RuntimeError, match=r"use --batch_size=1 with a smaller --block_size"):
        memory.check_memory(gpt2, cfg, run)
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 ** 30)  # the model itself does not fit
    with pytest.raises(RuntimeError, match="use a smaller model"):
        memory.check_memory(gpt2, cfg, run)
    memory.check_memory(gpt2, {**cfg, "check_memory": False}, run)  # the escape hatch
    monkeypatch.setattr(memory, "available_memory", lambda device: None)  # unknown: estimate only
    memory.check_memory(gpt2, cfg, run)


def test_memory_estimate_counts_only_trainable_state():
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32)
    cfg = {"batch_size": 2, "block_size": 64, "lora_rank": 4, "lora_targets": ",".join(TARGETS)}
    n = memory.count_trainable(config, cfg)
    assert n == sum(p.numel() for p in apply_lora(GPT(config), lora_settings(cfg)).parameters() if p.requires_grad)
    assert memory.count_trainable(config, {"trainable_layers": 1}) == \
        sum(p.numel() for p in freeze_layers(GPT(config), 1).parameters() if p.requires_grad)
    est = memory.estimate_memory(config, cfg, "float32", trainable=n)
    assert est["gradients"] == 4 * n and est["optimizer"] == 8 * n
