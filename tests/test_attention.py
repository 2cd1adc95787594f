"""ops.attention: the blocked xla path and the reference, forward and gradients.

Expected outputs, lse and gradients come from tests/masks.py: the mask spelled out
element by element (`visible`) and a dense softmax under it (`masked_attention`),
sharing no code with jaxmix's `mask_of`, so an off-by-one there cannot cancel out.
`attention_reference` (which uses `mask_of`) is itself checked against them once.
Multi-block behaviour is exercised at small L by calling the xla path with small
blocks (32/64); L=1000 uses the default 512 blocks.
"""
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxmix import ops
from jaxmix.ops.attention import attention_reference, choose_impl, default_positions, mask_of
from jaxmix.ops.attention_xla import (BLOCK_K, BLOCK_Q, attention_xla, block_sizes, live_lists,
                                      make_ctx, merge_partials, tiling)
from masks import masked_attention, visible

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


_MASK_ARGS = ("q_segment_ids", "kv_segment_ids", "q_positions", "kv_positions")
_MASKS = {}


def expected_mask(b, l, s, kw):
    """masks.visible [B, L, S] for attention keyword arguments (cached: it loops in
    Python)."""
    arrays = [None if kw.get(n) is None else np.asarray(kw[n]) for n in _MASK_ARGS]
    key = (b, l, s, bool(kw.get("causal")), kw.get("sliding_window"), kw.get("sink", 0),
           tuple(None if a is None else (a.shape, a.tobytes()) for a in arrays))
    if key not in _MASKS:
        q_seg, kv_seg, q_pos, kv_pos = arrays
        _MASKS[key] = visible(b, l, s, causal=bool(kw.get("causal")),
                              window=kw.get("sliding_window"), sink=kw.get("sink", 0),
                              q_seg=q_seg, kv_seg=kv_seg, q_pos=q_pos, kv_pos=kv_pos)
    return _MASKS[key]


def oracle(q, k, v, *, mask, scale=None):
    return masked_attention(q, k, v, mask, scale)


def expected(q, k, v, kw):
    """(out, lse, grads) of `run`'s loss under masks.py's mask: the expected values."""
    mask = expected_mask(q.shape[0], q.shape[1], k.shape[1], kw)
    extra = {"scale": kw["scale"]} if kw.get("scale") is not None else {}
    return run(oracle, q, k, v, dict(mask=jnp.asarray(mask), **extra))


def assert_matches(fn, q, k, v, kw, fwd_tol=FWD_TOL, grad_tol=GRAD_TOL):
    out, lse, grads = run(fn, q, k, v, kw)
    ref_out, ref_lse, ref_grads = expected(q, k, v, kw)
    chex.assert_tree_all_finite((out, grads))
    np.testing.assert_allclose(out, ref_out, atol=fwd_tol, rtol=fwd_tol)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite],
                               atol=fwd_tol, rtol=fwd_tol)
    for g, rg in zip(grads, ref_grads, strict=True):
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
        ref = expected(q, k, v, kw)[0]
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
    # (the reference's own finite gradients on such rows: test_reference_matches_masks)


def test_explicit_positions_and_merge():
    """Rotated K/V blocks with true positions, merged by lse, equal the full attention."""
    b, l, hq, hkv, d = 1, 128, 4, 2, 32
    q, k, v = make_qkv(19, b, l, l, hq, hkv, d)
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    seg = jnp.asarray((np.arange(l) >= 80)[None].astype(np.int32))
    mask = jnp.asarray(expected_mask(b, l, l, dict(causal=True, q_segment_ids=seg,
                                                   kv_segment_ids=seg, sliding_window=70)))
    full, full_lse = masked_attention(q, k, v, mask)

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
    ref_loss = lambda q, k, v: masked_attention(q, k, v, mask)
    g = jax.jit(jax.grad(loss(merged), (0, 1, 2)))(q, k, v)
    rg = jax.jit(jax.grad(loss(ref_loss), (0, 1, 2)))(q, k, v)
    for a, r in zip(g, rg, strict=True):
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


def _mask_kw(b, l, s, causal, window, sink, segments, positions, seed=0):
    """Attention keyword arguments of one small mask configuration: packed segment ids
    (a pair when L != S), positions as a shuffled permutation when `positions`."""
    rng = np.random.default_rng(seed)
    kw = dict(causal=causal, sliding_window=window, sink=sink)
    if segments:
        kv_seg = np.cumsum(rng.random((b, s)) < 0.15, axis=1)
        q_seg = kv_seg[:, s - l:] if l <= s else np.cumsum(rng.random((b, l)) < 0.15, axis=1)
        kw.update(q_segment_ids=jnp.asarray(q_seg, jnp.int32),
                  kv_segment_ids=jnp.asarray(kv_seg, jnp.int32))
    if positions:
        kv_pos = np.stack([rng.permutation(s) for _ in range(b)])
        q_pos = np.stack([rng.permutation(max(l, s))[:l] for _ in range(b)])
        kw.update(q_positions=jnp.asarray(q_pos, jnp.int32),
                  kv_positions=jnp.asarray(kv_pos, jnp.int32))
    return kw


# (causal, window, sink): sink only with a window (a window implies causal)
_MASK_RULES = [(False, None, 0), (True, None, 0), (True, 1, 0), (False, 4, 0), (True, 4, 1),
               (True, 4, 3), (False, 3, 7), (True, 1, 5), (True, 6, 20)]
_MASK_SHAPES = [(12, 12), (7, 19), (19, 7)]


def _assert_mask_of_matches_visible(grid):
    """mask_of runs on numpy arrays here (same expressions, no per-shape compiles)."""
    for (causal, window, sink), (l, s), segments, positions in grid:
        kw = _mask_kw(2, l, s, causal, window, sink, segments, positions)
        want = expected_mask(2, l, s, kw)
        dq, dkv = default_positions(2, l, s)
        q_pos, kv_pos, q_seg, kv_seg = (None if kw.get(n) is None else np.asarray(kw[n])
                                        for n in ("q_positions", "kv_positions",
                                                  "q_segment_ids", "kv_segment_ids"))
        got = mask_of(np.asarray(dq) if q_pos is None else q_pos,
                      np.asarray(dkv) if kv_pos is None else kv_pos, q_seg, kv_seg,
                      causal, window, sink)
        got = np.ones_like(want) if got is None else np.asarray(got)
        np.testing.assert_array_equal(got, want, err_msg=str(((causal, window, sink), (l, s),
                                                              segments, positions)))


def test_mask_of_matches_visible():
    """mask_of (shared by the reference and the xla tiles) against masks.visible: every
    rule at each shape, segments and explicit positions each with every rule."""
    grid = [(r, sh, False, False) for r, sh in itertools.product(_MASK_RULES, _MASK_SHAPES)]
    grid += [(r, _MASK_SHAPES[i % 3], seg, not seg) for i, (r, seg) in
             enumerate(itertools.product(_MASK_RULES, (False, True)))]
    grid += [(r, _MASK_SHAPES[i % 3], True, True) for i, r in enumerate(_MASK_RULES)]
    _assert_mask_of_matches_visible(grid)


@pytest.mark.exhaustive
def test_mask_of_matches_visible_every_combination():
    _assert_mask_of_matches_visible(list(itertools.product(
        _MASK_RULES, _MASK_SHAPES + [(1, 9), (9, 1), (16, 16)], (False, True), (False, True))))


def test_reference_matches_masks():
    """attention_reference (outputs, lse, finite gradients) against masks.py, once: its
    mask is mask_of, checked above; here its softmax, lse and empty rows (L=16, S=24:
    test_public_api_checks_and_auto's shapes, so the expected side compiles once)."""
    q, k, v = make_qkv(41, 1, 16, 24, 4, 2, 16)
    for i, (causal, window, sink, seg, pos) in enumerate([
            (False, None, 0, False, False), (True, 7, 5, True, False),
            (True, 6, 3, False, True)]):
        kw = _mask_kw(1, 16, 24, causal, window, sink, seg, pos, seed=i)
        if seg:  # queries of a segment without keys: output 0, lse -inf, finite grads
            kw["q_segment_ids"] = kw["q_segment_ids"].at[:, ::5].set(-1)
        out, lse, _ = assert_matches(attention_reference, q, k, v, kw)
        if seg:
            np.testing.assert_array_equal(out[:, ::5], 0.0)
            assert np.all(np.isneginf(lse[:, :, ::5]))


def zigzag_positions(l, parts):
    """Token positions in the order of a zigzag ring layout ([B=1, l])."""
    chunks = np.arange(l).reshape(2 * parts, -1)
    order = [c for i in range(parts) for c in (i, 2 * parts - 1 - i)]
    return jnp.asarray(chunks[order].reshape(1, l), jnp.int32)


def _sink_case(name):
    """(q, k, v, kw) of a sink case of test_sink (shapes of test_segment_ids and
    test_cross_lengths_bottom_right, so that the expected side is compiled already).

    segments: GQA 4/2, packed documents; the 70 sink keys end inside a 32-key block and
      lie in documents 0..3 (row 0) or doc 0 (row 1), seen only from those documents.
    l>s: L=260 > S=100 bottom-right (queries at i - 160: the first 160 see no key);
      causal=False, made causal by the window.
    positions: explicit ring-like positions, keys in zigzag order (20 chunks of 13) and
      the queries of a run of them (L=100 < S=260).
    """
    if name == "segments":
        q, k, v = make_qkv(33, 2, 256, 256, 4, 2, 32)
        seg = packed_segments(256)
        return q, k, v, dict(causal=True, sliding_window=30, sink=70, q_segment_ids=seg,
                             kv_segment_ids=seg)
    if name == "l>s":
        q, k, v = make_qkv(34, 1, 260, 100, 4, 2, 32)
        return q, k, v, dict(causal=False, sliding_window=50, sink=20)
    assert name == "positions"
    kv_pos = zigzag_positions(260, 10)
    q, k, v = make_qkv(35, 1, 100, 260, 4, 2, 32)
    return q, k, v, dict(causal=True, sliding_window=24, sink=20,
                         q_positions=kv_pos[:, 130:230], kv_positions=kv_pos)


@pytest.mark.parametrize("name", ["segments", "l>s", "positions"])
def test_sink(name):
    """The xla path with sink keys (small tiles: 64 queries x 32 keys) against masks.py.
    L < S with default positions: test_public_api_checks_and_auto and the hypothesis
    cases; window 1 and other edges: the mask_of and block classification tests."""
    q, k, v, kw = _sink_case(name)
    out, _, _ = assert_matches(xla(), q, k, v, kw)
    without = expected(q, k, v, dict(kw, sink=0))[0]
    assert float(jnp.max(jnp.abs(out - without))) > 0.1  # the sink keys change the output


def _assert_kinds_agree_with_visible(shapes):
    """make_ctx's kind table against masks.visible per tile: a dead block has no visible
    pair, a full one only visible pairs; with default positions and no segments a block
    is dead exactly when it has no visible pair. (Each new shape costs ~1 s of eager
    jnp compiles; the configurations after it are cheap.)"""
    b, bq, bk = 2, 16, 8
    for i, ((causal, window, sink), (l, s), seg, pos) in enumerate(itertools.product(
            _MASK_RULES[1:], shapes, (False, True), (False, True))):
        kw = _mask_kw(b, l, s, causal, window, sink, seg, pos, seed=i)
        t = tiling(l, s, bq, bk)
        kind = np.asarray(make_ctx(t, b, kw.get("q_positions"), kw.get("kv_positions"),
                                   kw.get("q_segment_ids"), kw.get("kv_segment_ids"),
                                   causal, window, sink).kind)
        vis = np.zeros((b, t.nq * t.bq, t.nk * t.bk), bool)
        vis[:, :l, :s] = expected_mask(b, l, s, kw)
        tiles = vis.reshape(b, t.nq, t.bq, t.nk, t.bk)
        any_visible = tiles.any((0, 2, 4))
        msg = str(((causal, window, sink), (l, s), seg, pos))
        assert not (any_visible & (kind == 0)).any(), msg
        rows_real = np.arange(t.nq * t.bq).reshape(t.nq, t.bq) < l
        for qi, kj in zip(*np.nonzero(kind == 1), strict=True):
            assert tiles[:, qi, rows_real[qi], kj].all(), msg
        if not seg and not pos:
            np.testing.assert_array_equal(kind > 0, any_visible, err_msg=msg)


def test_block_classification_agrees_with_visible():
    _assert_kinds_agree_with_visible([(96, 96)])


@pytest.mark.exhaustive
def test_block_classification_agrees_with_visible_more_shapes():
    _assert_kinds_agree_with_visible([(40, 100), (100, 44), (8, 8), (33, 33), (1, 50)])


def test_sink_skips_blocks_between_sink_and_window():
    """L = S = 4096, window 256, sink 64 at the tiles flash_forward picks (256): each
    query block's live key blocks are the sink block and the two window blocks (and
    each key block's live query blocks, for the backward, the two it is recent for,
    all of them for the sink block) - not every block below the diagonal."""
    l, window, sink = 4096, 256, 64
    t = tiling(l, l, *block_sizes(window, BLOCK_Q, BLOCK_K))
    assert (t.bq, t.bk, t.nq, t.nk) == (256, 256, 16, 16)

    def lists(kind):
        order, count = (np.asarray(x) for x in live_lists(kind))
        return [order[i, :count[i]].tolist() for i in range(kind.shape[0])]

    kind = make_ctx(t, 1, None, None, None, None, True, window, sink).kind
    assert lists(kind) == [sorted({0, max(i - 1, 0), i}) for i in range(16)]
    assert lists(kind.T) == [list(range(16))] + [[j, j + 1][:16 - j] for j in range(1, 16)]
    assert all(int(kind[i, 0]) == 2 for i in range(2, 16))  # 64 of its 256 keys visible
    # without sink the first block drops out; with a whole block of sink keys it is full
    kind0 = make_ctx(t, 1, None, None, None, None, True, window, 0).kind
    assert lists(kind0) == [[max(i - 1, 0), i][:min(i + 1, 2)] for i in range(16)]
    kind_full = make_ctx(t, 1, None, None, None, None, True, window, 256).kind
    assert all(int(kind_full[i, 0]) == 1 for i in range(2, 16))
    # documents of 1024 tokens: the sink keys (document 0) are dead for later documents
    seg = jnp.asarray((np.arange(l) // 1024)[None], jnp.int32)
    kind = make_ctx(t, 1, None, None, seg, seg, True, window, sink).kind
    assert lists(kind) == [sorted({0, max(i - 1, 0), i}) if i < 4 else
                           [i - 1, i][i % 4 == 0:] for i in range(16)]


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
    ref32, _, g32 = expected(q, k, v, kw)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    plain = PLAIN_BF16  # the error baseline only (its mask_of: test_mask_of_matches_visible)
    ref16, _, g16 = run(plain, q16, k16, v16, kw)
    out, _, g = run(xla(), q16, k16, v16, kw)
    err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
    assert err(out, ref32) <= 2 * err(ref16, ref32)
    for a, b, r in zip(g, g16, g32, strict=True):
        assert err(a, r) <= 2 * err(b, r)


def test_public_api_checks_and_auto():
    q, k, v = make_qkv(29, 1, 16, 24, 4, 2, 16)
    assert ops.attention.__module__ == "jaxmix.ops.attention"
    assert choose_impl("auto", q, k) == "xla"  # on CPU
    f = jax.jit(ops.attention, static_argnames=("causal", "impl", "return_lse",
                                                "sliding_window", "sink"))
    out, lse = f(q, k, v, causal=True, return_lse=True)
    ref = expected(q, k, v, dict(causal=True))[0]
    np.testing.assert_allclose(out, ref, atol=FWD_TOL, rtol=FWD_TOL)
    chex.assert_shape(lse, (1, 4, 16))
    out = f(q, k, v, sliding_window=5, sink=3)  # sink reaches the (auto: xla) kernels
    ref = expected(q, k, v, dict(sliding_window=5, sink=3))[0]
    np.testing.assert_allclose(out, ref, atol=FWD_TOL, rtol=FWD_TOL)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="needs L == S"):
        ops.attention(q, k, v, segment_ids=jnp.zeros((1, 16), jnp.int32))
    with pytest.raises(ValueError, match="sliding_window"):
        ops.attention(q, k, v, sliding_window=0)
    with pytest.raises(ValueError, match="needs a sliding_window"):
        ops.attention(q, k, v, causal=True, sink=4)
    with pytest.raises(ValueError, match="sink must be >= 0"):
        ops.attention(q, k, v, sliding_window=4, sink=-1)
    with pytest.raises(ValueError, match="impl"):
        ops.attention(q, k, v, impl="fast")


@settings(max_examples=5, deadline=None)
@given(b=st.integers(1, 2), l=st.integers(1, 70), cross=st.booleans(), s=st.integers(1, 70),
       hkv=st.integers(1, 2), g=st.integers(1, 3), d=st.sampled_from([8, 16]),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 30)),
       sink=st.integers(0, 20), segments=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_hypothesis_cases(b, l, cross, s, hkv, g, d, causal, window, sink, segments, seed):
    s = s if cross and not segments else l
    q, k, v = make_qkv(seed, b, l, s, hkv * g, hkv, d)
    kw = dict(causal=causal, sliding_window=window, sink=sink if window else 0)
    if segments:
        rng = np.random.default_rng(seed)
        seg = jnp.asarray(np.cumsum(rng.random((b, l)) < 0.1, axis=1), jnp.int32)
        kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    assert_matches(xla(16, 16), q, k, v, kw)
