"""Where and how fast the computation runs: device and dtype choice, mixed precision, the CPU
allocator, free memory, and the peak FLOP/s that MFU is measured against (a GPU's data sheet, or a
matmul timed on the device)."""
import os
import sys
import time
from contextlib import nullcontext

import torch

from configurator import parse_bool
from .errors import ConfigError


def resolve_device(device):
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# int8: weight-only, for inference (GPT.to_half); train.py refuses it
DTYPES = ("float32", "bfloat16", "float16", "int8")


def resolve_dtype(dtype, device, one_row=False):
    """'auto': bf16 on CUDA where supported, else fp16 (with a GradScaler when training); fp32 on
    MPS. On CPU: bf16 where the CPU has bf16 matmul instructions (training: autocast over fp32
    master weights, faster than fp32 with the same loss curve, docs/performance.md; inference:
    weights converted, decoding reads half the bytes), else fp32, since emulated bf16 is slower than
    fp32 for batches. one_row (decoding one sequence at a time, as sample.py does): int8 weights
    where cpu_decodes_int8_faster(), else bf16 also where cpu_decodes_bf16_faster()."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be auto, {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, "
                              f"got {dtype!r}")
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "cpu" and one_row and cpu_decodes_int8_faster():
        return "int8"
    if device == "cpu" and (cpu_has_bf16() or one_row and cpu_decodes_bf16_faster()):
        return "bfloat16"
    return "float32"


def cpu_decodes_int8_faster():
    """True where the host CPU decodes one sequence faster with int8 weights (torch's int8 kernel,
    bf16 activations) than with bf16 or fp32 ones: measured on x86 CPUs with native bf16
    (docs/performance.md#int8-weights). Elsewhere unmeasured: bf16 / fp32 as before. Batches stay
    bf16 there, where bf16 matmuls of 8 rows beat the int8 kernel."""
    return cpu_has_bf16()


def cpu_decodes_bf16_faster():
    """True where the host CPU decodes one sequence faster with bf16 weights than with fp32 ones:
    with native bf16, and on x86 CPUs with AVX2 or AVX-512, which convert bf16 in software but read
    half the bytes per token (docs/performance.md#generation). Elsewhere (e.g. ARM) unmeasured:
    fp32."""
    return cpu_has_bf16() or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cpu_has_bf16():
    """True when the CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX): there bf16
    matmuls beat fp32 ones. Elsewhere PyTorch emulates them, slower than fp32."""
    check = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(c is not None for c in check):
        return any(c() for c in check)
    try:  # older torch: ask the kernel
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def autocast(device, dtype):
    """Mixed-precision context for the forward pass; a no-op in fp32 and int8 (int8 weights
    multiply in bf16 on their own, GPT.to_half)."""
    if dtype in ("float32", "int8"):
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def tune_cpu_allocator(device, lean=False):
    """Choose how glibc's malloc serves a CPU training run's large tensors (Linux only).

    Fast (default): keep freed memory in the process for reuse: no allocation is served by mmap and
    none is returned to the OS. A training step allocates and frees the same large tensors
    (activations, gradients, logits) every step; by default each one is a fresh mmap whose pages the
    kernel faults in and zeroes, a sizable share of a CPU step (docs/performance.md).

    lean (--grad_checkpointing, --parallel=fsdp: where memory is the point): every block of 1 MiB
    or more is its own mmap, returned to the OS when freed, in transparent huge pages (fewer
    faults). With the heap only, the small long-lived objects of a checkpointed step land between the freed activations and
    the heap grows by tens of MB a block (docs/performance.md)."""
    if device != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
        if lean:
            libc.mallopt(M_MMAP_THRESHOLD, 2 ** 20)  # fixed: glibc's own threshold would grow to 32 MB
            os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by PyTorch's CPU allocator when it allocates
        else:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30)  # int: 1 GiB of free heap top is kept, not given back
    except (OSError, AttributeError):  # not glibc (e.g. musl): keep its defaults
        pass


def available_memory(device):
    """Free memory in bytes: the device's on CUDA, the OS's
    MemAvailable on CPU / MPS (shared); None if unknown."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Peak FLOP/s for MFU (train.py's log, bench.py): a CUDA GPU's data sheet, or measured on the device

# Dense (no sparsity) peak TFLOP/s by dtype, matched as a substring of torch.cuda.get_device_name(),
# first match wins. fp32 is the plain (non-TF32) rate, as nothing here turns TF32 on; bf16 on
# consumer cards with fp32 accumulate.
KNOWN_GPU_PEAKS = [
    ("H100 PCIe", {"bfloat16": 756, "float16": 756, "float32": 51}),
    ("H100", {"bfloat16": 989, "float16": 989, "float32": 67}),
    ("H200", {"bfloat16": 989, "float16": 989, "float32": 67}),
    ("A100", {"bfloat16": 312, "float16": 312, "float32": 19.5}),
    ("L40S", {"bfloat16": 362, "float16": 362, "float32": 91.6}),
    ("L4", {"bfloat16": 121, "float16": 121, "float32": 30.3}),
    ("RTX 4090", {"bfloat16": 165, "float16": 165, "float32": 82.6}),
    ("RTX 3090", {"bfloat16": 71, "float16": 71, "float32": 35.6}),
    ("V100", {"float16": 125, "float32": 15.7}),
    ("T4", {"float16": 65, "float32": 8.1}),
]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device.startswith("mps"):
        torch.mps.synchronize()


def measure_matmul_peak(device, dtype, sizes=(1024, 2048), repeats=3, max_seconds=None):
    """Best FLOP/s of square (n x n) @ (n x n) matmuls in dtype on device, over sizes and repeats:
    the ceiling the model's linear layers run against (under autocast they are matmuls in that
    dtype). The inputs come from a private generator: measuring must not move the global RNG (a
    resumed run's dropout masks depend on it). max_seconds: first time a PROBE_SIZE matmul and
    measure only the sizes whose matmuls, scaled by n^3, fit in that time; if none fit, the probe's
    own rate (a dtype the CPU only emulates, such as float16, takes seconds for one 2048 matmul)."""
    generator = torch.Generator(device=device).manual_seed(0)
    if max_seconds is None:
        return max(_matmul_rate(device, dtype, n, repeats, generator)[0] for n in sizes)
    probe, probe_s = _matmul_rate(device, dtype, PROBE_SIZE, 1, generator)
    best, spent = 0.0, 0.0
    for n in sizes:
        spent += (repeats + 1) * probe_s * (n / PROBE_SIZE) ** 3  # its warm-up and repeats
        if spent > max_seconds:
            break
        best = max(best, _matmul_rate(device, dtype, n, repeats, generator)[0])
    return best or probe


PROBE_SIZE = 256


def _matmul_rate(device, dtype, n, repeats, generator):
    """(best FLOP/s, seconds of the fastest matmul) of n x n matmuls in dtype, after a warm-up."""
    inner = 1 if device == "cpu" else 10  # a GPU matmul is too short to time alone
    a, b = (torch.randn(n, n, device=device, generator=generator).to(getattr(torch, dtype))
            for _ in range(2))
    out = torch.matmul(a, b)  # warm-up: kernel choice, first-touch pages; then reuse the output buffer
    sync(device)
    fastest = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        sync(device)
        fastest = min(fastest, (time.perf_counter() - t0) / inner)
    return 2 * n ** 3 / fastest, fastest


def known_peak_flops(device, dtype):
    """This CUDA GPU's data-sheet peak FLOP/s for dtype, or None (not
    CUDA, or a GPU not in KNOWN_GPU_PEAKS)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    peaks = next((p for key, p in KNOWN_GPU_PEAKS if key in name), {})
    return peaks[dtype] * 1e12 if dtype in peaks else None


def peak_flops(device, dtype, sizes=(1024, 2048), repeats=3, max_seconds=3.0):
    """The peak MFU is reported against: a listed GPU's data sheet, else measured here (CPU, MPS,
    other GPUs) in at most about max_seconds (measure_matmul_peak: float16 on a CPU without it
    measures a small matmul, not minutes of large ones). Returns (FLOP/s, 'known' | 'measured').
    Measured once per process and thread count (tests train many times)."""
    known = known_peak_flops(device, dtype)
    if known:
        return known, "known"
    key = (device, dtype, tuple(sizes), repeats, max_seconds, torch.get_num_threads())
    if key not in _MEASURED:
        _MEASURED[key] = measure_matmul_peak(device, dtype, sizes, repeats, max_seconds)
    return _MEASURED[key], "measured"


_MEASURED = {}


def resolve_compile(value, device):
    """compile=None: on for CUDA, where it pays; off on CPU, where it measured no faster than the
    eager fast paths (fused head loss, bf16, fused AdamW) after a minute or more of compiling
    (docs/performance.md), and on MPS."""
    if value is None:
        return device.startswith("cuda")
    if isinstance(value, str):  # e.g. --compile=true, which the config parser leaves as a string
        if parse_bool(value) is None:
            raise ConfigError(f"invalid value {value!r} for compile: use True, False or None (auto)")
        return parse_bool(value)
    return bool(value)

