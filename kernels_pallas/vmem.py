"""VMEM footprint of a Pallas TPU (Mosaic) kernel, and the limit it asks the compiler for.

The footprint is computed from the kernel's own BlockSpecs and scratch shapes: every
pipelined input and output block is double-buffered (2 x its bytes), every scratch
buffer counts once, and each buffer's last two dims are padded to the vreg tile: 128
lanes, and 8 sublanes for 32-bit dtypes (16 for 16-bit, 32 for 8-bit, which pack
several rows per sublane). Squeezed / None block dims count as 1.

Per-chip VMEM (bytes per TensorCore). Physical capacities are those of JAX's own chip
table, jax/_src/pallas/mosaic/tpu_info.py (`vmem_capacity_bytes`: v4 16 MiB, v5e 128
MiB, v5p 64 MiB, v6e 128 MiB, v7x 64 MiB). The default scoped limit (what a kernel
gets without `vmem_limit_bytes`) is 16 MiB on v4 / v5e / v5p and 32 MiB on v6e / v7x
(JAX's Pallas TPU docs); the kernels here always pass an explicit `vmem_limit_bytes`
(`limit_bytes`), so the default only matters for reference.
"""
import math

import numpy as np
from jax.experimental import pallas as pl

MiB = 1 << 20
LANES = 128

# chip: (physical VMEM per core, default scoped VMEM limit)
CHIPS = {
    "v4": (16 * MiB, 16 * MiB),
    "v5e": (128 * MiB, 16 * MiB),
    "v5p": (64 * MiB, 16 * MiB),
    "v6e": (128 * MiB, 32 * MiB),
    "v7x": (64 * MiB, 32 * MiB),
}
# The generations the kernels' block sizes target (the pod presets run on v5e; v4's
# 16 MiB is too small for the wide default blocks, pass smaller blocks there).
TARGETS = ("v5e", "v5p", "v6e", "v7x")
# Block choosers keep a kernel's footprint within this; the limit asked for adds
# headroom (Mosaic's internal scratch, spills) and stays within every target's VMEM.
BUDGET = 24 * MiB
LIMIT_CAP = 48 * MiB
LIMIT_FLOOR = 16 * MiB


def sublanes(dtype):
    """Rows of one vreg tile for `dtype`: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
    return 8 * max(1, 4 // np.dtype(dtype).itemsize)


def padded_bytes(shape, dtype):
    """Bytes of a VMEM buffer of `shape` with its last two dims padded to the tile."""
    dims = [1 if (d is None or isinstance(d, pl.Squeezed)) else int(d) for d in shape]
    dims = [1] * max(0, 2 - len(dims)) + dims
    dims[-1] = -(-dims[-1] // LANES) * LANES
    sub = sublanes(dtype)
    dims[-2] = -(-dims[-2] // sub) * sub
    return math.prod(dims) * np.dtype(dtype).itemsize


def footprint(blocks, scratch=()):
    """VMEM bytes of a kernel: `blocks` (BlockSpec, dtype) pairs of its pipelined
    inputs and outputs (double-buffered), `scratch` its pltpu.VMEM scratch shapes."""
    total = sum(2 * padded_bytes(spec.block_shape, dtype) for spec, dtype in blocks)
    return total + sum(padded_bytes(s.shape, s.dtype) for s in scratch)


def limit_bytes(footprint_bytes):
    """The `vmem_limit_bytes` a kernel of this footprint asks for: the footprint plus a
    quarter and 2 MiB, rounded up to a MiB, at least LIMIT_FLOOR (the smallest default)
    and at most LIMIT_CAP (within the physical VMEM of every TARGETS chip)."""
    want = -(-(footprint_bytes + footprint_bytes // 4 + 2 * MiB) // MiB) * MiB
    return int(min(max(want, LIMIT_FLOOR), LIMIT_CAP))
