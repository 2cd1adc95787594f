"""Roofline fields for a timed kernel: its floor time from FLOPs and bytes, and how
close a measured time comes to it.

  floor_s = max(flops / peak_flops, bytes / peak_bw)    fraction_of_floor = floor_s / seconds
  bound   = "compute" when the FLOP term is the larger, else "memory"

Peaks: the vendor figure for a known device kind (PEAKS, bf16 dense matmul FLOP/s and
HBM bytes/s), else -- on the CPU or an unknown chip -- a measurement in this process,
made once: the bytes read plus written per second of a jitted copy of a large fp32
array (64 MiB on the CPU, 1 GiB on an accelerator), and the FLOP/s of a jitted square
matmul (1024^3 fp32 on the CPU, 8192^3 bf16 on an accelerator).

FLOPs and bytes come from the kernels' own cost estimates (`cost_estimate` in
kernels_pallas.selective_scan, selective_scan_gpu, flash_attention, gated_delta; each a
pallas CostEstimate of flops, transcendentals, bytes_accessed), imported when first
used. An implementation that is not the kernel (xla, reference) is given its op's
kernel estimate as the work it must do, named in the row as "work_from". The estimates
count what the kernel moves and computes, padded tiles included, so at sizes under a
kernel's tile another implementation can come in under the "floor"
(fraction_of_floor > 1).
"""
import functools
import importlib
import time

import jax
import jax.numpy as jnp

# (bf16 dense matmul FLOP/s, HBM bytes/s), matched against the lowercased device_kind,
# first match wins. Sources: Google Cloud TPU "system architecture" pages (v4: 275
# TFLOPS, 1228 GB/s; v5e: 197 TFLOPS, 819 GB/s; v5p: 459 TFLOPS, 2765 GB/s; v6e
# Trillium: 918 TFLOPS, 1640 GB/s); NVIDIA datasheets without sparsity (A100 SXM 80GB:
# 312 TFLOPS, 2039 GB/s, 40GB: 1555 GB/s, 80GB PCIe: 1935 GB/s; H100 SXM: 989 TFLOPS,
# 3.35 TB/s, H100 PCIe: 756 TFLOPS, 2.0 TB/s; H200: 989 TFLOPS, 4.8 TB/s).
PEAKS = (
    ("tpu v4", (275e12, 1228e9)),
    ("tpu v5 lite", (197e12, 819e9)),   # v5e reports itself as "TPU v5 lite"
    ("tpu v5e", (197e12, 819e9)),
    ("tpu v5p", (459e12, 2765e9)),
    ("tpu v5", (459e12, 2765e9)),       # v5p reports itself as "TPU v5"
    ("tpu v6 lite", (918e12, 1640e9)),  # v6e reports itself as "TPU v6 lite"
    ("tpu v6e", (918e12, 1640e9)),
    ("a100-sxm4-40gb", (312e12, 1555e9)),
    ("a100-pcie-40gb", (312e12, 1555e9)),
    ("a100 80gb pcie", (312e12, 1935e9)),
    ("a100", (312e12, 2039e9)),
    ("h100 pcie", (756e12, 2.0e12)),
    ("h100", (989e12, 3.35e12)),
    ("h200", (989e12, 4.8e12)),
)
# The measured probes, by backend: (copy bytes, matmul n, matmul dtype).
PROBES = {"cpu": (64 << 20, 1024, jnp.float32)}
ACCELERATOR_PROBE = (1 << 30, 8192, jnp.bfloat16)


def spec_peaks(kind):
    """(FLOP/s, bytes/s) of the device kind from PEAKS, or None if unknown."""
    kind = kind.lower()
    return next((p for key, p in PEAKS if key in kind), None)


def best_seconds(fn, *args, iters):
    """The fastest of `iters` timed calls of fn(*args), after one call that compiles."""
    jax.block_until_ready(fn(*args))  # compiles
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(nbytes, iters=5):
    """Bytes read plus written per second of a jitted copy (x + 1) of an fp32 array."""
    x = jnp.arange(nbytes // 4, dtype=jnp.float32)
    return 2 * x.nbytes / best_seconds(jax.jit(lambda a: a + 1.0), x, iters=iters)


def matmul_flops(n, dtype=jnp.float32, iters=5):
    """FLOP/s of a jitted n x n x n matmul on random data (best of `iters`)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    return 2 * n ** 3 / best_seconds(jax.jit(jnp.dot), a, b, iters=iters)


@functools.lru_cache(maxsize=None)
def measured_peaks():
    """(FLOP/s, bytes/s) measured on the default device, once per process."""
    nbytes, n, dtype = PROBES.get(jax.default_backend(), ACCELERATOR_PROBE)
    return matmul_flops(n, dtype), copy_bandwidth(nbytes)


@functools.lru_cache(maxsize=None)
def device_peaks():
    """(FLOP/s, bytes/s, source) for the default device: PEAKS, else measured."""
    kind = jax.devices()[0].device_kind
    peaks = spec_peaks(kind)
    if peaks:
        return (*peaks, f"vendor bf16 matmul / HBM figures of {kind}")
    return (*measured_peaks(), "measured here: fp32 matmul, fp32 array copy")


def roofline(seconds, flops, nbytes, peak_flops, peak_bw):
    """The roofline fields of one measurement (see the module docstring)."""
    compute_s, memory_s = flops / peak_flops, nbytes / peak_bw
    floor_s = max(compute_s, memory_s)
    return dict(flops=float(flops), bytes=float(nbytes), peak_flops=float(peak_flops),
                peak_bw=float(peak_bw), floor_s=floor_s,
                fraction_of_floor=floor_s / seconds if seconds else None,
                bound="compute" if compute_s >= memory_s else "memory")


def kernel_cost(module, *args, **kwargs):
    """kernels_pallas.<module>.cost_estimate(*args, **kwargs) as (flops, bytes)."""
    cost = importlib.import_module(f"kernels_pallas.{module}").cost_estimate(*args, **kwargs)
    return cost.flops, cost.bytes_accessed


def fields(seconds, module, *args, work_from=None, **kwargs):
    """Roofline fields (plus "peak_source", and "work_from" when given) for a time of
    `seconds` doing the work of kernels_pallas.<module>'s cost estimate; with
    backward=True the work is the forward's plus the backward's estimate. An error
    while estimating becomes a "roofline_error" field: the row still goes out."""
    try:
        flops, nbytes = kernel_cost(module, *args, **{**kwargs, "backward": False})
        if kwargs.get("backward"):
            bflops, bbytes = kernel_cost(module, *args, **kwargs)
            flops, nbytes = flops + bflops, nbytes + bbytes
        peak_flops, peak_bw, source = device_peaks()
    except Exception as e:  # noqa: BLE001 - a missing estimate must not lose the timing
        return dict(roofline_error=f"{type(e).__name__}: {str(e).strip()[:200]}")
    out = roofline(seconds, flops, nbytes, peak_flops, peak_bw)
    out["peak_source"] = source
    if work_from:
        out["work_from"] = work_from
    return out


def scan_kernel():
    """The selective-scan kernel module whose estimate is this backend's work figure."""
    return "selective_scan_gpu" if jax.default_backend() == "gpu" else "selective_scan"
