"""Tiny Hugging Face GPT-2 checkpoints for the pretrained-loading and export tests (issue 3). Needs transformers
(requirements-dev.txt); nothing here touches the network."""
import torch

from chat_gpt2 import chat

TINY_HF = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64)


def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this process and its subprocesses (huggingface_hub reads it at import, hence both)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def tiny_hf_model(seed=0, **config):
    """A random transformers GPT2LMHeadModel (fp32, eval mode). Every weight is perturbed, so zero-initialised biases
    and unit LayerNorm weights take part in the comparison too."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=chat.VOCAB_SIZE, **{**TINY_HF, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_hf(model, path, **kwargs):
    model.save_pretrained(str(path), **kwargs)
    return str(path)


def random_tokens(T, B=2, seed=1):
    return torch.randint(0, chat.VOCAB_SIZE, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_diff(ours, hf, T, seed=1):
    """Max abs difference of all positions' logits, our GPT vs a transformers model, on random tokens."""
    idx = random_tokens(T, seed=seed)
    a = ours(idx, all_logits=True)[0][..., :chat.VOCAB_SIZE]
    return (a - hf(idx).logits).abs().max().item()
