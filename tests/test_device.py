"""chat_gpt2/device.py: the dtype and compile defaults per device, autocast, and the peak FLOP/s behind MFU."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import helpers
from chat_gpt2 import device
from chat_gpt2.device import autocast, cpu_has_bf16, known_peak_flops, peak_flops, resolve_compile, resolve_dtype


def test_resolve_dtype_cpu_defaults():
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_bf16() else "float32")
    assert resolve_dtype("float16", "cpu") == "float16"  # an explicit dtype always wins


def test_auto_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert device.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.resolve_dtype("auto", "cpu") == "float32"  # emulated bf16 is slower than fp32
    assert device.resolve_dtype("auto", "mps") == "float32"
    with pytest.raises(ValueError, match="dtype must be"):
        device.resolve_dtype("bf16", "cpu")


def test_auto_dtype_for_one_row_also_takes_bf16_where_the_cpu_converts_it(monkeypatch):
    """Decoding one sequence reads the weights once per token: bf16 halves the bytes even where the CPU converts
    it in software (AVX2 / AVX-512), while batches and training stay fp32 there."""
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    for capability, one_row in (("AVX2", "bfloat16"), ("AVX512", "bfloat16"), ("DEFAULT", "float32")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert device.resolve_dtype("auto", "cpu", one_row=True) == one_row, capability
        assert device.resolve_dtype("auto", "cpu") == "float32"
        assert device.resolve_dtype("float32", "cpu", one_row=True) == "float32"  # an explicit dtype wins
    assert device.resolve_dtype("auto", "mps", one_row=True) == "float32"


def test_resolve_compile():
    assert resolve_compile(None, "cuda") and not resolve_compile(None, "cpu") and not resolve_compile(None, "mps")
    assert resolve_compile("true", "cpu") and not resolve_compile(False, "cuda") and resolve_compile("off", "cuda") is False
    with pytest.raises(ValueError):
        resolve_compile("maybe", "cpu")


def test_autocast_only_off_fp32():
    a = torch.randn(4, 4)
    with autocast("cpu", "float32"):
        assert (a @ a).dtype == torch.float32
    with autocast("cpu", "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16


def test_peak_flops_measured_once_on_cpu_without_moving_the_rng():
    state = torch.get_rng_state()
    first = peak_flops("cpu", "float32", sizes=(64,), repeats=1)
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run's dropout masks depend on the global RNG
    assert first[1] == "measured" and first[0] > 0
    assert peak_flops("cpu", "float32", sizes=(64,), repeats=1) == first  # cached: the same figure, not re-timed


def test_known_gpu_peaks_first_match_wins(monkeypatch):
    assert known_peak_flops("cpu", "float32") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert known_peak_flops("cuda", "bfloat16") == 756e12  # not the SXM H100's 989
    assert peak_flops("cuda", "bfloat16") == (756e12, "known")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert known_peak_flops("cuda", "float16") == 125e12 and known_peak_flops("cuda", "bfloat16") is None


def test_peak_measurement_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    device.measure_matmul_peak("cpu", "float32", sizes=(64,), repeats=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.isfinite(device.measure_matmul_peak("cpu", "float32", sizes=(64,), repeats=1))


_ALLOCATOR_CHILD = """
import sys
import torch
from chat_gpt2.device import tune_cpu_allocator

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

tune_cpu_allocator("cpu", lean=sys.argv[1] == "lean")
before = rss_mb()
x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
x = None
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_cpu_allocator_modes_keep_or_return_freed_memory():
    """Fast mode keeps a freed 64 MiB tensor in the process (no page faults next step); lean mode, for
    --grad_checkpointing, gives it back to the OS at once (a lower peak when activations come and go)."""
    kept = {}
    for mode in ("fast", "lean"):
        p = subprocess.run([sys.executable, "-c", _ALLOCATOR_CHILD, mode], capture_output=True, text=True,
                           cwd=helpers.REPO, check=True)
        kept[mode] = float(p.stdout)
    assert kept["fast"] > 48, kept
    assert kept["lean"] < 16, kept
