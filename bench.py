"""Benchmarks that print numbers (speed and memory targets live here, not in timed unit tests).

    python bench.py --mode=train --preset=tiny       # training throughput, MFU against the measured peak
    python bench.py --mode=generate                  # generation tokens/s, KV cache on/off, vs transformers (quick)
    python bench.py --mode=generate --gen_preset=full  # the same at GPT-2 124M shape: 32 + 256 tokens, batch 1 and 8

Every run ends with one machine-readable JSON line.
"""
import json
import sys

import configurator

DEFAULTS = dict(
    mode="train",  # train | generate
    preset="tiny",
    device="auto", dtype="auto", seed=1337,
    # --mode=generate: a preset, and overrides of its sizes (0 / None = the preset's)
    gen_preset="quick",  # quick: a tiny model, runs in seconds | full: GPT-2 124M shape, random weights
    gen_prompt_tokens=0, gen_new_tokens=0, gen_batch_sizes=None,  # e.g. --gen_batch_sizes=[1]
    gen_hf=True,  # also time transformers' GPT2LMHeadModel.generate(use_cache=True) on the same weights
)


def bench_train(cfg):
    raise NotImplementedError("training benchmark: issue 5")


# ----------------------------------------------------------------------------------------------------------------
# Generation (issue 4): new tokens/s with and without the KV cache, and transformers' cached generate

GEN_PRESETS = {
    "quick": dict(model=dict(n_layer=2, n_head=2, n_embd=64, vocab_size=50257, block_size=128),
                  prompt_tokens=16, new_tokens=32, batch_sizes=[1, 4]),
    "full": dict(model=dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
                 prompt_tokens=32, new_tokens=256, batch_sizes=[1, 8]),
}


def _gen_setup(cfg):
    """The preset with cfg's overrides applied, and a random-weight model of its shape (seeded)."""
    import torch
    from model import GPT, GPTConfig
    if cfg["gen_preset"] not in GEN_PRESETS:
        raise SystemExit(f"error: unknown --gen_preset={cfg['gen_preset']!r}: use one of {sorted(GEN_PRESETS)}")
    preset = dict(GEN_PRESETS[cfg["gen_preset"]])
    for key in ("prompt_tokens", "new_tokens", "batch_sizes"):
        preset[key] = cfg[f"gen_{key}"] or preset[key]
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**preset["model"], dropout=0.0)).eval()
    return preset, model


def _time_ours(model, prompt, new_tokens, use_cache, device, dtype):
    """Greedy generation of exactly new_tokens tokens; returns (seconds, the tokens (B, new_tokens))."""
    import time
    import torch
    from model import autocast, generate
    _sync(device)
    t0 = time.perf_counter()
    with autocast(device, dtype):
        tokens = torch.stack(list(generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache)), dim=1)
    _sync(device)
    return time.perf_counter() - t0, tokens


def _hf_model(model):
    """transformers' GPT2LMHeadModel holding our weights: same names, Conv1D matmuls stored (in, out)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from model import HF_CONV1D
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5))
    state = {k: v.t() if k.endswith(HF_CONV1D) else v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith(".attn.bias") for k in missing), missing
    return hf.to(next(model.parameters()).device).eval()


def _time_hf(hf, prompt, new_tokens, device):
    import time
    import torch
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    _sync(device)
    return time.perf_counter() - t0, out[:, prompt.size(1):]


def _sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_generate(cfg):
    """Table of new tokens/s per (implementation, batch size); returns the rows for the JSON line."""
    import torch
    from model import resolve_device, resolve_dtype
    device = resolve_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    preset, model = _gen_setup(cfg)
    model.to(device)
    hf = _hf_model(model) if cfg["gen_hf"] and _has_transformers() and dtype == "float32" else None
    n_new, rows = preset["new_tokens"], []
    print(f"generate: preset {cfg['gen_preset']}, {model.get_num_params() / 1e6:.1f}M parameters, device {device}, "
          f"dtype {dtype}, {torch.get_num_threads()} threads, prompt {preset['prompt_tokens']} + {n_new} new tokens")
    print(f"{'implementation':<28}{'batch':>6}{'seconds':>10}{'tokens/s':>11}{'same tokens':>13}")
    for batch in preset["batch_sizes"]:
        prompt = torch.randint(0, model.config.vocab_size, (batch, preset["prompt_tokens"]),
                               generator=torch.Generator().manual_seed(cfg["seed"])).to(device)
        _time_ours(model, prompt, 2, True, device, dtype)  # warm-up: first-call allocations and kernel choice
        reference = None
        runs = [("ours, KV cache", lambda: _time_ours(model, prompt, n_new, True, device, dtype)),
                ("ours, no cache", lambda: _time_ours(model, prompt, n_new, False, device, dtype))]
        if hf is not None:
            _time_hf(hf, prompt, 2, device)
            runs.append(("transformers, use_cache", lambda: _time_hf(hf, prompt, n_new, device)))
        for name, run in runs:
            seconds, tokens = run()
            reference = tokens if reference is None else reference
            same = bool(torch.equal(tokens.cpu(), reference.cpu()))  # greedy: every path gives the same tokens
            rows.append({"impl": name, "batch": batch, "seconds": round(seconds, 3),
                         "tokens_per_s": round(batch * n_new / seconds, 2), "same_tokens": same})
            print(f"{name:<28}{batch:>6}{seconds:>10.2f}{batch * n_new / seconds:>11.1f}{str(same):>13}", flush=True)
    return {"mode": "generate", "preset": cfg["gen_preset"], "device": device, "dtype": dtype,
            "prompt_tokens": preset["prompt_tokens"], "new_tokens": n_new, "rows": rows,
            "speedups": _speedups(rows)}


def _speedups(rows):
    """Per batch size: the KV cache's speed-up over no cache, and over transformers' cached generate."""
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        speed = {r["impl"]: r["tokens_per_s"] for r in rows if r["batch"] == batch}
        cached = speed["ours, KV cache"]
        out[str(batch)] = {"cache_vs_no_cache": round(cached / speed["ours, no cache"], 2)}
        if "transformers, use_cache" in speed:
            out[str(batch)]["cache_vs_transformers"] = round(cached / speed["transformers, use_cache"], 2)
    return out


def _has_transformers():
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="bench.py")
    modes = {"train": bench_train, "generate": bench_generate}
    if cfg["mode"] not in modes:
        raise SystemExit(f"error: unknown --mode={cfg['mode']!r}: use one of {sorted(modes)}")
    result = modes[cfg["mode"]](cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
