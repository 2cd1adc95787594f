"""attention(impl="pallas") in TPU interpret mode against the fp32 reference (small L)."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxmix import ops
from jaxmix.ops.attention import attention_reference
from jaxmix.ops.attention_pallas import attention_pallas
from test_attention import run  # (out, lse, grads) under jit, shared with the xla tests

TPU_INTERPRET = pltpu.InterpretParams()


def make_qkv(seed, b, l, s, hq, hkv, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (b, l, hq, d), dtype),
            jax.random.normal(kk, (b, s, hkv, d), dtype),
            jax.random.normal(kv, (b, s, hkv, d), dtype))


def check(q, k, v, kw, interpret=TPU_INTERPRET, tol=(1e-5, 1e-4)):
    fn = functools.partial(attention_pallas, interpret=interpret)
    out, lse, grads = run(fn, q, k, v, kw)
    ref_out, ref_lse, ref_grads = run(attention_reference, q, k, v, kw)
    chex.assert_tree_all_finite((out, grads))
    np.testing.assert_allclose(out, ref_out, atol=tol[0], rtol=tol[0])
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite],
                               atol=tol[0], rtol=tol[0])
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(g, rg, atol=tol[1], rtol=tol[1])
    return out, lse


@pytest.mark.parametrize("b,l,s,hq,hkv,d,kw", [
    # causal GQA, 2x2 tiles (one skipped), head dim padded 64 -> 128
    (1, 256, 256, 4, 2, 64, dict(causal=True)),
    # decoding-like: one query, ragged S, MQA, full 128 lanes
    (1, 1, 130, 4, 1, 128, dict(causal=True)),
    # bottom-right causal with L > S: the first 90 rows see nothing (0, lse -inf)
    (1, 220, 130, 2, 1, 32, dict(causal=True)),
    # sliding window across tile edges, ragged L
    (1, 300, 300, 1, 1, 32, dict(causal=True, sliding_window=60)),
])
def test_pallas_matches_reference(b, l, s, hq, hkv, d, kw):
    q, k, v = make_qkv(l + s, b, l, s, hq, hkv, d)
    out, lse = check(q, k, v, kw)
    if l > s:
        np.testing.assert_array_equal(out[:, :l - s], 0.0)
        assert np.all(np.isneginf(lse[:, :, :l - s]))


def test_pallas_segments_and_generic_interpreter():
    """Packed documents crossing the 128 blocks, non-causal, ragged L; plain interpret=True."""
    q, k, v = make_qkv(3, 2, 200, 200, 2, 2, 32)
    seg = np.searchsorted(np.array([50, 128, 129, 170]), np.arange(200), side="right")
    seg = jnp.asarray(np.stack([seg, np.arange(200) // 7]), jnp.int32)
    check(q, k, v, dict(causal=False, q_segment_ids=seg, kv_segment_ids=seg), interpret=True)


def test_pallas_bf16_and_public_api():
    q, k, v = make_qkv(5, 1, 128, 128, 2, 1, 64)
    ref32 = attention_reference(q, k, v, causal=True)[0]
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    plain = attention_reference(q16, k16, v16, causal=True, upcast=False)[0]
    out = jax.jit(functools.partial(ops.attention, causal=True, impl="pallas"))(q16, k16, v16)
    assert out.dtype == jnp.bfloat16
    err = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32) - ref32)))
    assert err(out) <= 2 * err(plain)
    with pytest.raises(ValueError, match="positions"):
        ops.attention(q, k, v, impl="pallas", q_positions=jnp.zeros((1, 128), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_lowers_for_tpu(dtype):
    """The forward, dq and dk/dv kernels lower to Mosaic (TPU) without a TPU:
    jax.export runs the Pallas -> Mosaic lowering for platform "tpu" (causal GQA with
    packed segments, so every optional input of the kernels is present)."""
    q, k, v = make_qkv(7, 2, 256, 256, 4, 2, 64, dtype)
    seg = jnp.asarray(np.arange(256) // 100, jnp.int32)[None].repeat(2, 0)

    def loss(q, k, v):
        out, _ = attention_pallas(q, k, v, causal=True, q_segment_ids=seg,
                                  kv_segment_ids=seg, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    exported = jax.export.export(fn, platforms=["tpu"])(q, k, v)
    assert exported.mlir_module().count("tpu_custom_call") == 3
