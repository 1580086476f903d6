"""The GPU benchmark (tools/gpu_check.sh runs it; docs/gpu.md): bench.py's training and generation
measurements at GPT-2 124M's shape, ours against nanoGPT's CUDA recipe and transformers' generate,
with the targets they are held to.

    python tools/gpu_bench.py --section=train      # 124M shape, block 1024, the largest batch that fits
    python tools/gpu_bench.py --section=generate   # 124M shape, batch 1 and 16, fp32 and bf16
    python tools/gpu_bench.py --device=cpu --preset=tiny --json=bench.json   # the CPU dry run's shapes

Training: `bench.py --mode=train` (benchmarks/train_speed.py) for each recipe in one process: ours
(train.py's train_step in bf16 autocast, torch.compile on CUDA, fused AdamW) and --baseline
(nanoGPT's recipe: on CUDA the same with its full-logits loss). Per recipe a row: ms per step,
tokens/s, MFU against the bf16 matmul peak measured in the same run and against the data sheet's
(chat_gpt2.device.KNOWN_GPU_PEAKS), peak memory, the first steps' time (compiling); --profile: where
our step's time goes, by kernel (auto: when the MFU target is missed). Generation: greedy new
tokens/s of our Engine (benchmarks/generate_speed.py's timing; the weights converted for half
precision as sample.py converts them) and of transformers' generate on the same random weights.

The result is written to --json after each measurement (a run stopped by its time budget keeps what
finished) and printed as one JSON line at the end."""
import copy
import gc
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402  (after sys.path: the repo's modules)

import configurator  # noqa: E402
from benchmarks import train_speed  # noqa: E402
from benchmarks.generate_speed import gen_setup, has_transformers, hf_model, time_hf, time_ours  # noqa: E402
from chat_gpt2.device import available_memory, resolve_device, sync  # noqa: E402
from chat_gpt2.inference import to_half  # noqa: E402
from chat_gpt2.memory import estimate_memory  # noqa: E402

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

# train: benchmarks/train_speed.py's preset keys; generate: benchmarks/generate_speed.py's preset
PRESETS = {
    "124m": dict(train=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=0, steps=10,
                            warmup=3, peak_sizes=(4096, 8192), peak_repeats=3), generate="full"),
    "tiny": dict(train=dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4, steps=3, warmup=1,
                            peak_sizes=(256, 512), peak_repeats=2), generate="quick"),
}
RECIPES = {"ours": False, "nanogpt": True}  # recipe: bench.py --mode=train's --baseline
# the fields of bench.py --mode=train's result a training row keeps
ROW_KEYS = ("dtype", "compile", "n_params", "batch_size", "block_size", "warmup_s", "ms_per_iter", "tokens_per_s",
            "achieved_gflops", "peak_gflops_dtype", "mfu", "known_peak_gflops", "mfu_vs_known_peak",
            "max_memory_allocated_mb", "peak_rss_mb", "loss_last")


def preset(cfg):
    if cfg["preset"] not in PRESETS:
        raise SystemExit(f"error: unknown --preset={cfg['preset']!r}: use one of {sorted(PRESETS)}")
    return PRESETS[cfg["preset"]]


def save(result, path):
    """Write result to path (if any) atomically: a run killed mid-write leaves the previous version."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)


def gpu_name(device):
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None


# ----------------------------------------------------------------------------------------------------------------
# Training


def fill_batch(p, device, fill):
    """The largest power of two (at most 512) whose training-memory estimate in bf16 fits in fill of the free
    memory."""
    config, free, b = train_speed.train_config(p), available_memory(device), 1
    while b < 512 and estimate_memory(config, {"batch_size": 2 * b, "block_size": config.block_size},
                                      "bfloat16")["total"] <= fill * free:
        b *= 2
    return b


def bench_train(cfg, result):
    device, p = cfg["device"], dict(preset(cfg)["train"])
    p["batch_size"] = (cfg["batch_size"] or p["batch_size"]
                       or (fill_batch(p, device, cfg["fill"]) if device.startswith("cuda") else 4))
    out = result["train"] = {"preset": cfg["preset"], "device": device, "gpu": gpu_name(device), "rows": []}
    for recipe in cfg["recipes"].split(","):
        if recipe not in RECIPES:
            raise SystemExit(f"error: unknown recipe {recipe!r}: use ours and/or nanogpt")
        print(f"== {recipe}" + (" (bench.py --mode=train --baseline)" if RECIPES[recipe] else ""), flush=True)
        bench_cfg = {"preset": cfg["preset"], "device": device, "dtype": "bfloat16", "compile": cfg["compile"],
                     "baseline": RECIPES[recipe], "profile": False, "seed": cfg["seed"],
                     "batch_size": 0, "block_size": 0, "steps": cfg["steps"], "warmup": cfg["warmup"]}
        measured, step = train_speed.measure(bench_cfg, p)
        row = {"recipe": recipe, **{k: measured[k] for k in ROW_KEYS}}
        out["rows"].append(row)
        if recipe == "ours" and want_profile(cfg["profile"], row, cfg["mfu_target"]):
            out["profile"] = profile_step(step, device)  # now: the next recipe needs the memory
        del step  # and with it the recipe's model, optimizer state and compiled graph: the next one's memory
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        save(result, cfg["json"])
    if out["rows"] and out["rows"][0]["known_peak_gflops"] is None:
        out["datasheet_note"] = f"no data-sheet peak for {out['gpu'] or device}: MFU against the measured peak only"
        print(f"note: {out['datasheet_note']}")
    out["targets"] = train_targets(out["rows"], cfg["mfu_target"])
    if out["targets"].get("ours_at_least_nanogpt") is False and "profile" not in out:
        out["profile_note"] = "ours is slower than nanoGPT's recipe: --recipes=ours --profile=true profiles it"
    print(f"targets: {out['targets']}" + (f"; {out['profile_note']}" if "profile_note" in out else ""))
    save(result, cfg["json"])


def train_targets(rows, mfu_target):
    """The targets: ours at least nanoGPT's tokens/s, MFU >= mfu_target of the data sheet's peak."""
    by = {r["recipe"]: r for r in rows}
    targets = {}
    if "ours" in by and "nanogpt" in by:
        ratio = by["ours"]["tokens_per_s"] / by["nanogpt"]["tokens_per_s"]
        targets.update(ours_vs_nanogpt=round(ratio, 3), ours_at_least_nanogpt=ratio >= 1.0)
    if "ours" in by and by["ours"]["mfu_vs_known_peak"] is not None:
        targets.update(mfu_vs_datasheet=by["ours"]["mfu_vs_known_peak"],
                       mfu_target_met=by["ours"]["mfu_vs_known_peak"] >= mfu_target)
    return targets


def want_profile(option, row, mfu_target):
    """--profile: true / false, or auto: when our MFU misses mfu_target of the data sheet (or there is none)."""
    value = configurator.parse_bool(str(option))
    if value is not None:
        return value
    return row["mfu_vs_known_peak"] is None or row["mfu_vs_known_peak"] < mfu_target


def profile_step(step, device, steps=3, top=15):
    """The kernels (or CPU ops) that took the most device time over a few steps: what to make faster."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    on_device = device.startswith("cuda")

    def us(e):  # device_time_total in torch >= 2.4 (cuda_time_total before)
        if not on_device:
            return e.self_cpu_time_total
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0
    rows = sorted(events, key=us, reverse=True)
    total = sum(us(e) for e in events if not e.key.startswith("Prof"))
    table = [{"name": e.key[:90], "calls": e.count, "ms_per_step": round(us(e) / 1000 / steps, 3)}
             for e in rows[:top]]
    print(f"profile of our step ({'device' if on_device else 'CPU self'} time per step, top {top}):")
    for r in table:
        print(f"  {r['ms_per_step']:>9.3f} ms  {r['calls']:>6}  {r['name']}")
    return {"steps": steps, "time": "device" if on_device else "cpu_self", "top": table,
            "sum_ms_per_step": round(total / 1000 / steps, 3)}


# ----------------------------------------------------------------------------------------------------------------
# Generation


def bench_generate(cfg, result):
    device = cfg["device"]
    p, model = gen_setup({"gen_preset": preset(cfg)["generate"], "gen_prompt_tokens": cfg["prompt_tokens"],
                          "gen_new_tokens": cfg["new_tokens"], "gen_batch_sizes": cfg["gen_batch_sizes"],
                          "seed": cfg["seed"]})
    model.to(device)
    out = result["generate"] = {"preset": cfg["preset"], "device": device, "gpu": gpu_name(device),
                                "prompt_tokens": p["prompt_tokens"], "new_tokens": p["new_tokens"], "rows": []}
    print(f"generate: {cfg['preset']} shape, device {device}, prompt {p['prompt_tokens']} + {p['new_tokens']} new "
          f"tokens, greedy; ours (Engine) vs transformers' generate on the same weights")
    if not has_transformers():
        out["skipped"] = "transformers is not installed: its generate was not timed"
        print(f"SKIPPED: {out['skipped']}")
    for dtype in cfg["gen_dtypes"].split(","):
        ours = model if dtype == "float32" else to_half(copy.deepcopy(model), dtype, device)
        hf = hf_model(model, dtype) if has_transformers() else None
        for batch in p["batch_sizes"]:
            out["rows"].append(gen_row(ours, hf, dtype, batch, p, cfg["seed"], device))
            save(result, cfg["json"])
        del ours, hf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    out["targets"] = {f"{r['dtype']}_batch{r['batch']}": r.get("ours_vs_transformers") for r in out["rows"]}
    print(f"targets (ours / transformers tokens/s, >= 1 wanted): {out['targets']}")
    save(result, cfg["json"])


def gen_row(model, hf, dtype, batch, p, seed, device):
    """One batch size's row: our greedy tokens/s (the Engine), transformers' and the share of tokens both give."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, p["prompt_tokens"]),
                           generator=torch.Generator().manual_seed(seed)).to(device)
    new = p["new_tokens"]
    time_ours(model, prompt, 4, True, device, dtype)  # warm-up: allocations, kernel choice
    seconds, tokens = time_ours(model, prompt, new, True, device, dtype)
    row = {"dtype": dtype, "batch": batch, "ours_s": round(seconds, 3),
           "ours_tokens_per_s": round(batch * new / seconds, 1)}
    if hf is not None:
        time_hf(hf, prompt, 4, device)
        hf_seconds, hf_tokens = time_hf(hf, prompt, new, device)
        row.update(transformers_s=round(hf_seconds, 3), transformers_tokens_per_s=round(batch * new / hf_seconds, 1),
                   ours_vs_transformers=round(hf_seconds / seconds, 3),
                   same_tokens_as_transformers=round((tokens.cpu() == hf_tokens.cpu()).float().mean().item(), 4))
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
    preset(cfg)
    result = {"torch": torch.__version__, "device": cfg["device"], "preset": cfg["preset"]}
    for name in names:
        sections[name](cfg, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
