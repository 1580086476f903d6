"""--mode=sample: sample.py end to end as a user runs it, fp32 and half precision, against
transformers' generate.

    python bench.py --mode=sample --gen_preset=full  # sample.py end to end, fp32 and bf16, vs transformers (124M)
"""
import copy
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.generate_speed import (gen_setup, greedy_tokens, half_dtypes, has_transformers, hf_model,
                                       time_hf)
from chat_gpt2 import chat
from chat_gpt2.checkpoint import save_checkpoint
from chat_gpt2.device import resolve_device
from chat_gpt2.inference import to_half
from chat_gpt2.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python bench.py --help` prints these comments (the model and tokens: the --gen_ keys)
DEFAULTS = dict(
    # --mode=sample: the short run's new tokens (the long run's: the --gen_preset's new_tokens)
    sample_short=16,
    sample_runs=2,  # --mode=sample: runs of each sample.py process, alternately; the fastest counts
)

SAMPLE_PROMPT = ("The old lighthouse keeper climbed the winding stairs every evening at dusk, "
                 "carrying a lantern, a flask of tea and a notebook in which he wrote down the "
                 "ships that passed the rocks below.")


def bench(cfg):
    """sample.py as a user runs it (process start, imports, checkpoint load, prompt, decoding) on a
    random-weight model of the preset's shape, in fp32 and each --dtype=gen_half, batch 1, greedy. A
    token's time is (seconds for the preset's new_tokens - seconds for sample_short) / their
    difference: the start-up cancels out. Each process runs sample_runs times, alternately, the
    fastest counting. Against transformers' generate (fp32, in this process, after a warm-up) on the
    same weights."""
    device = resolve_device(cfg["device"])
    preset, model = gen_setup(cfg)
    short, long = cfg["sample_short"], preset["new_tokens"]
    enc = chat.get_encoder()
    prompt = torch.tensor([enc.encode(SAMPLE_PROMPT)[:preset["prompt_tokens"]]])
    text = enc.decode(prompt[0].tolist())
    dtypes = ["float32"] + half_dtypes(cfg)
    _check_no_early_end(model, prompt, long, dtypes)
    print(f"sample: preset {cfg['gen_preset']}, {model.get_num_params() / 1e6:.1f}M parameters, "
          f"device {device}, {os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())} threads, "
          f"prompt {prompt.size(1)} tokens, {short} vs {long} new tokens, best of "
          f"{cfg['sample_runs']}, load avg {os.getloadavg()[0]:.2f}")
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "random.pt")
        config = dataclasses.asdict(model.config)
        save_checkpoint(ckpt, {"model": model.state_dict(), "model_args": config,
                               "template": chat.TEMPLATE, "tokenizer": chat.TOKENIZER,
                               "default_stop": None, "multiline_replies": False})
        for _ in range(cfg["sample_runs"]):
            for dtype in dtypes:
                for n in (short, long):
                    t = _time_sample(ckpt, text, n, dtype, device)
                    seconds[dtype, n] = min(seconds.get((dtype, n), t), t)
    # long - short
    extra = {dtype: seconds[dtype, long] - seconds[dtype, short] for dtype in dtypes}
    rows = [{"impl": f"sample.py --dtype={dtype}", "seconds_short": round(seconds[dtype, short], 3),
             "seconds_long": round(seconds[dtype, long], 3),
             "tokens_per_s": round((long - short) / extra[dtype], 2)} for dtype in dtypes]
    if cfg["gen_hf"] and has_transformers():
        hf = hf_model(model.to(device))
        time_hf(hf, prompt.to(device), 2, device)
        seconds_hf, _ = time_hf(hf, prompt.to(device), long, device)
        rows.append({"impl": "transformers generate, fp32, in process",
                     "tokens_per_s": round(long / seconds_hf, 2)})
    return _sample_report(rows, cfg, short, long)


def _check_no_early_end(model, prompt, new_tokens, dtypes):
    """sample.py stops at <|endoftext|>: a random model's greedy text must not reach it."""
    for dtype in dtypes:
        m = model if dtype == "float32" else to_half(copy.deepcopy(model), dtype, "cpu")
        if (greedy_tokens(m, prompt, new_tokens) == chat.EOT).any():
            raise ConfigError(f"the random model's greedy text ends within {new_tokens} tokens in "
                              f"{dtype}: try another --seed")


def _time_sample(ckpt, text, new_tokens, dtype, device):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(REPO, "sample.py"),
                    f"--ckpt={ckpt}", "--raw", f"--prompt={text}", "--temperature=0",
                    f"--max_new_tokens={new_tokens}", f"--dtype={dtype}", f"--device={device}"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _sample_report(rows, cfg, short, long):
    hf = next((r["tokens_per_s"] for r in rows if r["impl"].startswith("transformers")), None)
    print(f"{'implementation':<42}{'s, ' + str(short):>10}{'s, ' + str(long):>10}{'tokens/s':>10}"
          f"{'vs transformers':>17}")
    for r in rows:
        if hf:
            r["vs_transformers"] = round(r["tokens_per_s"] / hf, 2)
        timed = (f"{r['seconds_short']:>10.2f}{r['seconds_long']:>10.2f}" if "seconds_long" in r
                 else " " * 20)
        ratio = f"{r['vs_transformers']:>16.2f}x" if hf else ""
        print(f"{r['impl']:<42}{timed}{r['tokens_per_s']:>10.1f}{ratio}")
    return {"mode": "sample", "preset": cfg["gen_preset"], "short": short, "long": long,
            "rows": rows, "load_avg_1min": round(os.getloadavg()[0], 2)}
