"""ops.attention: the blocked xla path against the fp32 reference, forward and gradients.

Multi-block behaviour is exercised at small L by calling the xla path with small
blocks (32/64); L=1000 uses the default 512 blocks.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxmix import ops
from jaxmix.ops.attention import attention_reference, choose_impl
from jaxmix.ops.attention_xla import attention_xla, make_ctx, merge_partials, tiling

FWD_TOL = 1e-5
GRAD_TOL = 1e-4


def make_qkv(seed, b, l, s, hq, hkv, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (b, l, hq, d), dtype),
            jax.random.normal(kk, (b, s, hkv, d), dtype),
            jax.random.normal(kv, (b, s, hkv, d), dtype))


def run(fn, q, k, v, kw):
    """(out, lse, grads) under jit: the loss uses out and the finite part of lse."""
    static = {n: a for n, a in kw.items() if not isinstance(a, jax.Array)}
    arrays = {n: a for n, a in kw.items() if isinstance(a, jax.Array)}
    return _run_jit(fn, tuple(sorted(static.items())))(q, k, v, arrays)


@functools.lru_cache(maxsize=None)
def _run_jit(fn, static):
    def go(q, k, v, arrays):
        w = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)

        def loss(q, k, v):
            out, lse = fn(q, k, v, **dict(static), **arrays)
            lse_term = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * 0.5)
            return jnp.sum(out.astype(jnp.float32) * w) + lse_term, (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads

    return jax.jit(go)


def assert_matches(fn, q, k, v, kw, fwd_tol=FWD_TOL, grad_tol=GRAD_TOL):
    out, lse, grads = run(fn, q, k, v, kw)
    ref_out, ref_lse, ref_grads = run(attention_reference, q, k, v, kw)
    chex.assert_tree_all_finite((out, grads))
    np.testing.assert_allclose(out, ref_out, atol=fwd_tol, rtol=fwd_tol)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite],
                               atol=fwd_tol, rtol=fwd_tol)
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(g, rg, atol=grad_tol, rtol=grad_tol)
    return out, lse, grads


@functools.lru_cache(maxsize=None)
def xla(block_q=64, block_k=32):
    return functools.partial(attention_xla, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("l,hq,hkv,d,causal", [
    (1, 4, 1, 32, True), (1, 1, 1, 128, False),
    (130, 1, 1, 32, True), (130, 8, 2, 128, False),
    (256, 8, 2, 32, False), (256, 4, 1, 64, True),
])
def test_matches_reference(l, hq, hkv, d, causal):
    q, k, v = make_qkv(l + hq + d, 2, l, l, hq, hkv, d)
    assert_matches(xla(), q, k, v, dict(causal=causal))


@pytest.mark.parametrize("causal,hq,hkv,d", [(True, 8, 2, 64), (False, 4, 1, 32)])
def test_long_default_blocks(causal, hq, hkv, d):
    q, k, v = make_qkv(3, 1, 1000, 1000, hq, hkv, d)
    assert_matches(attention_xla, q, k, v, dict(causal=causal))


@pytest.mark.parametrize("l,s,causal", [(100, 260, True), (260, 100, True), (70, 200, False)])
def test_cross_lengths_bottom_right(l, s, causal):
    q, k, v = make_qkv(5, 1, l, s, 4, 2, 32)
    out, lse, _ = assert_matches(xla(), q, k, v, dict(causal=causal))
    if causal and l > s:  # queries before the first key (bottom-right alignment) see nothing
        np.testing.assert_array_equal(out[:, :l - s], 0.0)
        assert np.all(np.isneginf(lse[:, :, :l - s]))


def packed_segments(l):
    """Batch row 0: documents crossing 32/64 block edges; row 1: one boundary per token."""
    row0 = np.searchsorted(np.array([50, 64, 65, 130, 200]), np.arange(l), side="right")
    row1 = np.arange(l) // 3
    return jnp.asarray(np.stack([row0, row1]), jnp.int32)


@pytest.mark.parametrize("causal", [True, False])
def test_segment_ids(causal):
    q, k, v = make_qkv(11, 2, 256, 256, 4, 2, 32)
    seg = packed_segments(256)
    kw = dict(causal=causal, q_segment_ids=seg, kv_segment_ids=seg)
    assert_matches(xla(), q, k, v, kw)
    if causal:  # the public API with [B, L] segment ids runs the same path
        f = jax.jit(ops.attention, static_argnames=("causal", "impl"))
        out = f(q, k, v, causal=causal, segment_ids=seg, impl="xla")
        ref = f(q, k, v, causal=causal, segment_ids=seg, impl="reference")
        np.testing.assert_allclose(out, ref, atol=FWD_TOL, rtol=FWD_TOL)


@pytest.mark.parametrize("window,causal", [(1, True), (40, False), (300, True)])
def test_sliding_window(window, causal):
    q, k, v = make_qkv(13, 1, 256, 256, 2, 1, 32)
    assert_matches(xla(), q, k, v, dict(causal=causal, sliding_window=window))


def test_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = make_qkv(17, 2, 96, 96, 2, 2, 32)
    q_seg = jnp.asarray(np.repeat([[0, 1, 9]], 32, axis=1).reshape(1, 96).repeat(2, 0))
    kv_seg = jnp.asarray(np.repeat([[0, 1, 2]], 32, axis=1).reshape(1, 96).repeat(2, 0))
    kw = dict(causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    out, lse, grads = assert_matches(xla(), q, k, v, kw)
    np.testing.assert_array_equal(out[:, 64:], 0.0)
    assert np.all(np.isneginf(lse[:, :, 64:]))
    np.testing.assert_array_equal(grads[0][:, 64:], 0.0)
    out_r, _, grads_r = run(attention_reference, q, k, v, kw)
    chex.assert_tree_all_finite(grads_r)


def test_explicit_positions_and_merge():
    """Rotated K/V blocks with true positions, merged by lse, equal the full attention."""
    b, l, hq, hkv, d = 1, 128, 4, 2, 32
    q, k, v = make_qkv(19, b, l, l, hq, hkv, d)
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    seg = jnp.asarray((np.arange(l) >= 80)[None].astype(np.int32))
    full, full_lse = attention_reference(q, k, v, causal=True, q_segment_ids=seg,
                                         kv_segment_ids=seg, sliding_window=70)

    def merged(q, k, v):
        parts = []
        for sl in (slice(64, 128), slice(0, 64)):  # later block first, as a ring would
            parts.append(attention_xla(q, k[:, sl], v[:, sl], causal=True, q_positions=pos,
                                       kv_positions=pos[:, sl], q_segment_ids=seg,
                                       kv_segment_ids=seg[:, sl], sliding_window=70,
                                       block_q=32, block_k=32))
        return merge_partials(*parts[0], *parts[1])

    merged = jax.jit(merged)
    out, lse = merged(q, k, v)
    np.testing.assert_allclose(out, full, atol=FWD_TOL, rtol=FWD_TOL)
    np.testing.assert_allclose(lse, full_lse, atol=FWD_TOL, rtol=FWD_TOL)
    w = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v)[0] * w))
    ref_loss = lambda q, k, v: attention_reference(
        q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg, sliding_window=70)
    g = jax.jit(jax.grad(loss(merged), (0, 1, 2)))(q, k, v)
    rg = jax.jit(jax.grad(loss(ref_loss), (0, 1, 2)))(q, k, v)
    for a, r in zip(g, rg):
        np.testing.assert_allclose(a, r, atol=GRAD_TOL, rtol=GRAD_TOL)


def test_skips_dead_blocks():
    t = tiling(1024, 1024, 256, 256)
    kind = make_ctx(t, 1, None, None, None, None, True, None).kind
    # dead above the diagonal, full below, partial (masked) on it
    np.testing.assert_array_equal(kind, np.tril(np.ones((4, 4)), -1) + 2 * np.eye(4))
    kind = make_ctx(t, 1, None, None, None, None, True, 256).kind
    assert int((np.asarray(kind) > 0).sum()) == 7  # diagonal + one band below
    seg = jnp.asarray((np.arange(1024) // 256)[None], jnp.int32)
    kind = make_ctx(t, 1, None, None, seg, seg, False, None).kind
    np.testing.assert_array_equal(kind, np.eye(4))  # one full block per document


def test_memory_is_linear():
    l = 4096
    q, k, v = make_qkv(0, 1, l, l, 1, 1, 64)
    fb = jax.jit(jax.grad(lambda q, k, v: ops.attention(q, k, v, causal=True, impl="xla").sum(),
                          (0, 1, 2)))
    temp = fb.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    assert temp < l * l * 4 / 8, temp


PLAIN_BF16 = functools.partial(attention_reference, upcast=False)


def test_bf16_within_twice_reference_error():
    q, k, v = make_qkv(23, 1, 256, 256, 4, 2, 64)
    seg = packed_segments(256)[:1]
    kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    ref32, _, g32 = run(attention_reference, q, k, v, kw)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    plain = PLAIN_BF16
    ref16, _, g16 = run(plain, q16, k16, v16, kw)
    out, _, g = run(xla(), q16, k16, v16, kw)
    err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
    assert err(out, ref32) <= 2 * err(ref16, ref32)
    for a, b, r in zip(g, g16, g32):
        assert err(a, r) <= 2 * err(b, r)


def test_public_api_checks_and_auto():
    q, k, v = make_qkv(29, 1, 16, 24, 4, 2, 16)
    assert ops.attention.__module__ == "jaxmix.ops.attention"
    assert choose_impl("auto", q, k) == "xla"  # on CPU
    f = jax.jit(ops.attention, static_argnames=("causal", "impl", "return_lse"))
    out, lse = f(q, k, v, causal=True, return_lse=True)
    ref = f(q, k, v, causal=True, impl="reference")
    np.testing.assert_allclose(out, ref, atol=FWD_TOL, rtol=FWD_TOL)
    chex.assert_shape(lse, (1, 4, 16))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="needs L == S"):
        ops.attention(q, k, v, segment_ids=jnp.zeros((1, 16), jnp.int32))
    with pytest.raises(ValueError, match="sliding_window"):
        ops.attention(q, k, v, sliding_window=0)
    with pytest.raises(ValueError, match="impl"):
        ops.attention(q, k, v, impl="fast")


@settings(max_examples=5, deadline=None)
@given(b=st.integers(1, 2), l=st.integers(1, 70), cross=st.booleans(), s=st.integers(1, 70),
       hkv=st.integers(1, 2), g=st.integers(1, 3), d=st.sampled_from([8, 16]),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 30)),
       segments=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_hypothesis_cases(b, l, cross, s, hkv, g, d, causal, window, segments, seed):
    s = s if cross and not segments else l
    q, k, v = make_qkv(seed, b, l, s, hkv * g, hkv, d)
    kw = dict(causal=causal, sliding_window=window)
    if segments:
        rng = np.random.default_rng(seed)
        seg = jnp.asarray(np.cumsum(rng.random((b, l)) < 0.1, axis=1), jnp.int32)
        kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    assert_matches(xla(16, 16), q, k, v, kw)
