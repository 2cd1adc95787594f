"""ops.attention(impl="auto") on GPU, checked on CPU: which route each call takes, the
packed (segment-run) description cuDNN is given, the warning and fallback when cuDNN
refuses a call, and that the packed route lowers to cuDNN's custom call for "cuda".

The backend is patched to "gpu" and jax's cuDNN call (`_cudnn_sdpa`) is replaced by a
recorder that computes what cuDNN computes from the arguments it is given: the
packed layout's sequences come only from the run lengths and offsets, with causal
masks and the window applied inside each sequence, and query rows outside every
sequence giving 0.
"""
import importlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masks import masked_attention, visible

A = importlib.import_module("jaxmix.ops.attention")

BF16_TOL = 3e-2


def qkv(seed, b, l, s, hq, hkv, d, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, l, hq, d), jnp.float32).astype(dtype),
            jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype),
            jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(dtype))


def docs(*rows):
    """Segment ids [B, L] from per-row document lengths (ids 1, 2, ...; a trailing 0
    length entry as a negative number marks that many padding tokens, id 0)."""
    out = []
    for lengths in rows:
        ids = []
        for i, n in enumerate(lengths):
            ids += [0] * -n if n < 0 else [i + 1] * n
        out.append(ids)
    return jnp.asarray(out, jnp.int32)


PACKED = docs([5, 9, 3, 7, -8], [32], [1, 1, 30], [10, 10, 12])  # B=4, L=32


def runs_mask(seqlen_BM, offset_BN, l_len, causal, window):
    """bool [B, L, L] cuDNN's packed layout applies: token t belongs to sequence m when
    offset[m] <= t < offset[m] + seqlen[m]; query and key must share a sequence, and
    causal / window compare their places inside it. Traceable (jnp)."""
    seqlen = jnp.asarray(seqlen_BM)
    offset = jnp.asarray(offset_BN)[:, :seqlen.shape[1]]
    t = jnp.arange(l_len)
    inside_BMT = ((offset[:, :, None] >= 0) & (seqlen[:, :, None] >= 0)
                  & (offset[:, :, None] <= t) & (t < offset[:, :, None] + seqlen[:, :, None]))
    which_BT = jnp.where(inside_BMT.any(1), jnp.argmax(inside_BMT, axis=1), -1)
    mask = (which_BT[:, :, None] == which_BT[:, None, :]) & (which_BT[:, :, None] >= 0)
    i, j = t[:, None], t[None, :]
    if causal or window:
        mask &= j <= i
    if window:
        mask &= i - j < window
    return mask


class Recorder:
    """Stands in for `_cudnn_sdpa`: records each call's arguments and returns what
    cuDNN computes from them (dense fp32 softmax under the mask cuDNN would apply)."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, *, scale, causal, window, seqlen_BM=None, offset_BN=None):
        packed = seqlen_BM is not None
        self.calls.append(dict(packed=packed, causal=causal, window=window,
                               kv_heads=k.shape[2]))
        l_len, s_len = q.shape[1], k.shape[1]
        if not packed:
            i, j = np.arange(l_len)[:, None], np.arange(s_len)[None, :]
            mask = np.ones((l_len, s_len), bool)
            if causal:
                mask &= j <= i  # top-left aligned
            if window:
                mask &= i - j < window
            mask = np.broadcast_to(mask, (q.shape[0], l_len, s_len))
            return masked_attention(q, k, v, mask, scale)[0]

        mask = runs_mask(seqlen_BM, offset_BN, l_len, causal, window)
        return masked_attention(q, k, v, mask, scale)[0]


@pytest.fixture
def on_gpu(monkeypatch):
    """The backend reads as "gpu" and cuDNN is the recorder; yields the recorder."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    rec = Recorder()
    monkeypatch.setattr(A, "_cudnn_sdpa", rec)
    return rec


def close(a, b, tol=BF16_TOL):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=tol, rtol=tol)


def test_routes_on_gpu(on_gpu, monkeypatch):
    """Which implementation "auto" picks on GPU for each combination of arguments."""
    q, k, _ = qkv(0, 2, 32, 32, 4, 2, 64)
    q_short = q[:, :16]
    seg = PACKED[:2]
    pos = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))
    cases = [
        ("cudnn", q, k, dict(causal=True)),
        ("cudnn", q, k, dict()),
        ("cudnn", q, k, dict(causal=True, segment_ids=seg)),
        ("cudnn", q, k, dict(segment_ids=seg)),
        ("cudnn", q, k, dict(causal=True, segment_ids=(seg, seg))),
        ("xla", q, k, dict(causal=True, segment_ids=(seg, seg + 0))),
        ("cudnn", q, k, dict(sliding_window=8)),
        ("cudnn", q, k, dict(causal=True, segment_ids=seg, sliding_window=8)),
        ("xla", q, k, dict(causal=True, sliding_window=8, sink=2)),
        ("xla", q, k, dict(causal=True, return_lse=True)),
        ("xla", q, k, dict(causal=True, segment_ids=seg, return_lse=True)),
        ("xla", q, k, dict(causal=True, q_positions=pos, kv_positions=pos)),
        ("xla", q, k, dict(causal=True, segment_ids=seg, q_positions=pos, kv_positions=pos)),
        ("xla", q_short, k, dict(causal=True)),  # cuDNN aligns causal masks top-left
        ("xla", q_short, k, dict(sliding_window=4)),
        ("cudnn", q_short, k, dict()),
        ("xla", q.astype(jnp.float32), k.astype(jnp.float32), dict(causal=True)),
        ("xla", jnp.zeros((2, 32, 4, 136), jnp.bfloat16),
         jnp.zeros((2, 32, 2, 136), jnp.bfloat16), dict(causal=True)),
    ]
    for want, qq, kk, kw in cases:
        sw = kw.pop("sliding_window", None)
        got = A.choose_impl("auto", qq, kk, sliding_window=sw, **kw)
        assert got == want, (want, got, kw, sw)
    assert A.choose_impl("xla", q, k, causal=True) == "xla"
    assert A.choose_impl("reference", q, k, causal=True) == "reference"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert A.choose_impl("auto", q, k, causal=True, segment_ids=seg) == "xla"


def test_attention_calls_cudnn_with_the_right_mask(on_gpu):
    """attention() hands cuDNN the dense call for plain causal / window attention and
    the packed call (causal, window inside each run) for segment ids; under GQA the
    packed call gets K/V with as many heads as jax's packed offsets need."""
    q, k, v = qkv(1, 2, 32, 32, 4, 2, 16)
    seg = PACKED[:2]
    A.attention(q, k, v, causal=True)
    A.attention(q, k, v, sliding_window=6)
    A.attention(q, k, v, causal=True, segment_ids=seg)
    A.attention(q, k, v, segment_ids=seg, sliding_window=6)
    A.attention(q, k, v, causal=True, return_lse=True)  # xla: no call
    kv_heads = 2 if A._packed_kv_offsets_use_kv_heads() else 4
    assert on_gpu.calls == [
        dict(packed=False, causal=True, window=None, kv_heads=2),
        dict(packed=False, causal=True, window=6, kv_heads=2),
        dict(packed=True, causal=True, window=None, kv_heads=kv_heads),
        dict(packed=True, causal=True, window=6, kv_heads=kv_heads)]


def test_segment_runs_describe_the_segment_mask_exactly():
    """Run lengths / offsets, as cuDNN applies them (`runs_mask`), give exactly the
    segment mask (ids equal, with causal and window) of the independent `visible`, on
    rows with several documents, one document, single-token documents and padding."""
    seg = PACKED
    b, l_len = seg.shape
    seqlen, offset, fits = A.segment_runs(seg, 8)
    assert bool(fits)
    np.testing.assert_array_equal(seqlen[0], [5, 9, 3, 7, 8, -1, -1, -1])
    np.testing.assert_array_equal(offset[0], [0, 5, 14, 17, 24, -1, -1, -1, -1])
    np.testing.assert_array_equal(seqlen[1], [32] + [-1] * 7)
    np.testing.assert_array_equal(offset[1], [0] + [-1] * 8)
    for causal, window in ((False, None), (True, None), (True, 4), (False, 3)):
        want = visible(b, l_len, l_len, causal=causal, window=window, q_seg=np.asarray(seg),
                       kv_seg=np.asarray(seg))
        got = runs_mask(seqlen, offset, l_len, causal, window)
        np.testing.assert_array_equal(np.asarray(got), want)
    # exactly as many runs as slots still fits; one more, or an id in two runs, does not
    assert bool(A.segment_runs(seg, 5)[2])
    assert not bool(A.segment_runs(seg, 4)[2])
    split = seg.at[3, 30:].set(1)  # document 1 again after documents 2 and 3
    assert not bool(A.segment_runs(split, 8)[2])


@pytest.mark.parametrize("hkv", [4, 1])
def test_packed_route_matches_the_xla_path(on_gpu, hkv):
    """Forward and gradients of the packed cuDNN route (recorder) match impl="xla" under
    jit, for causal and sliding-window masks, MHA and MQA."""
    q, k, v = qkv(2, 4, 32, 32, 4, hkv, 16)
    seg = PACKED
    for kw in (dict(causal=True), dict(causal=True, sliding_window=5), dict()):
        def loss(q, k, v, impl):
            o = A.attention(q, k, v, segment_ids=seg, impl=impl, **kw)
            return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(16.0))), o

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                    static_argnames="impl")
        (_, out), grads = f(q, k, v, "auto")
        (_, ref), ref_grads = f(q, k, v, "xla")
        close(out, ref)
        for g, r in zip(grads, ref_grads, strict=True):
            close(g, r, 0.1)
    assert on_gpu.calls and all(c["packed"] for c in on_gpu.calls)


def test_packed_route_falls_back_at_run_time(on_gpu, monkeypatch):
    """Rows whose ids cuDNN's runs cannot express (too many runs for
    CUDNN_MAX_SEGMENTS, or an id in two runs) take the xla branch of the run-time cond:
    the output is impl="xla"'s, not what cuDNN would compute from the runs."""
    q, k, v = qkv(3, 4, 32, 32, 4, 2, 16)
    monkeypatch.setattr(A, "CUDNN_MAX_SEGMENTS", 4)
    split = PACKED.at[3, 30:].set(1)
    f = jax.jit(lambda q, k, v, s: A.attention(q, k, v, causal=True, segment_ids=s))
    for seg in (PACKED, split):
        ref = A.attention(q, k, v, causal=True, segment_ids=seg, impl="xla")
        close(f(q, k, v, seg), ref)
        seqlen, offset, fits = A.segment_runs(seg, 4)
        assert not bool(fits)
        runs = masked_attention(q, k, v, runs_mask(seqlen, offset, 32, True, None))[0]
        assert float(jnp.max(jnp.abs(runs.astype(jnp.float32) - ref))) > 0.1
    assert on_gpu.calls  # the cuDNN branch was traced all the same


def test_packed_route_under_scan_remat_and_grad(on_gpu):
    """The packed route (its run-time cond) works inside jax.checkpoint, lax.scan over layers and jax.grad, as the LM's blocks run it."""
    q, k, v = qkv(6, 4, 32, 32, 4, 2, 16)

    def layer(x, seg):
        return A.attention(x, k, v, causal=True, segment_ids=seg).astype(x.dtype), None

    def loss(q, seg):
        body = jax.checkpoint(lambda x, _: layer(x, seg))
        y, _ = jax.lax.scan(body, q, None, length=2)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    g = jax.jit(jax.grad(loss))
    for seg in (PACKED, PACKED.at[3, 30:].set(1)):
        ref = jax.grad(lambda q: jnp.sum(jax.lax.scan(
            lambda x, _: (A.attention(x, k, v, causal=True, segment_ids=seg,
                                      impl="xla").astype(x.dtype), None),
            q, None, length=2)[0].astype(jnp.float32) ** 2))(q)
        close(g(q, seg), ref, 0.1)


def test_cudnn_refusal_warns_once_and_falls_back(on_gpu, monkeypatch, caplog):
    """When jax's cuDNN attention raises while tracing, attention() logs one warning
    naming the reason and the xla fallback, and returns the xla result; the same
    reason is not logged again."""
    def refuse(*args, **kw):
        raise NotImplementedError("Packed layout requires a GPU with at least Hopper")

    monkeypatch.setattr(A, "_cudnn_sdpa", refuse)
    monkeypatch.setattr(A, "_warned", set())
    q, k, v = qkv(4, 2, 32, 32, 4, 2, 16)
    seg = PACKED[:2]
    ref = A.attention(q, k, v, causal=True, segment_ids=seg, impl="xla")
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        for _ in range(2):
            close(A.attention(q, k, v, causal=True, segment_ids=seg), ref)
        close(jax.jit(lambda q, k, v: A.attention(q, k, v, causal=True,
                                                  segment_ids=seg))(q, k, v), ref)
    records = [r for r in caplog.records if r.name == A.__name__]
    assert len(records) == 1, [r.getMessage() for r in records]
    msg = records[0].getMessage()
    assert "NotImplementedError" in msg and "Hopper" in msg and "xla" in msg
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        A.attention(q, k, v, causal=True)  # another case: reported once too
    assert len([r for r in caplog.records if r.name == A.__name__]) == 2


FMHA_CALL = re.compile(r"stablehlo\.custom_call @__cudnn\$(fmhaSoftmax\w*)\(")


def test_packed_route_lowers_to_the_cudnn_custom_call(monkeypatch):
    """jax.export for platform "cuda" lowers the packed route (forward, and forward +
    backward under grad) to cuDNN's fused-attention custom calls with the packed
    layout (max_seg_per_batch = CUDNN_MAX_SEGMENTS), the per-run causal (padding)
    mask and the sliding window. Off a GPU jax cannot read the cuDNN version or the
    compute capability, so those two checks are patched (cuDNN 9.8, Hopper)."""
    from jax._src.cudnn import fused_attention_stablehlo as fused
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90800)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)
    checks = [jax.export.DisabledSafetyCheck.custom_call(f"__cudnn${name}")
              for name in ("fmhaSoftmax", "fmhaSoftmaxBackward")]
    q, k, v = qkv(5, 2, 256, 256, 4, 2, 64)
    seg = jnp.zeros((2, 256), jnp.int32)

    def lowered(fn):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                     disabled_checks=checks)(q, k, v, seg)
        return exported.mlir_module()

    def fwd(q, k, v, seg, window=None):
        return A.attention(q, k, v, causal=True, segment_ids=seg, sliding_window=window)

    def loss(q, k, v, seg):
        return jnp.sum(fwd(q, k, v, seg).astype(jnp.float32))

    text = lowered(fwd)
    assert FMHA_CALL.findall(text) == ["fmhaSoftmax"]
    assert "PADDING_CAUSAL" in text
    kv_heads = 2 if A._packed_kv_offsets_use_kv_heads() else 4  # GQA: 4 query heads
    assert f"(tensor<2x256x4x64xbf16>, tensor<2x256x{kv_heads}x64xbf16>, " in text
    assert f"max_seg_per_batch\\22: {min(A.CUDNN_MAX_SEGMENTS, 256)}" in text
    text = lowered(jax.grad(loss, argnums=(0, 1, 2)))
    assert sorted(FMHA_CALL.findall(text)) == ["fmhaSoftmax", "fmhaSoftmaxBackward"]
    text = lowered(lambda q, k, v, seg: fwd(q, k, v, seg, window=64))
    assert "sliding_window_length\\22: 64" in text
    text = lowered(lambda q, k, v, seg: A.attention(q, k, v, causal=True))
    assert FMHA_CALL.findall(text) == ["fmhaSoftmax"]
    assert "\\22mask_type\\22: \\22CAUSAL\\22" in text
    assert "max_seg_per_batch\\22: 1," in text
