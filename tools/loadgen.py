"""Load generator for serve.py: tokens/s, latency and time to first token at several numbers of concurrent clients.

    python tools/loadgen.py                                # a small random-weights model, 200 requests at 1, 4, 16
    python tools/loadgen.py --requests=20                  # a quick run
    python tools/loadgen.py --ckpt=out/finetuned_X.pt --concurrency=1,8 --max_tokens=128

Starts serve.py on a free 127.0.0.1 port with --ckpt (or the newest best checkpoint in --out_dir), or, when neither
is given, with a small model of random weights (4 layers, 256 wide, block 256; the output says which). For each
concurrency, that many clients (threads) send streaming chat completions over plain HTTP until --requests were sent
or --max_seconds passed: greedy, --max_tokens new tokens, no stop string, prompts of 3 to 120 words. Prints per
concurrency: new tokens/s over the whole run, p50/p99 latency and time to first token, failed requests (an HTTP
error or an exception) and lost ones (a stream that ended without its [DONE]); then the ratio of the highest
concurrency's tokens/s to the lowest's, and one JSON line.
"""
import argparse
import contextlib
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402

WORDS = ("the a cat dog house river story friend market song light garden city winter morning letter window road "
         "teacher music book question answer little quiet bright old new happy long small").split()
RANDOM_MODEL = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=50304, bias=True, dropout=0.0)


def percentile(values, q):
    """The q-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(results, wall_s):
    """Statistics of one concurrency's results ({"ok", "lost", "tokens", "latency", "ttft"} each) over wall_s."""
    ok = [r for r in results if r["ok"]]
    latency, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "ok": len(ok), "failed": sum(not r["ok"] and not r["lost"] for r in results),
            "lost": sum(r["lost"] for r in results), "new_tokens": tokens, "wall_s": round(wall_s, 2),
            "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
            "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99)}


def prompts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120))) for _ in range(n)]


def one_request(client, url, prompt, max_tokens):
    """Stream one chat completion: {"ok", "lost", "tokens", "latency", "ttft"} (seconds)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stop": [], "stream": True, "stream_options": {"include_usage": True}}
    result = {"ok": False, "lost": False, "tokens": 0, "latency": None, "ttft": None}
    t0 = time.perf_counter()
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return result
            finished = False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    finished = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result["tokens"] = chunk["usage"]["completion_tokens"]
                if result["ttft"] is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                    result["ttft"] = time.perf_counter() - t0
    except httpx.HTTPError:
        return result
    result["latency"] = time.perf_counter() - t0
    result["ok"], result["lost"] = finished, not finished
    return result


def run_level(url, texts, clients, max_tokens, max_seconds):
    """len(texts) requests (fewer if max_seconds runs out) from `clients` threads; (results, wall seconds)."""
    results, lock, next_index = [], threading.Lock(), iter(range(len(texts)))
    start = time.perf_counter()

    def client_loop():
        with httpx.Client(timeout=max_seconds + 60) as client:
            while time.perf_counter() - start < max_seconds:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                result = one_request(client, url, texts[i], max_tokens)
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def random_checkpoint(folder):
    """A checkpoint of RANDOM_MODEL's shape with freshly initialised weights, as train.py writes one."""
    import torch
    from dataclasses import asdict

    from chat_gpt2 import chat
    from chat_gpt2.checkpoint import save_checkpoint
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(**RANDOM_MODEL))
    path = os.path.join(folder, "random.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_args": asdict(model.config), "template": chat.TEMPLATE,
                           "tokenizer": chat.TOKENIZER, "default_stop": "\n", "multiline_replies": False})
    return path


@contextlib.contextmanager
def serving(model_args, max_rows, timeout=120):
    """serve.py in a subprocess on a free loopback port; yields its base URL, stops it at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *model_args, f"--port={port}",
                             f"--max_rows={max_rows}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise SystemExit(f"serve.py did not start:\n{log.read().decode(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="", help="a checkpoint file to serve")
    p.add_argument("--out_dir", default="", help="a run's folder: its newest best checkpoint is served")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency")
    p.add_argument("--concurrency", default="1,4,16", help="numbers of concurrent clients, comma-separated")
    p.add_argument("--max_tokens", type=int, default=64, help="new tokens per request (no stop string)")
    p.add_argument("--max_seconds", type=float, default=300, help="per concurrency: no new request after this")
    p.add_argument("--max_rows", type=int, default=16, help="serve.py's --max_rows")
    p.add_argument("--device", default="cpu", help="serve.py's --device")
    p.add_argument("--dtype", default="float32", help="serve.py's --dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    return p.parse_args(argv)


def model_options(args, folder):
    """(serve.py's model options, what the output calls the model)."""
    if args.ckpt:
        return [f"--ckpt={args.ckpt}"], args.ckpt
    if args.out_dir:
        return [f"--out_dir={args.out_dir}"], f"newest best checkpoint in {args.out_dir}"
    shape = ", ".join(f"{k}={RANDOM_MODEL[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size"))
    return [f"--ckpt={random_checkpoint(folder)}"], f"random weights ({shape}): no --ckpt or --out_dir given"


def main(argv=None):
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = prompts(args.requests, args.seed)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        options, described = model_options(args, folder)
        print(f"model: {described}; device {args.device}, dtype {args.dtype}, max_rows {args.max_rows}")
        with serving([*options, f"--device={args.device}", f"--dtype={args.dtype}"], args.max_rows) as url:
            run_level(url, texts[:2], 1, args.max_tokens, args.max_seconds)  # warm-up, not counted
            for clients in levels:
                results, wall = run_level(url, texts, clients, args.max_tokens, args.max_seconds)
                rows[clients] = summarize(results, wall)
                print(format_row(clients, rows[clients]), flush=True)
    ratio = rows[levels[-1]]["tokens_per_s"] / max(rows[levels[0]]["tokens_per_s"], 1e-9)
    print(f"tokens/s at {levels[-1]} clients / at {levels[0]}: {ratio:.2f}x")
    print(json.dumps({"loadgen": {str(k): v for k, v in rows.items()}, "ratio": round(ratio, 2),
                      "max_tokens": args.max_tokens, "model": described}))
    return rows


def format_row(clients, r):
    ms = lambda s: "-" if s is None else f"{s * 1000:.0f} ms"  # noqa: E731
    return (f"{clients:>3} clients: {r['ok']}/{r['requests']} ok, {r['failed']} failed, {r['lost']} lost, "
            f"{r['new_tokens']} new tokens in {r['wall_s']:.1f} s = {r['tokens_per_s']:.1f} tokens/s | latency p50 "
            f"{ms(r['latency_p50_s'])} p99 {ms(r['latency_p99_s'])} | TTFT p50 {ms(r['ttft_p50_s'])} "
            f"p99 {ms(r['ttft_p99_s'])}")


if __name__ == "__main__":
    main()
