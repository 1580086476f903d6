"""--mode=generate: new tokens/s of our decoding with and without the KV cache, with the weights in
half precision or int8, and transformers' cached generate on the same weights; the prompt's forward
pass (prefill) too.

    python bench.py --mode=generate                    # quick: a tiny model, seconds
    python bench.py --mode=generate --gen_preset=full  # GPT-2 124M shape: 32 + 256 tokens, batch 1 and 8
    python bench.py --mode=generate --gen_half=bfloat16,int8   # both converted copies, one run

The Engine is called in one place, greedy_tokens (--mode=half and --mode=sample use it
too).
"""
import copy
import importlib.util
import os
import platform
import time

import torch

from chat_gpt2.device import autocast, resolve_device, resolve_dtype, sync
from chat_gpt2 import chat
from chat_gpt2.engine import Engine, Request
from chat_gpt2.inference import to_half
from chat_gpt2.sampling import SamplingParams
from chat_gpt2.hf_gpt2 import hf_config, hf_state_dict
from model import GPT, GPTConfig

DEFAULTS = dict(  # `python bench.py --help` prints these comments
    # --mode=generate/sample: quick (a tiny model, seconds) | full (GPT-2 124M shape, random)
    gen_preset="quick",
    gen_prompt_tokens=0,  # override the preset's prompt length (0 = the preset's)
    gen_new_tokens=0,  # override the preset's new tokens (0 = the preset's)
    gen_batch_sizes=None,  # override the preset's batch sizes, e.g. [1]
    # also time transformers' GPT2LMHeadModel.generate(use_cache=True) on the same weights
    gen_hf=True,
    # also time our decoding without the KV cache (every step runs the whole sequence: minutes per
    # row at the full preset's 256 tokens)
    gen_no_cache=True,
    # also time our decoding with the weights in this dtype: bfloat16, float16 or int8, several
    # comma-separated ("" = none); --mode=half's dtype
    gen_half="bfloat16",
    # also time one forward pass over a prompt this long (capped at block_size; 0 = no)
    gen_prefill_tokens=256,
)

GEN_PRESETS = {
    "quick": dict(model=dict(n_layer=2, n_head=2, n_embd=64, vocab_size=50257, block_size=128),
                  prompt_tokens=16, new_tokens=32, batch_sizes=[1, 4]),
    "full": dict(model=dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
                 prompt_tokens=32, new_tokens=256, batch_sizes=[1, 8]),
}


def gen_setup(cfg):
    """The preset with cfg's overrides applied, and a random-weight model of its shape (seeded)."""
    if cfg["gen_preset"] not in GEN_PRESETS:
        raise SystemExit(f"error: unknown --gen_preset={cfg['gen_preset']!r}: use one of "
                         f"{sorted(GEN_PRESETS)}")
    preset = dict(GEN_PRESETS[cfg["gen_preset"]])
    for key in ("prompt_tokens", "new_tokens", "batch_sizes"):
        preset[key] = cfg[f"gen_{key}"] or preset[key]
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**preset["model"], dropout=0.0)).eval()
    return preset, model


def half_dtypes(cfg):
    """The dtypes --gen_half names: "bfloat16,int8" (or a list) -> ["bfloat16", "int8"]."""
    value = cfg["gen_half"] or ""
    names = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [name.strip() for name in names if name.strip()]


def greedy_tokens(model, prompt, new_tokens, device="cpu", dtype="float32"):
    """Exactly new_tokens greedy tokens after each row of prompt (B, T), decoded together by the
    Engine (where <|endoftext|> counts as any token): (B, new_tokens)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    requests = [Request(row, params, ignore_eot=True) for row in prompt.tolist()]
    Engine(model, device=device, dtype=dtype).complete(requests)
    return torch.tensor([request.replies[0].tokens for request in requests], device=prompt.device)


@torch.inference_mode()
def _uncached(model, prompt, new_tokens):
    """The baseline the KV cache saves: every step runs the whole sequence again (in block_size)."""
    seq = prompt
    for _ in range(new_tokens):
        logits, _ = model(seq[:, -model.config.block_size:])
        seq = torch.cat([seq, logits[:, -1, :chat.VOCAB_SIZE].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.size(1):]


def time_ours(model, prompt, new_tokens, use_cache, device, dtype):
    """Greedy generation of exactly new_tokens tokens: (seconds, the tokens (B, new_tokens)).
    With the KV cache: the Engine; without: _uncached."""
    sync(device)
    t0 = time.perf_counter()
    if use_cache:
        tokens = greedy_tokens(model, prompt, new_tokens, device, dtype)
    else:
        with autocast(device, dtype):
            tokens = _uncached(model, prompt, new_tokens)
    sync(device)
    return time.perf_counter() - t0, tokens


def hf_model(model, dtype="float32"):
    """transformers' GPT2LMHeadModel holding our weights, converted as an export converts them, on
    the model's device, in dtype."""
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config.from_dict(hf_config(model.config)))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    tied_or_buffers = all(k == "lm_head.weight" or k.endswith(".attn.bias") for k in missing)
    assert not unexpected and tied_or_buffers, (missing, unexpected)
    return hf.to(device=next(model.parameters()).device, dtype=getattr(torch, dtype)).eval()


def time_hf(hf, prompt, new_tokens, device):
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          use_cache=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=0)
    sync(device)
    return time.perf_counter() - t0, out[:, prompt.size(1):]


def bench(cfg):
    """Table of new tokens/s per (implementation, batch size); returns the rows for the JSON line.
    The model runs in --dtype (default fp32 here: the reference), and again with its weights
    converted to each --gen_half dtype."""
    device = resolve_device(cfg["device"])
    dtype = "float32" if cfg["dtype"] == "auto" else resolve_dtype(cfg["dtype"], device)
    preset, model = gen_setup(cfg)
    model.to(device)
    halves = {name: to_half(copy.deepcopy(model), name, device) for name in half_dtypes(cfg)}
    hf = hf_model(model) if cfg["gen_hf"] and has_transformers() and dtype == "float32" else None
    n_new, rows = preset["new_tokens"], []
    print(f"generate: preset {cfg['gen_preset']}, {model.get_num_params() / 1e6:.1f}M parameters, "
          f"device {device}, dtype {dtype}, {torch.get_num_threads()} threads, prompt "
          f"{preset['prompt_tokens']} + {n_new} new tokens")
    print(f"{'implementation':<34}{'batch':>6}{'seconds':>10}{'tokens/s':>11}{'same tokens':>13}")
    for batch in preset["batch_sizes"]:
        prompt = torch.randint(0, model.config.vocab_size, (batch, preset["prompt_tokens"]),
                               generator=torch.Generator().manual_seed(cfg["seed"])).to(device)
        # warm-up: first-call allocations and kernel choice
        time_ours(model, prompt, 2, True, device, dtype)
        reference = None
        runs = [("ours, KV cache", lambda: time_ours(model, prompt, n_new, True, device, dtype))]
        if cfg["gen_no_cache"]:
            runs.append(("ours, no cache",
                         lambda: time_ours(model, prompt, n_new, False, device, dtype)))
        for name, half in halves.items():
            time_ours(half, prompt, 2, True, device, "float32")
            runs.append((f"ours, KV cache, {name}",
                         lambda half=half: time_ours(half, prompt, n_new, True, device, "float32")))
        if hf is not None:
            time_hf(hf, prompt, 2, device)
            runs.append(("transformers, use_cache", lambda: time_hf(hf, prompt, n_new, device)))
        for name, run in runs:
            seconds, tokens = run()
            reference = tokens if reference is None else reference
            # greedy fp32 paths: all the same
            same = (tokens.cpu() == reference.cpu()).float().mean().item()
            speed = batch * n_new / seconds
            rows.append({"impl": name, "batch": batch, "seconds": round(seconds, 3),
                         "tokens_per_s": round(speed, 2), "same_tokens": same == 1.0,
                         "same_token_share": round(same, 4)})
            print(f"{name:<34}{batch:>6}{seconds:>10.2f}{speed:>11.1f}{same:>13.1%}", flush=True)
    cached = {"ours, KV cache": model, **{f"ours, KV cache, {name}": half
                                          for name, half in halves.items()}}
    read_bound = _read_bound(rows, cached, device)
    prefill = _time_prefill(model, halves, cfg, device, dtype)
    return {"mode": "generate", "preset": cfg["gen_preset"], "device": device, "dtype": dtype,
            "prompt_tokens": preset["prompt_tokens"], "new_tokens": n_new, "rows": rows,
            "speedups": _speedups(rows), "prefill": prefill, "read_bound": read_bound,
            **machine()}


def machine():
    """The CPU model, threads and 1-minute load average: what a figure on a shared machine needs."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"cpu": model, "threads": torch.get_num_threads(), "load_avg_1min": load}


def weight_bytes(model):
    """Bytes of the matmul weights a decoding step reads: each Linear's weight, bias and int8
    scales, the tied head once (its embedding rows are a few lookups)."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for t in (module.weight, module.bias, getattr(module, "scales", None)):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def read_rate(device, megabytes=256):
    """Bytes/s of summing a megabytes-sized fp32 tensor on device (the best of 3 after a warm-up):
    the memory-read rate a decoding step's weight reads run against, measured in the same run."""
    data = torch.ones(megabytes * 2 ** 18, device=device)
    fastest = float("inf")
    for _ in range(4):
        sync(device)
        t0 = time.perf_counter()
        data.sum()
        sync(device)
        fastest = min(fastest, time.perf_counter() - t0)
    return data.numel() * 4 / fastest


def _read_bound(rows, models, device):
    """Each cached decoding row's weight bytes per step and the share of the memory-read bound it
    reached (a step reads every weight once, for the whole batch: bound = batch * rate / bytes)."""
    rate, sizes = read_rate(device), {name: weight_bytes(m) for name, m in models.items()}
    for row in rows:
        if row["impl"] in sizes:
            bound = row["batch"] * rate / sizes[row["impl"]]
            row["weight_mb_per_step"] = round(sizes[row["impl"]] / 1e6, 1)
            row["read_bound_share"] = round(row["tokens_per_s"] / bound, 3)
    print(f"memory read rate {rate / 1e9:.1f} GB/s; weight MB per step, share of the read bound: "
          + ", ".join(f"{r['impl']} batch {r['batch']}: {r['weight_mb_per_step']} MB, "
                      f"{r['read_bound_share']:.0%}" for r in rows if r["impl"] in sizes))
    return {"read_gb_per_s": round(rate / 1e9, 2)}


@torch.no_grad()
def _time_prefill(model, halves, cfg, device, dtype):
    """Prompt tokens/s of one forward pass over a gen_prefill_tokens prompt (batch 1; the best of 2,
    after a warm-up), ours in dtype and with the weights in each gen_half dtype (halves: dtype ->
    converted model): the compute-bound side of generation."""
    n = min(cfg["gen_prefill_tokens"], model.config.block_size)
    if n <= 0:
        return {}
    prompt = torch.randint(0, model.config.vocab_size, (1, n),
                           generator=torch.Generator().manual_seed(cfg["seed"]))
    speeds = {}
    models = [(dtype, model, dtype)] + [(f"{name} weights", half, "float32")
                                        for name, half in halves.items()]
    for name, m, run_dtype in models:
        seconds = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            with autocast(device, run_dtype):
                m(prompt.to(device))
            sync(device)
            seconds.append(time.perf_counter() - t0)
        speeds[name] = round(n / min(seconds[1:]), 1)
    print(f"prompt of {n} tokens (prefill), tokens/s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items()))
    return {"tokens": n, "tokens_per_s": speeds}


def _speedups(rows):
    """Per batch size: the KV cache's speed-up over no cache and over transformers' generate, and
    each converted copy's ({dtype}_vs_fp32, {dtype}_vs_transformers; half_vs_*: the first's)."""
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        speed = {r["impl"]: r["tokens_per_s"] for r in rows if r["batch"] == batch}
        cached, hf = speed["ours, KV cache"], speed.get("transformers, use_cache")
        row = out[str(batch)] = {}
        if "ours, no cache" in speed:
            row["cache_vs_no_cache"] = round(cached / speed["ours, no cache"], 2)
        for name, value in speed.items():
            if name == "transformers, use_cache":
                row["cache_vs_transformers"] = round(cached / value, 2)
            elif name.startswith("ours, KV cache, "):
                half = name[len("ours, KV cache, "):]
                row[f"{half}_vs_fp32"] = round(value / cached, 2)
                if hf:
                    row[f"{half}_vs_transformers"] = round(value / hf, 2)
                if "half_vs_fp32" not in row:  # the first --gen_half, under the names kept for it
                    row["half_vs_fp32"] = row[f"{half}_vs_fp32"]
                    if hf:
                        row["half_vs_transformers"] = row[f"{half}_vs_transformers"]
    return out


def has_transformers():
    return importlib.util.find_spec("transformers") is not None
