"""--mode=prepare: prepare.py end to end against tools/prepare_bare.py, the work every tokeniser
must do (JSON decoding, the template's text, tiktoken's batch encoder, uint16 writes): both as
processes (wall, CPU, peak RSS), on chat records, a .txt and a parquet file of documents.

    python bench.py --mode=prepare                   # prepare.py end to end vs a bare tokenise-and-write loop (~25 MB)
    python bench.py --mode=prepare --prepare_chat= --prepare_text= --prepare_mb=250   # parquet alone, 250 MB
    python bench.py --mode=prepare --prepare_tokenizer=tokenizers/shakespeare-8k  # both with a trained tokenizer
"""
import itertools
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
    # --mode=prepare: a .txt whose lines become the documents (PARQUET_DOC_LINES each) of a parquet
    # file's "text" column, in row groups of PARQUET_GROUP_ROWS
    prepare_parquet="../shared/data/tinyshakespeare-text/input.txt",
    # --mode=prepare: each file is repeated to about this many MB ("" skips it: --prepare_text=)
    prepare_mb=25.0,
    # --mode=prepare: runs of each (bare loop, prepare.py), alternately; the faster one counts
    prepare_runs=2,
    # --mode=prepare: prepare.py --threads values to run (comma-separated, e.g. 1,2: a row each)
    prepare_threads="8",
    # --mode=prepare: a trained tokenizer's folder (prepare.py --task=tokenizer) both encode with ("" = GPT-2's)
    prepare_tokenizer="",
)
PARQUET_DOC_LINES = 40  # lines of the source per parquet document (~1.5 KB of tinyshakespeare)
PARQUET_GROUP_ROWS = 4096  # rows per row group of the generated parquet file (~6 MB)


def bench(cfg):
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        for kind, source in (("chat", cfg["prepare_chat"]), ("text", cfg["prepare_text"]),
                             ("parquet", cfg["prepare_parquet"])):
            if not source:
                continue
            # relative to the repo
            source = source if os.path.isfile(source) else os.path.join(REPO, source)
            if not os.path.isfile(source):
                raise SystemExit(f"error: --prepare_{kind}={cfg[f'prepare_{kind}']}: no such file")
            path = os.path.join(tmp, f"big_{kind}{os.path.splitext(source)[1]}")
            copies = _repeat_file(source, path, cfg["prepare_mb"] * 10 ** 6)
            if kind == "parquet":
                path = _as_parquet(path)
            rows += _measure(kind, path, cfg, tmp, {"kind": kind, "source": source,
                                                   "copies": copies})
    print(f"prepare: tokenizer {cfg['prepare_tokenizer'] or 'gpt2'}; {os.cpu_count()} CPUs, load avg "
          f"{os.getloadavg()[0]:.2f}; the faster of "
          f"{cfg['prepare_runs']} run(s) each; ratio = bare wall / prepare.py wall (1 = as fast as "
          "the bare loop; both whole processes)")
    for r in rows:
        print(f"  {r['kind']:<8}{r['mb']:>6.1f} MB ({r['copies']} copies), {r['tokens']:,} tokens, "
              f"--threads={r['threads']}: "
              f"bare {r['bare_s']:.2f}s wall / {r['bare_cpu_s']:.2f}s CPU / "
              f"{r['bare_peak_rss_mb']:.0f} MB; prepare.py {r['prepare_s']:.2f}s wall / "
              f"{r['prepare_cpu_s']:.2f}s CPU / {r['prepare_peak_rss_mb']:.0f} MB; ratio "
              f"{r['ratio']:.2f}")
    return {"mode": "prepare", "tokenizer": cfg["prepare_tokenizer"] or "gpt2", "rows": rows,
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def _measure(kind, path, cfg, tmp, row):
    """Rows (row + the figures) of the bare loop and prepare.py at each --prepare_threads value on
    path, run alternately prepare_runs times (a load that comes and goes hits all alike); the
    fastest run of each counts."""
    columns = ["--text_column=text"] if kind == "parquet" else []
    tokenizer = cfg["prepare_tokenizer"]
    threads = [int(t) for t in str(cfg["prepare_threads"]).split(",")]
    runs = {"bare": [], **{t: [] for t in threads}}
    for _ in range(cfg["prepare_runs"]):
        runs["bare"].append(_run_child([os.path.join(REPO, "tools", "prepare_bare.py"), kind, path,
                                        os.path.join(tmp, "bare.bin"),
                                        *([tokenizer] if tokenizer else [])]))
        for t in threads:
            runs[t].append(_run_child([os.path.join(REPO, "prepare.py"), path, *columns,
                                       f"--threads={t}", f"--out_dir={os.path.join(tmp, kind)}",
                                       f"--tokenizer={tokenizer or 'gpt2'}"]))
    bare, bare_out = min(runs["bare"], key=lambda r: r[0]["s"])
    with open(os.path.join(tmp, kind, "meta.json")) as f:
        tokens = sum(json.load(f)["tokens"].values())
    rows = []
    for t in threads:
        prep, _ = min(runs[t], key=lambda r: r[0]["s"])
        rows.append({**row, "threads": t, "mb": round(os.path.getsize(path) / 1e6, 1),
                     "tokens": tokens, "tokens_bare": int(bare_out.split()[-1]),
                     **{f"bare_{k}": v for k, v in bare.items()},
                     **{f"prepare_{k}": v for k, v in prep.items()},
                     "ratio": round(bare["s"] / prep["s"], 3)})
    return rows


def _as_parquet(text_path):
    """The lines of text_path as documents of PARQUET_DOC_LINES lines in a parquet file's "text"
    column (row groups of PARQUET_GROUP_ROWS rows), written a row group at a time; the .txt is
    removed. Returns the parquet file's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = os.path.splitext(text_path)[0] + ".parquet"
    schema = pa.schema([("text", pa.string())])
    with open(text_path, encoding="utf-8") as f, pq.ParquetWriter(path, schema) as writer:
        docs = iter(lambda: "".join(itertools.islice(f, PARQUET_DOC_LINES)), "")
        while group := list(itertools.islice(docs, PARQUET_GROUP_ROWS)):
            writer.write_table(pa.table({"text": group}, schema=schema))
    os.remove(text_path)
    return path


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
