"""What the CUDA tests need beyond the scripts' command lines, in one place: the device they run on, the flags of
a run with that device's defaults, and the few library calls (engine, half precision) the generation tests make.

CHAT_GPT2_TEST_DEVICE picks the device: cuda (the default; the tests skip where CUDA is unavailable) or cpu, the
dry run of tools/gpu_check.sh, which runs the same tests on the CPU's defaults. CHAT_GPT2_TEST_TINY=1 shrinks the
GPT-2 124M shape to a small model of the same head count (for that dry run)."""
import os

import pytest
import torch

import helpers

DEVICE = os.environ.get("CHAT_GPT2_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
TINY = os.environ.get("CHAT_GPT2_TEST_TINY", "") not in ("", "0")
HERE = os.path.dirname(os.path.abspath(__file__))

requires_device = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False); CHAT_GPT2_TEST_DEVICE=cpu runs them on the CPU")

# the GPT-2 124M shape (and what stands in for it in a dry run)
SHAPE_124M = dict(n_layer=2, n_head=12, n_embd=96) if TINY else dict(n_layer=12, n_head=12, n_embd=768)


def default_dtype():
    """The training dtype train.py's dtype=auto picks on DEVICE."""
    from chat_gpt2.device import resolve_dtype
    return resolve_dtype("auto", DEVICE)


def train_flags(dataset, out_dir, **overrides):
    """helpers.tiny_train_args on DEVICE with its defaults: dtype auto, compile auto (on for CUDA)."""
    return helpers.tiny_train_args(dataset, out_dir, **{"device": DEVICE, "dtype": "auto", "compile": None,
                                                        **overrides})


def script(name, *args, cwd, timeout=300, deterministic=False, env=None):
    """`python name args...` from cwd (helpers.run) with env's variables added; deterministic: under
    torch.use_deterministic_algorithms (tests/cuda/_deterministic.py), so that two runs on a GPU can be compared
    bit for bit."""
    argv = [helpers.script(name), *args]
    if deterministic:
        argv.insert(0, os.path.join(HERE, "_deterministic.py"))
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return helpers.run(argv, cwd, timeout=timeout)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


# TORCH_LOGS=dynamo: torch.compile logs that it traced the model ("torchdynamo start tracing"): proof of compiling
COMPILE_LOG = {"TORCH_LOGS": "dynamo"}
COMPILED = "torchdynamo start tracing"


def best_and_last(out_dir):
    """(best checkpoint, _last checkpoint) of the one run in out_dir, loaded on the CPU."""
    names = helpers.checkpoints(str(out_dir))
    best = [n for n in names if not n.endswith("_last.pt")]
    last = [n for n in names if n.endswith("_last.pt")]
    assert len(best) == 1 and len(last) == 1, names
    return tuple(helpers.load_ckpt(os.path.join(str(out_dir), n[0])) for n in (best, last))


def step_losses(out_dir):
    """The training loss of every logged step of the run in out_dir (metrics.jsonl)."""
    return [r["loss"] for r in helpers.read_metrics(str(out_dir)) if r["event"] == "step"]


def best_path(out_dir):
    return os.path.join(str(out_dir), next(n for n in helpers.checkpoints(str(out_dir))
                                           if not n.endswith("_last.pt")))


# ---------------------------------------------------------------------------------------------------------------
# Generation through the library (the calls the engine's API may rename live here only)


def engine(ckpt, dtype):
    """The Engine sample.py would build for ckpt on DEVICE with --dtype=dtype (weights converted for half)."""
    from chat_gpt2.inference import load_engine
    return load_engine({"out_dir": "", "ckpt": ckpt, "device": DEVICE, "dtype": dtype})[0]


def greedy_params(new_tokens, **sampling):
    from chat_gpt2.sampling import SamplingParams
    return SamplingParams(**{"temperature": 0.0, "max_new_tokens": new_tokens, "stop": (), **sampling})


def cached_tokens(eng, prompts, new_tokens, **sampling):
    """Each prompt's reply tokens, the prompts decoded together as one batch (the KV-cache path)."""
    from chat_gpt2.engine import Request
    requests = [Request(prompt, greedy_params(new_tokens, **sampling)) for prompt in prompts]
    eng.complete(requests)
    return [request.replies[0].tokens for request in requests]


def uncached_tokens(eng, prompt, new_tokens):
    """The reference: greedy decoding by full forward passes (helpers.greedy_tokens) on eng's device and
    precision."""
    from chat_gpt2.device import autocast

    def forward(idx):
        with autocast(eng.device, eng.autocast_dtype):
            return eng.model(idx.to(eng.device))
    return helpers.greedy_tokens(forward, prompt, new_tokens)


def join_and_leave(eng, specs, joins_at):
    """Decode requests as the server does: specs [(prompt, sampling dict, new_tokens)], request i joining the
    running batch before step joins_at[i]; each row leaves when done. Returns each request's tokens."""
    from chat_gpt2.engine import Decoder, Request
    requests = [Request(prompt, greedy_params(new, **sampling)) for prompt, sampling, new in specs]
    decoder, step = Decoder(eng, max_rows=len(specs)), 0
    while step <= max(joins_at) or decoder.rows:
        for request, at in zip(requests, joins_at):
            if at == step:
                decoder.add(request)
        if decoder.rows:
            decoder.step()
        step += 1
    return [request.replies[0].tokens for request in requests]


def alone(eng, prompt, sampling, new):
    """One request decoded by itself."""
    return join_and_leave(eng, [(prompt, sampling, new)], [0])[0]


def matmul_dtypes(eng):
    """The dtypes of the engine model's matmul weights."""
    return {m.weight.dtype for m in eng.model.modules() if isinstance(m, torch.nn.Linear)}
