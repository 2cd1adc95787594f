"""attention(impl="pallas") in interpret mode, forward and gradients, against the
independent masks of tests/masks.py (via test_attention's `assert_matches`).

Multi-block grids at small L come from small blocks (64, or 32 x 128 with segment ids,
whose TPU layout needs 128-multiples of block_k). Cases run in TPU interpret mode or,
where the grid is larger, in the faster generic interpreter (interpret=True); the full
sink x window x L != S grid is marked exhaustive.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxmix import ops
from jaxmix.ops.attention import attention_reference
from jaxmix.ops.attention_pallas import attention_pallas
from kernels_pallas import flash_attention as fa
from masks import masked_attention, visible
from test_attention import assert_matches  # (out, lse, grads) checked against masks.py

TPU_INTERPRET = pltpu.InterpretParams()
GENERIC = True  # the generic Pallas interpreter: same kernels, cheaper per grid step


def make_qkv(seed, b, l, s, hq, hkv, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (b, l, hq, d), dtype),
            jax.random.normal(kk, (b, s, hkv, d), dtype),
            jax.random.normal(kv, (b, s, hkv, d), dtype))


def segment_ids(b, l, s, doc):
    """(q_seg [b, l], kv_seg [b, s]): packed documents by position (query row r sits at
    r + s - l), batch row n cut every doc + 13 n positions, shifted by 7 n."""
    def ids(pos, row):
        return (pos + 7 * row) // (doc + 13 * row)
    return (jnp.asarray([ids(np.arange(l) + s - l, r) for r in range(b)], jnp.int32),
            jnp.asarray([ids(np.arange(s), r) for r in range(b)], jnp.int32))


def check(q, k, v, kw, interpret=TPU_INTERPRET, segments=None):
    """Checks Pallas out, lse and grads against masks.py (segments=doc packs documents
    of about doc keys); returns (out, lse)."""
    if segments:
        q_seg, kv_seg = segment_ids(q.shape[0], q.shape[1], k.shape[1], segments)
        kw = dict(kw, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    return assert_matches(functools.partial(attention_pallas, interpret=interpret), q, k, v,
                          kw)[:2]


@pytest.mark.parametrize("b,l,s,hq,hkv,d,kw", [
    # causal GQA, 2x2 tiles of 128 (one skipped, one mask-free), head dim 64 -> 128
    (1, 256, 256, 4, 2, 64, dict(causal=True, block_q=128, block_k=128)),
    # decoding-like: one query, ragged S, MQA, full 128 lanes
    (1, 1, 130, 4, 1, 128, dict(causal=True)),
    # bottom-right causal with L > S: the first 90 rows see nothing (0, lse -inf)
    (1, 220, 130, 2, 1, 32, dict(causal=True)),
    # sliding window across tile edges, ragged L
    (1, 300, 300, 1, 1, 32, dict(causal=True, sliding_window=60, block_q=128, block_k=128)),
])
def test_pallas_matches_masks(b, l, s, hq, hkv, d, kw):
    q, k, v = make_qkv(l + s, b, l, s, hq, hkv, d)
    out, lse = check(q, k, v, kw)
    if l > s:
        np.testing.assert_array_equal(out[:, :l - s], 0.0)
        assert np.all(np.isneginf(lse[:, :, :l - s]))


SMALL = dict(block_q=64, block_k=64)
SEG_BLOCKS = dict(block_q=32, block_k=128)


@pytest.mark.parametrize("b,l,s,hq,hkv,kw,segments,interpret", [
    pytest.param(2, 256, 256, 1, 1, dict(causal=True), 50, TPU_INTERPRET,
                 id="causal-segments"),
    # sink=0: the plain window
    pytest.param(1, 300, 300, 2, 2, dict(causal=True, sliding_window=60, sink=0, **SEG_BLOCKS),
                 70, GENERIC, id="window-segments"),
    pytest.param(1, 130, 300, 2, 1, dict(causal=True, **SMALL), None, GENERIC,
                 id="causal-L<S"),
    pytest.param(1, 300, 130, 2, 1, dict(causal=True, **SMALL), None, GENERIC,
                 id="causal-L>S", marks=pytest.mark.exhaustive),
    # 8x8 tiles; the last query block reads key blocks {0, 1} (sink 100 = 1.56 blocks)
    # and {5, 6, 7} (window), not 2-4
    pytest.param(1, 512, 512, 4, 2, dict(causal=True, sliding_window=90, sink=100, **SMALL),
                 None, GENERIC, id="sink-window-gqa"),
    pytest.param(1, 512, 512, 4, 2, dict(causal=True, sliding_window=90, sink=0, **SMALL),
                 None, GENERIC, id="sink0-window-gqa", marks=pytest.mark.exhaustive),
    # a chunk of 100 queries at the end of 512 keys (bottom-right), sink and window
    pytest.param(1, 100, 512, 1, 1, dict(causal=True, sliding_window=90, sink=100, **SMALL),
                 None, GENERIC, id="sink-window-L<S", marks=pytest.mark.exhaustive),
])
def test_pallas_masks_multi_block(b, l, s, hq, hkv, kw, segments, interpret):
    q, k, v = make_qkv(l + 3 * s, b, l, s, hq, hkv, 32)
    check(q, k, v, kw, interpret, segments)


def test_pallas_sink_public_api():
    """ops.attention(impl="pallas", sink=...) in TPU interpret mode with the default
    blocks (512, so the whole problem is one partially visible tile: sink 70 and
    window 100 masked inside it; multi-block sink/window grids run above)."""
    q, k, v = make_qkv(11, 1, 512, 512, 2, 1, 32)
    fn = functools.partial(ops.attention, impl="pallas", return_lse=True)
    assert_matches(fn, q, k, v, dict(causal=True, sliding_window=100, sink=70))


@pytest.mark.exhaustive
@pytest.mark.parametrize("l,s", [(256, 256), (200, 330), (330, 200)])
@pytest.mark.parametrize("window,sink", [(1, 0), (1, 1), (50, 64), (50, 100), (200, 30),
                                         (90, 1000)])
@pytest.mark.parametrize("segments", [None, 40])
def test_pallas_sink_window_grid(l, s, window, sink, segments):
    q, k, v = make_qkv(window + sink, 1, l, s, 4, 2, 32)
    blocks = SEG_BLOCKS if segments else SMALL
    check(q, k, v, dict(causal=True, sliding_window=window, sink=sink, **blocks), GENERIC,
          segments)


def _tiles(l, s, bq, bk, window, sink):
    """bool [nq, nk]: tiles holding a visible (query, key) pair, from masks.visible."""
    mask = visible(1, l, s, causal=True, window=window, sink=sink)[0]
    nq, nk = -(-l // bq), -(-s // bk)
    return np.array([[mask[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()
                      for j in range(nk)] for i in range(nq)])


@pytest.mark.parametrize("l,s,bq,bk,window,sink", [
    (512, 512, 64, 64, 90, 100),   # sink blocks {0, 1}, up to 3 dead blocks, then window
    (512, 512, 64, 64, 90, 0),     # no sink: the window range only
    (100, 512, 64, 64, 90, 100),   # L < S, bottom-right
    (500, 300, 32, 128, 50, 130),  # L > S (early query blocks see nothing), ragged
    (512, 512, 64, 64, 200, 1000),  # the sink covers every key: causal
])
def test_index_maps_fetch_only_live_blocks(l, s, bq, bk, window, sink):
    """The forward / dq kv index map gives a live step j its own block j and a dead step
    a repeat of a neighbouring live block, so the distinct blocks fetched (consecutive
    repeats issue no DMA) are exactly the live ones; `_live` agrees tile by tile; the
    dk/dv kernel's query range [lo, hi] is exactly each key block's live query blocks;
    `_full` (the mask-free branch) holds exactly on the tiles with every pair visible."""
    spec = fa.Spec(causal=True, window=window, sink=sink, scale=1.0, q_len=l, kv_len=s,
                   offset=s - l, block_q=bq, block_k=bk, groups=1, segments=False)
    tiles = _tiles(l, s, bq, bk, window, sink)
    mask = visible(1, l, s, causal=True, window=window, sink=sink)[0]
    nq, nk = tiles.shape
    _, kv_map = fa._q_major_maps(spec, nk)
    for i in range(nq):
        fetched = [int(kv_map(0, 0, i, j)[2]) for j in range(nk)]
        live = [int(j) for j in np.flatnonzero(tiles[i])]
        assert [bool(fa._live(spec, i, j)) for j in range(nk)] == list(tiles[i]), i
        assert [fetched[j] for j in live] == live, (i, fetched)
        assert fetched == sorted(fetched), (i, fetched)
        assert sorted(set(fetched)) == (live or fetched[:1]), (i, fetched)
    for j in range(nk):
        live = np.flatnonzero(tiles[:, j])
        if live.size:
            lo, hi = (int(x) for x in fa._q_range(spec, j, nq))
            assert list(live) == list(range(lo, hi + 1)), (j, lo, hi)
    for i in range(nq):
        for j in range(nk):
            rows, cols = slice(i * bq, (i + 1) * bq), slice(j * bk, (j + 1) * bk)
            all_visible = bool(mask[rows, cols].all())
            full = bool(fa._full(spec, i, j))
            if (i + 1) * bq <= l:   # tiles of real rows: mask-free exactly when all visible
                assert full == (all_visible and (j + 1) * bk <= s), (i, j)
            else:                   # padded rows are never read back
                assert not full or all_visible, (i, j)
    if (l, s, bq, window, sink) == (512, 512, 64, 90, 100):
        assert [int(kv_map(0, 0, nq - 1, j)[2]) for j in range(nk)] == [0, 1, 5, 5, 5, 5, 6, 7]


def test_pallas_segments_and_generic_interpreter():
    """Packed documents crossing the 128 blocks, non-causal, ragged L; plain interpret=True."""
    q, k, v = make_qkv(3, 2, 200, 200, 2, 2, 32)
    seg = np.searchsorted(np.array([50, 128, 129, 170]), np.arange(200), side="right")
    seg = jnp.asarray(np.stack([seg, np.arange(200) // 7]), jnp.int32)
    check(q, k, v, dict(causal=False, q_segment_ids=seg, kv_segment_ids=seg), interpret=True)


def test_pallas_bf16_and_public_api():
    q, k, v = make_qkv(5, 1, 128, 128, 2, 1, 64)
    ref32 = masked_attention(q, k, v, visible(1, 128, 128, causal=True))[0]
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    # the error yardstick: the same causal attention computed plainly in bf16
    plain = attention_reference(q16, k16, v16, causal=True, upcast=False)[0]
    out = jax.jit(functools.partial(ops.attention, causal=True, impl="pallas"))(q16, k16, v16)
    assert out.dtype == jnp.bfloat16
    err = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32) - ref32)))
    assert err(out) <= 2 * err(plain)
    with pytest.raises(ValueError, match="positions"):
        ops.attention(q, k, v, impl="pallas", q_positions=jnp.zeros((1, 128), jnp.int32))


@pytest.mark.parametrize("dtype,kw", [
    (jnp.float32, dict(causal=True)),
    (jnp.bfloat16, dict(causal=True)),
    (jnp.bfloat16, dict(causal=True, sliding_window=90, sink=100)),
])
def test_pallas_lowers_for_tpu(dtype, kw):
    """The forward, dq and dk/dv kernels lower to Mosaic (TPU) without a TPU:
    jax.export runs the Pallas -> Mosaic lowering for platform "tpu" (causal GQA with
    packed segments, so every optional input of the kernels is present; with a sink,
    the two-run kv index map)."""
    q, k, v = make_qkv(7, 2, 256, 256, 4, 2, 64, dtype)
    seg = jnp.asarray(np.arange(256) // 100, jnp.int32)[None].repeat(2, 0)

    def loss(q, k, v):
        out, _ = attention_pallas(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                  interpret=False, **kw)
        return jnp.sum(out.astype(jnp.float32))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    exported = jax.export.export(fn, platforms=["tpu"])(q, k, v)
    assert exported.mlir_module().count("tpu_custom_call") == 3
