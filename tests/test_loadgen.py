"""tools/loadgen.py: its statistics, and a short run against serve.py with a tiny checkpoint."""
import importlib.util
import os

import pytest

from helpers import REPO


def load_tool():
    spec = importlib.util.spec_from_file_location("loadgen", os.path.join(REPO, "tools", "loadgen.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loadgen = load_tool()


def test_percentiles_and_summary():
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([3.0], 99) == 3.0
    values = list(range(1, 101))
    assert loadgen.percentile(values, 50) == 50 and loadgen.percentile(values, 99) == 99
    assert loadgen.percentile(values[::-1], 100) == 100  # order does not matter
    ok = lambda latency, ttft, tokens: {"ok": True, "lost": False, "tokens": tokens, "latency": latency,  # noqa: E731
                                        "ttft": ttft}
    results = [ok(1.0, 0.1, 10), ok(3.0, 0.3, 30), ok(2.0, 0.2, 20),
               {"ok": False, "lost": True, "tokens": 0, "latency": 5.0, "ttft": 0.5},
               {"ok": False, "lost": False, "tokens": 0, "latency": None, "ttft": None}]
    s = loadgen.summarize(results, wall_s=2.0)
    assert (s["requests"], s["ok"], s["failed"], s["lost"], s["new_tokens"]) == (5, 3, 1, 1, 60)
    assert s["tokens_per_s"] == 30.0  # only complete replies count
    assert (s["latency_p50_s"], s["latency_p99_s"], s["ttft_p50_s"], s["ttft_p99_s"]) == (2.0, 3.0, 0.2, 0.3)


@pytest.mark.slow
def test_a_short_run_against_a_tiny_model(make_tiny_ckpt, capsys):
    ckpt = make_tiny_ckpt(block_size=128)
    rows = loadgen.main([f"--ckpt={ckpt}", "--requests=4", "--concurrency=1,2", "--max_tokens=5"])
    out = capsys.readouterr().out
    assert f"model: {ckpt}" in out and "tokens/s at 2 clients / at 1" in out
    for clients in (1, 2):
        r = rows[clients]
        assert (r["requests"], r["ok"], r["failed"], r["lost"]) == (4, 4, 0, 0), r
        assert 0 < r["new_tokens"] <= 20 and r["ttft_p50_s"] <= r["latency_p50_s"]


def test_rss_of_this_process_and_of_none():
    assert loadgen.rss_kib(os.getpid()) > 1000
    assert loadgen.rss_kib(2**22 + 12345) is None  # above any pid the kernel hands out


@pytest.mark.slow
def test_a_short_soak_loses_nothing(make_tiny_ckpt, capsys):
    ckpt = make_tiny_ckpt(block_size=128)
    report = loadgen.main([f"--ckpt={ckpt}", "--soak_seconds=4", "--soak_clients=3", "--max_tokens=6"])
    out = capsys.readouterr().out
    assert "soak:" in out and "server RSS after warm-up" in out
    assert report["lost"] == 0 and report["failed"] == 0 and report["ok"] >= 5, report
    assert sum(sum(c.values()) for c in report["by_kind"].values()) == report["ok"]
    assert report["rss_after_warmup_kib"] > 10_000 and report["rss_end_kib"] > 10_000
    with pytest.raises(SystemExit, match="loopback"):
        loadgen.main(["--url=http://10.1.2.3:8000", "--soak_seconds=1"])
