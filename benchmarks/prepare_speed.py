"""--mode=prepare: prepare.py end to end against tools/prepare_bare.py, the work every tokeniser
must do (JSON decoding, the template's text, tiktoken's batch encoder, uint16 writes): both as
processes (wall, CPU, peak RSS).

    python bench.py --mode=prepare                   # prepare.py end to end vs a bare tokenise-and-write loop (~25 MB)
    python bench.py --mode=prepare --prepare_tokenizer=tokenizers/shakespeare-8k  # both with a trained tokenizer
"""
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = dict(  # `python bench.py --help` prints these comments
    # --mode=prepare: prompt/completion .jsonl
    prepare_chat="../shared/data/prompt-completion-mlx-wwdc25/train.jsonl",
    # --mode=prepare: a .txt (paths from the repo root)
    prepare_text="../shared/data/tinyshakespeare-text/input.txt",
    # --mode=prepare: each file is repeated to about this many MB ("" skips it: --prepare_text=)
    prepare_mb=25.0,
    # --mode=prepare: runs of each (bare loop, prepare.py), alternately; the faster one counts
    prepare_runs=2,
    # --mode=prepare: a trained tokenizer's folder (prepare.py --task=tokenizer) both encode with ("" = GPT-2's)
    prepare_tokenizer="",
)

def bench(cfg):
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        for kind, source in (("chat", cfg["prepare_chat"]), ("text", cfg["prepare_text"])):
            if not source:
                continue
            # relative to the repo
            source = source if os.path.isfile(source) else os.path.join(REPO, source)
            if not os.path.isfile(source):
                raise SystemExit(f"error: --prepare_{kind}={cfg[f'prepare_{kind}']}: no such file")
            path = os.path.join(tmp, f"big_{kind}{os.path.splitext(source)[1]}")
            copies = _repeat_file(source, path, cfg["prepare_mb"] * 10 ** 6)
            runs = {"bare": [], "prepare": []}
            # alternately: a load that comes and goes hits both alike
            tokenizer = cfg["prepare_tokenizer"]
            for _ in range(cfg["prepare_runs"]):
                runs["bare"].append(_run_child([os.path.join(REPO, "tools", "prepare_bare.py"),
                                                kind, path, os.path.join(tmp, "bare.bin"),
                                                *([tokenizer] if tokenizer else [])]))
                runs["prepare"].append(_run_child([os.path.join(REPO, "prepare.py"), path,
                                                   f"--out_dir={os.path.join(tmp, kind)}",
                                                   f"--tokenizer={tokenizer or 'gpt2'}"]))
            (bare, bare_out), (prep, _) = (min(runs[k], key=lambda r: r[0]["s"])
                                           for k in ("bare", "prepare"))
            with open(os.path.join(tmp, kind, "meta.json")) as f:
                tokens = sum(json.load(f)["tokens"].values())
            rows.append({"kind": kind, "source": source, "copies": copies,
                         "mb": round(os.path.getsize(path) / 1e6, 1),
                         "tokens": tokens, "tokens_bare": int(bare_out.split()[-1]),
                         **{f"bare_{k}": v for k, v in bare.items()},
                         **{f"prepare_{k}": v for k, v in prep.items()},
                         "ratio": round(bare["s"] / prep["s"], 3)})
    print(f"prepare: tokenizer {cfg['prepare_tokenizer'] or 'gpt2'}; {os.cpu_count()} CPUs, load avg "
          f"{os.getloadavg()[0]:.2f}; the faster of "
          f"{cfg['prepare_runs']} run(s) each; ratio = bare wall / prepare.py wall (1 = as fast as "
          "the bare loop; both whole processes)")
    for r in rows:
        print(f"  {r['kind']:<5}{r['mb']:>6.1f} MB ({r['copies']} copies), {r['tokens']:,} tokens: "
              f"bare {r['bare_s']:.2f}s wall / {r['bare_cpu_s']:.2f}s CPU / "
              f"{r['bare_peak_rss_mb']:.0f} MB; prepare.py {r['prepare_s']:.2f}s wall / "
              f"{r['prepare_cpu_s']:.2f}s CPU / {r['prepare_peak_rss_mb']:.0f} MB; ratio "
              f"{r['ratio']:.2f}")
    return {"mode": "prepare", "tokenizer": cfg["prepare_tokenizer"] or "gpt2", "rows": rows,
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def _repeat_file(source, path, size):
    """Write source repeated until path holds about size bytes; returns the number of copies."""
    with open(source, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        data += b"\n"
    copies = max(1, round(size / max(1, len(data))))
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return copies


# Runs `python ARGS` from a fresh small process and reports its rusage: a child of bench.py itself
# would count bench.py's own memory (torch) in its peak RSS, which Linux carries over a fork and
# exec.
MEASURE_CHILD = """import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), time.perf_counter() - start,
                  usage.ru_utime + usage.ru_stime, usage.ru_maxrss]), file=sys.stderr)
"""


def _run_child(args):
    """({s, cpu_s, peak_rss_mb}, stdout) of `python *args`: wall and CPU time and peak RSS of that
    process alone, interpreter start and imports included."""
    p = subprocess.run([sys.executable, "-c", MEASURE_CHILD, *args], capture_output=True, text=True)
    code, wall, cpu, rss = json.loads(p.stderr.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"error: {' '.join(args)} failed:\n{p.stdout}{p.stderr}")
    # bytes on macOS, KiB on Linux
    rss = rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10
    return {"s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(rss, 1)}, p.stdout
