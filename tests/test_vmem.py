"""VMEM footprints of every Mosaic kernel at the pod presets' shapes (kernels_pallas.vmem).

Each kernel module builds its BlockSpecs and scratch in one layout function that its
pallas_call uses; the footprints here come from those same functions (double-buffered
blocks plus scratch, tile-padded). At every preset's shapes a kernel's footprint must
stay within vmem.BUDGET and the `vmem_limit_bytes` it asks for must cover the
footprint and fit the physical VMEM of every targeted chip generation (vmem.CHIPS,
from JAX's tpu_info table). The lowering checks confirm the limit a real pallas_call
carries into its Mosaic custom call is the one computed from its layout.
"""
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import long_context
import mamba_lm
import mom_lm
import transformer_lm
from jaxmix.ops.scan_pallas import selective_scan_pallas, tiles
from kernels_pallas import flash_attention as fa
from kernels_pallas import gated_delta as gd
from kernels_pallas import selective_scan as scan
from kernels_pallas import vmem

MiB = vmem.MiB
LENGTHS = (2048, 8192)   # the pod presets' seq_len, and a longer one


def check_fits(footprint, what):
    limit = vmem.limit_bytes(footprint)
    assert footprint <= vmem.BUDGET, (what, footprint / MiB)
    assert footprint <= limit, (what, footprint / MiB, limit / MiB)
    for chip in vmem.TARGETS:
        physical, _ = vmem.CHIPS[chip]
        assert limit <= physical, (what, chip, limit / MiB)


def test_padded_bytes_and_footprint():
    """Tile padding by dtype (8 / 16 / 32 sublanes, 128 lanes), squeezed dims as 1,
    blocks counted twice, scratch once."""
    assert vmem.padded_bytes((1, 1), jnp.float32) == 8 * 128 * 4
    assert vmem.padded_bytes((1, 1), jnp.bfloat16) == 16 * 128 * 2
    assert vmem.padded_bytes((1, 1), jnp.int8) == 32 * 128
    assert vmem.padded_bytes((3, 20, 130), jnp.float32) == 3 * 24 * 256 * 4
    assert vmem.padded_bytes((pl.squeezed, None, 64, 128), jnp.bfloat16) == 64 * 128 * 2
    assert vmem.padded_bytes((5,), jnp.float32) == 8 * 128 * 4
    block = pl.BlockSpec((pl.squeezed, 16, 256), lambda i: (i, 0, 0))
    scratch = [pltpu.VMEM((4, 8, 128), jnp.float32)]
    assert vmem.footprint([(block, jnp.bfloat16)], scratch) == 2 * 16 * 256 * 2 + 4 * 8 * 128 * 4
    assert vmem.limit_bytes(0) == vmem.LIMIT_FLOOR
    assert vmem.limit_bytes(10 ** 12) == vmem.LIMIT_CAP
    assert vmem.limit_bytes(20 * MiB) == 27 * MiB


def _scan_cases():
    for preset, (d_model, _) in mamba_lm.POD_SHAPES.items():
        mixer = mamba_lm.get_config(preset).model.mixers.mamba
        for length in LENGTHS:
            yield preset, length, mixer.expand * d_model, mixer.d_state


@pytest.mark.parametrize("preset, length, d_inner, n", list(_scan_cases()))
def test_scan_fits_at_pod_shapes(preset, length, d_inner, n):
    """Both scan kernels (bf16, with z and a keep mask, the largest input sets) fit,
    with channel tiles of at least 768 lanes (N * block_d / 1024 >= 12 vregs per step)."""
    block_l, _, block_d, _ = tiles(length, d_inner, n, dtype=jnp.bfloat16)
    assert block_d >= 768, (preset, block_d)
    for name, fn in (("fwd", scan.fwd_vmem_bytes), ("bwd", scan.bwd_vmem_bytes)):
        check_fits(fn(n, block_l, block_d, dtype=jnp.bfloat16, has_z=True, has_keep=True),
                   (preset, name))


def _attention_cases():
    for preset, (d_model, _, heads, kv_heads, _, _) in transformer_lm.POD_SHAPES.items():
        for length in LENGTHS:
            yield preset, length, d_model // heads, heads // kv_heads
    mixer = long_context.get_config("attention-128k").model.mixers.attention
    yield "attention-128k", 131_072, 128 // mixer.n_heads, mixer.n_heads // mixer.n_kv_heads


@pytest.mark.parametrize("preset, length, head_dim, groups", list(_attention_cases()))
@pytest.mark.parametrize("segments", [False, True])
def test_flash_fits_at_pod_shapes(preset, length, head_dim, groups, segments):
    """The forward, dq and dk/dv kernels at the default (512) blocks fit."""
    block = min(fa.DEFAULT_BLOCK, -(-length // fa.LANES) * fa.LANES)
    spec = fa.Spec(causal=True, window=None, sink=0, scale=1.0, q_len=length,
                   kv_len=length, offset=0, block_q=block, block_k=block, groups=groups,
                   segments=segments)
    assert block == 512
    for name, footprint in fa.vmem_bytes(spec, head_dim, jnp.bfloat16).items():
        check_fits(footprint, (preset, name))


def _delta_cases():
    for preset in mom_lm.POD_SHAPES:
        for mixer in ("mom", "gdn"):
            m = mom_lm.get_config(preset).model.mixers[mixer]
            yield preset, mixer, m.chunk_size, m.head_dim, int(m.head_dim * m.expand_v)


@pytest.mark.parametrize("preset, mixer, chunk, d_k, d_v", list(_delta_cases()))
def test_gated_delta_fits_at_pod_shapes(preset, mixer, chunk, d_k, d_v):
    check_fits(gd.vmem_bytes(chunk, d_k, d_v), (preset, mixer))


def _limits(exported):
    """The scoped VMEM sizes (vmem_limit_bytes) of every Mosaic call in the module."""
    text = exported.mlir_module().replace("\\22", '"')
    return [int(x) for x in re.findall(r'"memory_space":1, "offset": 0, "size": (\d+)', text)]


def test_scan_lowering_carries_the_layout_limit():
    """At d_model 768's d_inner 1536 (bf16, z), the exported forward and backward Mosaic
    calls ask for exactly vmem.limit_bytes of their layouts' footprints (the backward
    above the 16 MiB floor)."""
    b, length, d, n = 1, 256, 1536, 16
    spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
    args = dict(u=spec(b, length, d), delta=spec(b, length, d), A=spec(d, n, dt=jnp.float32),
                B=spec(b, length, n), C=spec(b, length, n), z=spec(b, length, d))

    def loss(a):
        return jnp.sum(selective_scan_pallas(**a, delta_softplus=True,
                                             interpret=False).astype(jnp.float32))

    exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=["tpu"])(args)
    block_l, _, block_d, _ = tiles(length, d, n, dtype=jnp.bfloat16)
    want = [vmem.limit_bytes(fn(n, block_l, block_d, dtype=jnp.bfloat16, has_z=True))
            for fn in (scan.fwd_vmem_bytes, scan.bwd_vmem_bytes)]
    assert sorted(_limits(exported)) == sorted(want)
    assert want[1] > vmem.LIMIT_FLOOR


def test_cost_estimates():
    """The three modules' cost_estimate signatures and their scaling: causal attention
    counts only live tiles; the scan and delta rule scale with the tokens."""
    f = fa.cost_estimate(2, 4, 2048, 2048, 128, causal=False, backward=False, dtype_bytes=2)
    c = fa.cost_estimate(2, 4, 2048, 2048, 128, causal=True, backward=False, dtype_bytes=2)
    assert f.flops == 4 * 2 * 4 * 2048 * 2048 * 128
    assert c.flops == f.flops * 10 // 16          # 10 of the 4 x 4 tiles of 512 are live
    fb = fa.cost_estimate(2, 4, 2048, 2048, 128, causal=False, backward=True, dtype_bytes=2)
    assert fb.flops == f.flops * 7 // 2
    s1 = scan.cost_estimate(8, 2048, 1536, 16, backward=False, dtype_bytes=2)
    s2 = scan.cost_estimate(16, 2048, 1536, 16, backward=False, dtype_bytes=2)
    assert s2.flops == 2 * s1.flops and s2.bytes_accessed == 2 * s1.bytes_accessed
    assert scan.cost_estimate(8, 2048, 1536, 16, backward=True, dtype_bytes=2).flops > s1.flops
    g = gd.cost_estimate(2, 4, 2048, 256, 256, chunk=64, backward=False, dtype_bytes=4)
    gb = gd.cost_estimate(2, 4, 2048, 256, 256, chunk=64, backward=True, dtype_bytes=4)
    assert g.transcendentals == 2 * 4 * 32 * (64 * 64 + 64) and gb.flops == 3 * g.flops
    for est in (f, c, fb, s1, g, gb):
        assert isinstance(est, pl.CostEstimate) and min(
            est.flops, est.transcendentals, est.bytes_accessed) > 0


def test_every_pallas_call_carries_a_cost_estimate():
    """The scan (forward, backward), flash (forward, dq, dk/dv) and gated delta rule
    pallas_calls all pass cost_estimate= (traced only, nothing runs)."""
    from jaxmix.ops.attention_pallas import attention_pallas
    from jaxmix.ops.gated_delta_pallas import gated_delta_rule_pallas
    x = lambda *s: jnp.ones(s, jnp.float32)

    def scan_loss(u):
        return jnp.sum(selective_scan_pallas(u, u, x(32, 4), x(1, 40, 4), x(1, 40, 4),
                                             interpret=False))

    def flash_loss(q):
        return jnp.sum(attention_pallas(q, q, q, causal=True, interpret=False)[0])

    def delta_loss(q):
        return jnp.sum(gated_delta_rule_pallas(q, q, q, x(1, 40, 2), x(1, 40, 2),
                                               interpret=False)[0])

    for loss, arg, calls in ((scan_loss, x(1, 40, 32), 2), (flash_loss, x(1, 40, 2, 16), 3),
                             (delta_loss, x(1, 40, 2, 16), 1)):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(arg))
        assert jaxpr.count("pallas_call") >= calls
        assert jaxpr.count("cost_estimate=CostEstimate(flops=") == calls, loss.__name__
