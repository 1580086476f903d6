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


def test_auto_dtype_for_one_row_takes_int8_on_a_cpu_with_native_bf16(monkeypatch):
    """One sequence at a time on a CPU with AVX512-BF16 / AMX: int8 weights (measured fastest there); batches keep
    bf16, other CPUs keep their rules (int8 unmeasured there), and an explicit dtype wins."""
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    for capability in ("AVX512", "AVX2"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert device.resolve_dtype("auto", "cpu", one_row=True) == "int8"
        assert device.resolve_dtype("auto", "cpu") == "bfloat16"
        assert device.resolve_dtype("bfloat16", "cpu", one_row=True) == "bfloat16"
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.resolve_dtype("auto", "cpu", one_row=True) == "bfloat16"  # AVX2: bf16 converted in software
    assert device.resolve_dtype("auto", "mps", one_row=True) == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert device.resolve_dtype("auto", "cuda", one_row=True) == "bfloat16"  # int8 is optional on CUDA


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


def test_bounded_peak_measurement_skips_the_matmuls_that_would_take_too_long(monkeypatch):
    """max_seconds (train.py's peak_flops passes one): the sizes whose matmuls, timed at the probe size and
    scaled by n^3, would not fit are not run; with none fitting, the probe's rate stands. An emulated dtype
    (float16 on most CPUs) thus costs a small matmul instead of minutes of 2048 x 2048 ones."""
    sizes_run, real_matmul = [], torch.matmul

    def spy(a, b, **kwargs):
        sizes_run.append(a.shape[0])
        return real_matmul(a, b, **kwargs)
    monkeypatch.setattr(torch, "matmul", spy)
    # a 4096 x 4096 fp32 matmul takes far more than a millisecond on any CPU
    rate = device.measure_matmul_peak("cpu", "float32", sizes=(4096,), repeats=2, max_seconds=1e-3)
    assert rate > 0 and set(sizes_run) == {device.PROBE_SIZE}  # the probe's warm-up and one timed matmul
    sizes_run.clear()
    assert device.measure_matmul_peak("cpu", "float32", sizes=(32, 64), repeats=2, max_seconds=30) > 0
    assert sizes_run == [device.PROBE_SIZE] * 2 + [32] * 3 + [64] * 3  # small enough: each measured
    sizes_run.clear()
    assert device.measure_matmul_peak("cpu", "float32", sizes=(32, 64), repeats=2) > 0
    assert sizes_run == [32] * 3 + [64] * 3  # unbounded (bench.py's): no probe, as before
    sizes_run.clear()
    assert peak_flops("cpu", "float16", sizes=(8192,))[0] > 0  # train.py's call: bounded by default
    assert 8192 not in sizes_run


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
