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

    python tools/loadgen.py --out_dir=out --soak_seconds=600     # soak: 10 minutes of mixed requests

Soak mode (--soak_seconds) sends, from --soak_clients threads, a random mix of streamed and plain
chat completions, streams the client closes after their first content, bad requests (a 4xx is
their right answer) and n=2 requests, for a warm-up then for --soak_seconds (at most
--soak_requests), and prints ok / failed / lost (lost: no complete answer to a request that was
neither cancelled nor bad) and the server's resident memory (VmRSS) after the warm-up and at the
end. With --url it uses a server already running on 127.0.0.1 (--server_pid for its memory).
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
    """serve.py in a subprocess on a free loopback port; yields (its base URL, its pid), stops it
    at the end."""
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
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# --------------------------------------------------------------------------------------------------
# Soak: minutes of mixed requests, then what was lost and how the server's memory grew

SOAK_KINDS = ("stream", "plain", "cancel", "bad", "n2")  # drawn in turn at random by each client
BAD_BODIES = ({"messages": []}, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
              {"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
              {"messages": [{"role": "user", "content": "hi"}], "no_such_field": 1}, {"prompt": 5})


def soak_request(client, url, kind, prompt, max_tokens, rng):
    """One soak request of `kind`: "ok" (a complete, well-formed answer; for "cancel", the stream
    closed by us after its first content; for "bad", a 4xx), "failed" (the server answered, but not
    as it should: a 5xx, a 200 to a bad request, a wrong number of choices) or "lost" (no complete
    answer: an exception, a stream without its [DONE])."""
    if kind == "bad":
        try:
            status = client.post(url + "/v1/chat/completions", json=rng.choice(BAD_BODIES)).status_code
        except httpx.HTTPError:
            return "lost"
        return "ok" if 400 <= status < 500 else "failed"
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": rng.choice((0, 0.8)), "stop": [], "n": 2 if kind == "n2" else 1}
    try:
        if kind in ("plain", "n2"):
            r = client.post(url + "/v1/chat/completions", json=body)
            return "ok" if r.status_code == 200 and len(r.json()["choices"]) == body["n"] else "failed"
        with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return "failed"
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    return "ok"
                if kind == "cancel" and line.startswith("data: ") and '"content"' in line:
                    return "ok"  # leaving the block closes the connection mid-stream
    except (httpx.HTTPError, ValueError, KeyError):
        return "lost"
    return "lost"


def soak_phase(url, args, seconds, seed):
    """args.soak_clients threads sending mixed requests for `seconds` (at most args.soak_requests
    in all); {kind: {"ok", "failed", "lost"}} counts."""
    counts = {kind: {"ok": 0, "failed": 0, "lost": 0} for kind in SOAK_KINDS}
    lock, sent, end = threading.Lock(), [0], time.perf_counter() + seconds

    def client_loop(index):
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(timeout=120) as client:
            while time.perf_counter() < end:
                with lock:
                    if sent[0] >= args.soak_requests:
                        return
                    sent[0] += 1
                kind = rng.choice(SOAK_KINDS)
                prompt = prompts(1, rng.random())[0]
                outcome = soak_request(client, url, kind, prompt, rng.randint(1, args.max_tokens), rng)
                with lock:
                    counts[kind][outcome] += 1

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True)
               for i in range(args.soak_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def rss_kib(pid):
    """A process's resident memory (VmRSS) in KiB, from /proc; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


def soak(url, pid, args):
    """A warm-up (a tenth of the time, at least 5 s), the RSS, the soak, the RSS again: the report."""
    warmup_s = min(max(args.soak_seconds / 10, 5), args.soak_seconds)
    soak_phase(url, args, warmup_s, args.seed + 1)
    rss_start = rss_kib(pid) if pid else None
    start = time.perf_counter()
    counts = soak_phase(url, args, args.soak_seconds, args.seed)
    wall, rss_end = time.perf_counter() - start, rss_kib(pid) if pid else None
    total = {key: sum(c[key] for c in counts.values()) for key in ("ok", "failed", "lost")}
    growth = None if not (rss_start and rss_end) else round(100 * (rss_end - rss_start) / rss_start, 2)
    report = {"soak_s": round(wall, 1), "warmup_s": round(warmup_s, 1), "clients": args.soak_clients,
              **total, "by_kind": counts, "rss_after_warmup_kib": rss_start, "rss_end_kib": rss_end,
              "rss_growth_pct": growth}
    print(f"soak: {sum(total.values())} requests in {wall:.0f} s from {args.soak_clients} clients: "
          f"{total['ok']} ok, {total['failed']} failed, {total['lost']} lost; " + ", ".join(
              f"{kind} {c['ok']}/{sum(c.values())}" for kind, c in counts.items()))
    if growth is not None:
        print(f"server RSS after warm-up {rss_start / 1024:.1f} MiB, at the end {rss_end / 1024:.1f} MiB: "
              f"{growth:+.2f}%")
    print(json.dumps({"soak": report}))
    return report


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
    p.add_argument("--soak_seconds", type=float, default=0,
                   help="soak mode: mixed requests for this long instead of the concurrency levels")
    p.add_argument("--soak_clients", type=int, default=4, help="soak mode: concurrent clients")
    p.add_argument("--soak_requests", type=int, default=100_000, help="soak mode: at most this many")
    p.add_argument("--url", default="", help="use this running server (http://127.0.0.1:PORT) "
                   "instead of starting one")
    p.add_argument("--server_pid", type=int, default=0, help="with --url: its pid, for the RSS")
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
    if args.url:
        return against_url(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = prompts(args.requests, args.seed)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        options, described = model_options(args, folder)
        print(f"model: {described}; device {args.device}, dtype {args.dtype}, max_rows {args.max_rows}")
        with serving([*options, f"--device={args.device}", f"--dtype={args.dtype}"],
                     args.max_rows) as (url, pid):
            if args.soak_seconds:
                return soak(url, pid, args)
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


def against_url(args):
    """Soak a server already running on the loopback interface (no other host: this is a load)."""
    host = httpx.URL(args.url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--url: only a loopback server (127.0.0.1), got {host}")
    if not args.soak_seconds:
        raise SystemExit("--url: give --soak_seconds (the concurrency levels start their own server)")
    print(f"server: {args.url}" + (f", pid {args.server_pid}" if args.server_pid else ""))
    return soak(args.url.rstrip("/"), args.server_pid, args)


def format_row(clients, r):
    ms = lambda s: "-" if s is None else f"{s * 1000:.0f} ms"  # noqa: E731
    return (f"{clients:>3} clients: {r['ok']}/{r['requests']} ok, {r['failed']} failed, {r['lost']} lost, "
            f"{r['new_tokens']} new tokens in {r['wall_s']:.1f} s = {r['tokens_per_s']:.1f} tokens/s | latency p50 "
            f"{ms(r['latency_p50_s'])} p99 {ms(r['latency_p99_s'])} | TTFT p50 {ms(r['ttft_p50_s'])} "
            f"p99 {ms(r['ttft_p99_s'])}")


if __name__ == "__main__":
    main()
