"""Tiny random-weight models and checkpoints for the generation, eval and interactive tests (issue 4)."""
from dataclasses import asdict

import torch

from chat_gpt2 import chat
from chat_gpt2.checkpoint import save_checkpoint
from chat_gpt2.model import GPT, GPTConfig


def tiny_model(seed=0, block_size=64, n_layer=2, n_head=2, n_embd=32, vocab_size=50304, **overrides):
    """A small GPT with random weights, in eval mode. The residual projections are scaled up: with GPT-2's init a
    random model mostly repeats the token it was fed (tied embeddings), and tests of cached vs uncached generation
    need outputs that depend on the whole context."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          vocab_size=vocab_size, dropout=0.0, **overrides))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.mul_(10.0)
            block.mlp.c_proj.weight.mul_(10.0)
    return model.eval()


def save_tiny_checkpoint(path, model=None, default_stop=chat.NEWLINE_STOP):
    """A checkpoint with the keys sample.py / eval.py read (as train.py writes them). Returns the path."""
    model = model or tiny_model()
    save_checkpoint(str(path), {"model": model.state_dict(), "model_args": asdict(model.config),
                                "template": chat.TEMPLATE, "tokenizer": chat.TOKENIZER,
                                "default_stop": default_stop, "multiline_replies": default_stop != "\n"})
    return str(path)
