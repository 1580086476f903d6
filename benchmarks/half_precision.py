"""--mode=half: a trained model in fp32 and with its weights in --gen_half (engine.to_half): how
many greedy tokens agree, and the val loss / perplexity of each.

    python bench.py --mode=half --ckpt=out/finetuned_X.pt --dataset=data/chat   # bf16 vs fp32: same tokens?
"""
import copy
import math

import torch

from benchmarks.generate_speed import greedy_tokens
from chat_gpt2 import chat
from chat_gpt2.checkpoint import load_model
from chat_gpt2.dataset import load_dataset
from chat_gpt2.device import resolve_device
from chat_gpt2.inference import to_half
from chat_gpt2.errors import ConfigError
from chat_gpt2.evaluation import val_loss

DEFAULTS = dict(  # `python bench.py --help` prints these comments (the half dtype: --gen_half)
    ckpt="",  # --mode=half: a trained checkpoint
    dataset="",  # --mode=half: its prepared dataset (prompts and val perplexity)
    half_prompts=20,  # --mode=half: prompts, taken evenly over the val split
    half_new_tokens=64,  # --mode=half: greedy tokens per prompt
)

def bench(cfg):
    """A trained model in fp32 and with its weights in gen_half (GPT.to_half): the share of greedy
    tokens that agree (prompts of 32 tokens taken evenly over the val split, half_new_tokens each; a
    row that flips once then continues from a different text, so also the step of each row's first
    difference, and the share of steps where both pick the same token after fp32's own tokens), and
    the val loss / perplexity of each."""
    if not cfg["ckpt"] or not cfg["dataset"]:
        raise ConfigError("--mode=half needs --ckpt=PATH (a trained checkpoint) and --dataset=DIR "
                          "(its data)")
    device = resolve_device(cfg["device"])
    model, _ = load_model(ckpt=cfg["ckpt"], device=device)
    half = to_half(copy.deepcopy(model), cfg["gen_half"], device)
    val = load_dataset(cfg["dataset"])[0]["val"]
    starts = torch.linspace(0, max(0, len(val.ids) - 33), cfg["half_prompts"]).long().tolist()
    prompts = torch.stack([torch.from_numpy(val.ids[s:s + 32].astype("int64")) for s in starts])
    prompts = prompts.to(device)
    tokens = [greedy_tokens(m, prompts, cfg["half_new_tokens"], device) for m in (model, half)]
    agree = (tokens[0] == tokens[1]).float().mean().item()
    differ = tokens[0] != tokens[1]
    first = [int(row.nonzero()[0]) if row.any() else None for row in differ]
    forced = _same_next_tokens(model, half, torch.cat([prompts, tokens[0]], dim=1), prompts.size(1))
    losses = [val_loss(m, cfg["dataset"], 16, device, dtype)[0]  # as eval.py --dtype runs them
              for m, dtype in ((model, "float32"), (half, cfg["gen_half"]))]
    ppl = [math.exp(loss) for loss in losses]
    result = {"mode": "half", "ckpt": cfg["ckpt"], "half": cfg["gen_half"], "prompts": len(starts),
              "new_tokens": cfg["half_new_tokens"], "same_token_share": round(agree, 4),
              "first_difference": first, "same_next_token_share": round(forced, 4),
              "val_loss_fp32": round(losses[0], 5), "val_loss_half": round(losses[1], 5),
              "perplexity_fp32": round(ppl[0], 4), "perplexity_half": round(ppl[1], 4),
              "perplexity_change": round(ppl[1] / ppl[0] - 1, 5)}
    print(f"greedy tokens, {cfg['gen_half']} vs fp32: {agree:.1%} the same over {len(starts)} "
          f"prompts x {cfg['half_new_tokens']} tokens; val perplexity {ppl[0]:.4f} (fp32) vs "
          f"{ppl[1]:.4f} ({result['perplexity_change']:+.3%})")
    print(f"  rows that differ: {sum(f is not None for f in first)} of {len(first)}, first at "
          f"steps {sorted(f for f in first if f is not None)}; the same next token after fp32's "
          f"tokens: {forced:.2%}")
    return result


@torch.no_grad()
def _same_next_tokens(model, half, seq, prompt_len):
    """The share of steps after prompt_len at which both models' greedy next token is the same,
    given seq (each step sees at most the last block_size tokens)."""
    same = []
    for end in range(prompt_len, seq.size(1)):
        window = seq[:, max(0, end - model.config.block_size):end]
        picks = [m(window)[0][:, -1, :chat.VOCAB_SIZE].argmax(-1) for m in (model, half)]
        same.append(picks[0] == picks[1])
    return torch.stack(same).float().mean().item()
