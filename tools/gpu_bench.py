"""The GPU benchmark (tools/gpu_check.sh runs it; docs/gpu.md): training at GPT-2 124M's shape, ours against
nanoGPT's CUDA recipe, and generation, ours against transformers' generate.

    python tools/gpu_bench.py --section=train      # 124M shape, block 1024, the largest batch that fits the GPU
    python tools/gpu_bench.py --section=generate   # 124M shape, batch 1 and 16, fp32 and bf16, vs transformers
    python tools/gpu_bench.py --device=cpu --preset=tiny --json=bench.json   # the CPU dry run's shapes

Training runs train.py's own train_step (chat_gpt2.training) on random tokens, every position learned, in bf16
autocast with torch.compile (on CUDA, as train.py) and fused AdamW. nanoGPT's CUDA recipe is the same model, data
and step with nanoGPT's loss: F.cross_entropy over the full fp32 logits. Per recipe: ms per step (median),
tokens/s, MFU against the data sheet's dense bf16 peak (chat_gpt2.device.KNOWN_GPU_PEAKS) and against the bf16
matmul peak measured in the same run, peak memory, and the first steps' time (compiling). --profile: where our
step's time goes, by kernel (auto: when the MFU target is missed). Generation: greedy new tokens/s of our Engine (the
Decoder behind sample.py and serve.py) and of transformers' GPT2LMHeadModel.generate on the same random weights,
per batch size and dtype.

The result is written to --json after each measurement (a run stopped by its time budget keeps what finished)
and printed as one JSON line at the end."""
import copy
import json
import os
import resource
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402  (after sys.path: the repo's modules)
import torch.nn.functional as F  # noqa: E402

import configurator  # noqa: E402
from chat_gpt2 import chat  # noqa: E402
from chat_gpt2.device import (available_memory, known_peak_flops, measure_matmul_peak,  # noqa: E402
                              resolve_compile, resolve_device, sync)
from chat_gpt2.engine import Engine, SamplingParams, to_half  # noqa: E402
from chat_gpt2.hf_gpt2 import hf_config, hf_state_dict  # noqa: E402
from chat_gpt2.memory import estimate_memory  # noqa: E402
from chat_gpt2.training import DEFAULT_GRAD_CLIP, train_step  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

DEFAULTS = dict(  # `python tools/gpu_bench.py --help` prints these comments
    section="all",  # train | generate | all
    device="cuda",  # cuda, cuda:N, or cpu (a dry run)
    preset="124m",  # 124m (GPT-2 124M shape, block 1024) | tiny (seconds: the CPU dry run)
    batch_size=0,  # training: sequences per step; 0 = the largest power of two whose estimate fits in fill
    fill=0.5,  # training: the share of the free device memory the batch may take (chat_gpt2.memory's estimate)
    steps=0,  # training: timed steps (0 = the preset's)
    warmup=0,  # training: untimed first steps, where torch.compile compiles (0 = the preset's)
    recipes="ours,nanogpt",  # training: which recipes, in this order
    compile=None,  # training: torch.compile, as train.py's --compile (None: on for CUDA, off on the CPU)
    profile="auto",  # training: by-kernel profile of our step: auto (when our MFU misses mfu_target), true, false
    mfu_target=0.45,  # training: the MFU (of the data sheet's bf16 peak) the profile is taken below
    gen_batch_sizes=[1, 16],  # generation: batch sizes
    gen_dtypes="float32,bfloat16",  # generation: dtypes (ours: weights converted, GPT.to_half; transformers: .to)
    prompt_tokens=0,  # generation: prompt length (0 = the preset's)
    new_tokens=0,  # generation: new tokens per row (0 = the preset's)
    seed=1337,  # the random weights and tokens
    json="",  # also write the result to this file, after every measurement
)

PRESETS = {
    "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=0, steps=10, warmup=3,
                 peak_sizes=(4096, 8192), peak_repeats=3, prompt_tokens=32, new_tokens=256),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4, steps=3, warmup=1,
                 peak_sizes=(256, 512), peak_repeats=2, prompt_tokens=8, new_tokens=16),
}


def settings(cfg):
    """The preset with cfg's overrides."""
    if cfg["preset"] not in PRESETS:
        raise SystemExit(f"error: unknown --preset={cfg['preset']!r}: use one of {sorted(PRESETS)}")
    p = dict(PRESETS[cfg["preset"]])
    p.update({k: cfg[k] for k in ("batch_size", "steps", "warmup", "prompt_tokens", "new_tokens") if cfg[k]})
    return p


def save(result, path):
    """Write result to path (if any) atomically: a run killed mid-write leaves the previous version."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10, 1)  # the process's peak RSS


# ----------------------------------------------------------------------------------------------------------------
# Training


class RandomTokens:
    """Uniform random tokens, every position learned: the LM head runs on every position, as in nanoGPT, so the
    FLOP count 6N + 12LHQT is the work done. (As bench.py's; both should take it from one module.)"""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def get_batch(self, batch_size, block_size, generator):
        seq = torch.randint(self.vocab_size, (batch_size, block_size + 1), generator=generator)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), torch.ones(batch_size, block_size)


def train_config(p):
    return GPTConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], block_size=p["block_size"],
                     vocab_size=50304, bias=False, dropout=0.0)


def fill_batch(config, device, fill):
    """The largest power of two (at most 512) whose training-memory estimate in bf16 fits in fill of the free
    memory."""
    free, b = available_memory(device), 1
    while b < 512 and estimate_memory(config, {"batch_size": 2 * b, "block_size": config.block_size},
                                      "bfloat16")["total"] <= fill * free:
        b *= 2
    return b


def full_logits_loss(self, x, targets, loss_mask):
    """nanoGPT's loss: F.cross_entropy over every position's fp32 logits (every position is learned here)."""
    return F.cross_entropy(self.lm_head(x).float(), targets, ignore_index=-1)


def recipe_step(recipe, p, device, compile_it):
    """(model, the compiled module, optimizer, step()) of one recipe: ours, or nanoGPT's (its loss)."""
    torch.manual_seed(0)
    model = GPT(train_config(p)).to(device)
    if recipe == "nanogpt":
        model._masked_loss = types.MethodType(full_logits_loss, model)
    elif recipe != "ours":
        raise SystemExit(f"error: unknown recipe {recipe!r}: use ours and/or nanogpt")
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.split(":")[0])  # fused AdamW
    run = {"device": device, "dtype": "bfloat16", "ddp": False}
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=False)  # bf16: no scaling
    step_cfg = {"gradient_accumulation_steps": 1, "batch_size": p["batch_size"], "block_size": p["block_size"],
                "grad_clip": DEFAULT_GRAD_CLIP}
    compiled = torch.compile(model) if compile_it else model
    data, gen = RandomTokens(model.config.vocab_size), torch.Generator().manual_seed(0)

    def step():
        return train_step(compiled, optimizer, scaler, data, gen, step_cfg, run)
    return model, compiled, optimizer, step


def time_steps(step, n, device):
    """Wall seconds of each of n steps (a device sync after each) and the last loss."""
    times, loss = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, float(loss)


def bench_recipe(recipe, p, device, peaks, compile_it):
    """One recipe's row: compile (first steps), then the timed steps. Returns (row, the step function)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = recipe == "nanogpt"  # as nanoGPT's train.py (fp32 matmuls: few here)
    try:
        model, _, _, step = recipe_step(recipe, p, device, compile_it)
        warm, _ = time_steps(step, p["warmup"], device)
        times, loss = time_steps(step, p["steps"], device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    tokens = p["batch_size"] * p["block_size"]
    median = statistics.median(times)
    achieved = model.flops_per_token(p["block_size"]) * tokens / median
    row = {"recipe": recipe, "n_params": model.get_num_params(), "batch_size": p["batch_size"],
           "block_size": p["block_size"],
           "first_steps_s": round(sum(warm), 1), "ms_per_step": round(median * 1000, 2),
           "ms_per_step_best": round(min(times) * 1000, 2), "tokens_per_s": round(tokens / median),
           "achieved_tflops": round(achieved / 1e12, 2),
           "mfu_vs_measured_peak": round(achieved / peaks["measured"], 4),
           "mfu_vs_datasheet": round(achieved / peaks["datasheet"], 4) if peaks["datasheet"] else None,
           "peak_memory_mb": peak_memory_mb(device), "loss_last": round(loss, 4)}
    print(f"  {recipe:<8} batch {p['batch_size']} x {p['block_size']}: {row['ms_per_step']:.1f} ms/step, "
          f"{row['tokens_per_s']:,} tokens/s, {row['achieved_tflops']:.1f} TFLOP/s, MFU "
          f"{row['mfu_vs_measured_peak']:.1%} of the measured peak"
          + (f", {row['mfu_vs_datasheet']:.1%} of the data sheet" if peaks["datasheet"] else "")
          + f", peak memory {row['peak_memory_mb']:,.0f} MB, first {p['warmup']} steps {row['first_steps_s']} s",
          flush=True)
    return row, step


def bench_train(cfg, result):
    p, device = settings(cfg), cfg["device"]
    config = train_config(p)
    if not p["batch_size"]:
        p["batch_size"] = fill_batch(config, device, cfg["fill"]) if device.startswith("cuda") else 4
    datasheet = known_peak_flops(device, "bfloat16")
    peaks = {"measured": measure_matmul_peak(device, "bfloat16", p["peak_sizes"], p["peak_repeats"]),
             "datasheet": datasheet}
    out = result["train"] = {"preset": cfg["preset"], "device": device, "gpu": gpu_name(device),
                             "dtype": "bfloat16", "compile": resolve_compile(cfg["compile"], device),
                             "measured_bf16_peak_tflops": round(peaks["measured"] / 1e12, 1),
                             "datasheet_bf16_peak_tflops": round(datasheet / 1e12, 1) if datasheet else None,
                             "rows": []}
    if not datasheet:
        out["datasheet_note"] = f"no data-sheet peak for {out['gpu'] or device}: MFU against the measured peak only"
        print(f"note: {out['datasheet_note']}")
    print(f"train: {cfg['preset']} shape {p['n_layer']}x{p['n_head']}x{p['n_embd']}, block {p['block_size']}, "
          f"device {device} ({out['gpu']}), bf16 autocast, compile {out['compile']}, fused AdamW; bf16 matmul peak "
          f"measured {out['measured_bf16_peak_tflops']} TFLOP/s, data sheet {out['datasheet_bf16_peak_tflops']}")
    for recipe in cfg["recipes"].split(","):
        row, step = bench_recipe(recipe, p, device, peaks, out["compile"])
        out["rows"].append(row)
        if recipe == "ours" and want_profile(cfg["profile"], row, cfg["mfu_target"]):
            out["profile"] = profile_step(step, device)  # now: the next recipe needs the memory
        del step
        save(result, cfg["json"])
    out["targets"] = train_targets(out["rows"], cfg["mfu_target"])
    if out["targets"].get("ours_at_least_nanogpt") is False and "profile" not in out:
        out["profile_note"] = "ours is slower than nanoGPT's recipe: --recipes=ours --profile=true profiles it"
    print(f"targets: {out['targets']}" + (f"; {out['profile_note']}" if "profile_note" in out else ""))
    save(result, cfg["json"])


def gpu_name(device):
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None


def train_targets(rows, mfu_target):
    """The issue's targets: ours at least nanoGPT's tokens/s, MFU >= mfu_target of the data sheet's peak."""
    by = {r["recipe"]: r for r in rows}
    targets = {}
    if "ours" in by and "nanogpt" in by:
        ratio = by["ours"]["tokens_per_s"] / by["nanogpt"]["tokens_per_s"]
        targets.update(ours_vs_nanogpt=round(ratio, 3), ours_at_least_nanogpt=ratio >= 1.0)
    if "ours" in by and by["ours"]["mfu_vs_datasheet"] is not None:
        targets.update(mfu_vs_datasheet=by["ours"]["mfu_vs_datasheet"],
                       mfu_target_met=by["ours"]["mfu_vs_datasheet"] >= mfu_target)
    return targets


def want_profile(option, row, mfu_target):
    """--profile: true / false, or auto: when our MFU misses mfu_target of the data sheet (or there is none)."""
    value = configurator.parse_bool(str(option))
    if value is not None:
        return value
    return row["mfu_vs_datasheet"] is None or row["mfu_vs_datasheet"] < mfu_target


def profile_step(step, device, steps=3, top=15):
    """The kernels (or CPU ops) that took the most device time over a few steps: what to make faster."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()

    def device_us(e):  # device_time_total in torch >= 2.4 (cuda_time_total before)
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0
    on_device = device.startswith("cuda")
    rows = sorted(events, key=lambda e: device_us(e) if on_device else e.self_cpu_time_total, reverse=True)
    total = sum(device_us(e) if on_device else e.self_cpu_time_total for e in events
                if not e.key.startswith("Prof"))
    table = [{"name": e.key[:90], "calls": e.count,
              "ms_per_step": round((device_us(e) if on_device else e.self_cpu_time_total) / 1000 / steps, 3)}
             for e in rows[:top]]
    print(f"profile of our step ({'device' if on_device else 'CPU self'} time per step, top {top}):")
    for r in table:
        print(f"  {r['ms_per_step']:>9.3f} ms  {r['calls']:>6}  {r['name']}")
    return {"steps": steps, "time": "device" if on_device else "cpu_self", "top": table,
            "sum_ms_per_step": round(total / 1000 / steps, 3)}


# ----------------------------------------------------------------------------------------------------------------
# Generation


def gen_model(p, seed):
    """A random-weight GPT of the preset's shape with GPT-2's vocabulary (what transformers' GPT-2 holds)."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], block_size=p["block_size"],
                         vocab_size=chat.VOCAB_SIZE, dropout=0.0)).eval()


def ours(model, dtype, device):
    """Our Engine as sample.py builds it: the weights converted for half precision (GPT.to_half)."""
    m = copy.deepcopy(model).to(device)
    if dtype != "float32":
        to_half(m, dtype, device)
    return Engine(m, device=device, dtype=dtype)


def run_ours(engine, prompts, new_tokens):
    """(seconds, each row's new tokens) of greedy replies to prompts decoded as one batch."""
    sync(engine.device)
    t0 = time.perf_counter()
    replies = engine.complete_batch(prompts, SamplingParams(temperature=0.0, max_new_tokens=new_tokens, stop=()))
    sync(engine.device)
    seconds = time.perf_counter() - t0
    return seconds, [r.tokens + ([chat.EOT] if r.finish_reason == "stop" else []) for r in replies]


def transformers_model(model, dtype, device):
    """transformers' GPT2LMHeadModel holding our weights (converted as export.py converts them), or None and why
    not."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        return None, f"transformers is not installed ({e}): its generate was not timed"
    hf = GPT2LMHeadModel(GPT2Config.from_dict(hf_config(model.config)))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith(".attn.bias") for k in missing), missing
    return hf.to(device=device, dtype=getattr(torch, dtype)).eval(), None


def run_hf(hf, prompts, new_tokens, device):
    idx = torch.tensor(prompts, device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, use_cache=True,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=chat.EOT)
    sync(device)
    return time.perf_counter() - t0, out[:, idx.size(1):].tolist()


def same_share(a, b):
    """The share of positions where two lists of rows hold the same token (over each pair's common length)."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return round(sum(x == y for x, y in pairs) / max(1, len(pairs)), 4)


def bench_generate(cfg, result):
    p, device = settings(cfg), cfg["device"]
    model = gen_model(p, cfg["seed"])
    out = result["generate"] = {"preset": cfg["preset"], "device": device, "gpu": gpu_name(device),
                                "prompt_tokens": p["prompt_tokens"], "new_tokens": p["new_tokens"], "rows": []}
    print(f"generate: {cfg['preset']} shape, device {device}, prompt {p['prompt_tokens']} + {p['new_tokens']} new "
          f"tokens, greedy; ours (Engine) vs transformers' generate on the same weights")
    for dtype in cfg["gen_dtypes"].split(","):
        engine = ours(model, dtype, device)
        hf, why_not = transformers_model(model, dtype, device)
        if why_not:
            out["skipped"] = why_not
            print(f"SKIPPED: {why_not}")
        for batch in cfg["gen_batch_sizes"]:
            out["rows"].append(gen_row(engine, hf, dtype, batch, p, cfg["seed"], device))
            save(result, cfg["json"])
        del engine, hf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    out["targets"] = {f"{r['dtype']}_batch{r['batch']}": r.get("ours_vs_transformers") for r in out["rows"]}
    print(f"targets (ours / transformers tokens/s, >= 1 wanted): {out['targets']}")
    save(result, cfg["json"])


def gen_row(engine, hf, dtype, batch, p, seed, device):
    prompts = torch.randint(0, chat.VOCAB_SIZE, (batch, p["prompt_tokens"]),
                            generator=torch.Generator().manual_seed(seed)).tolist()
    new = p["new_tokens"]
    run_ours(engine, prompts, 4)  # warm-up: allocations, kernel choice
    seconds, tokens = run_ours(engine, prompts, new)
    row = {"dtype": dtype, "batch": batch, "ours_s": round(seconds, 3),
           "ours_tokens_per_s": round(sum(map(len, tokens)) / seconds, 1)}
    if hf is not None:
        run_hf(hf, prompts, 4, device)
        hf_seconds, hf_tokens = run_hf(hf, prompts, new, device)
        row.update(transformers_s=round(hf_seconds, 3), transformers_tokens_per_s=round(batch * new / hf_seconds, 1),
                   ours_vs_transformers=round(row["ours_tokens_per_s"] / (batch * new / hf_seconds), 3),
                   same_tokens_as_transformers=same_share(tokens, hf_tokens))
    print(f"  {dtype:<9} batch {batch:>3}: ours {row['ours_tokens_per_s']:>9,.1f} tokens/s"
          + (f", transformers {row['transformers_tokens_per_s']:>9,.1f} tokens/s, ratio "
             f"{row['ours_vs_transformers']:.2f}, same tokens {row['same_tokens_as_transformers']:.1%}"
             if hf is not None else ""), flush=True)
    return row


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="tools/gpu_bench.py")
    cfg["device"] = resolve_device(cfg["device"])
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda but torch.cuda.is_available() is False (--device=cpu: a dry run)")
    sections = {"train": bench_train, "generate": bench_generate}
    names = list(sections) if cfg["section"] == "all" else cfg["section"].split(",")
    if any(n not in sections for n in names):
        raise SystemExit(f"error: unknown --section={cfg['section']!r}: use train, generate or all")
    result = {"torch": torch.__version__, "device": cfg["device"], "preset": cfg["preset"]}
    for name in names:
        sections[name](cfg, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
