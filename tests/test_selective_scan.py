"""ops.selective_scan: the chunked xla path against the plain-jnp reference.

Errors are max |impl - reference| over an array divided by max |reference| of that
array (so "1e-5" means 1e-5 of the array's own scale); forward (y and the last
state) must agree within 1e-5 and every gradient within 1e-4 in fp32. reverse=True is
checked against the forward reference run on inputs flipped along time (`flipped`),
then every implementation's reverse scan against the reference's. Segment ids (packed
documents) are checked against the scan run separately on every segment
(`per_segment`), and the kernels' against the reference with the same ids.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmix import ops
from jaxmix.ops import _impl
from jaxmix.ops.scan_xla import selective_scan_xla
from jaxmix.ops.selective_scan import selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
TIME_INDEXED = ("u", "delta", "B", "C", "z")


def make_inputs(bsz, length, d, n, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 9)
    x = dict(
        u=jax.random.normal(ks[0], (bsz, length, d)),
        delta=0.5 * jax.random.normal(ks[1], (bsz, length, d)) - 1.0,
        A=-jnp.exp(0.5 * jax.random.normal(ks[2], (d, n))),
        B=jax.random.normal(ks[3], (bsz, length, n)),
        C=jax.random.normal(ks[4], (bsz, length, n)),
        D=jax.random.normal(ks[5], (d,)),
        z=jax.random.normal(ks[6], (bsz, length, d)),
        delta_bias=0.1 * jax.random.normal(ks[7], (d,)),
        initial_state=jax.random.normal(ks[8], (bsz, d, n)))
    low = ("u", "delta", "B", "C", "z")
    return {k: v.astype(dtype) if k in low else v for k, v in x.items()}


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def outputs_and_grads(fn, inputs, use, softplus=True, **kw):
    """fn's (y, h_last) and the gradients of a fixed random projection of both."""
    args = {k: inputs[k] for k in NAMES if k in use}

    def run(args):
        return fn(**args, delta_softplus=softplus, return_last_state=True, **kw)

    def loss(args):
        y, h = run(args)
        wy = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        wh = jnp.sin(jnp.arange(h.size, dtype=jnp.float32)).reshape(h.shape)
        return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(h * wh)

    return jax.jit(lambda a: (run(a), jax.grad(loss)(a)))(args)


def flipped(scan):
    """The reverse scan built from the forward `scan`: every time-indexed input flipped
    along time, y flipped back (the last state is then the one after step 0)."""
    def reverse_scan(**a):
        y, h = scan(**{k: jnp.flip(v, 1) if k in TIME_INDEXED else v for k, v in a.items()})
        return jnp.flip(y, 1), h
    return reverse_scan


def segment_ids_of(length, *row_starts):
    """[B, L] int32 segment ids, one row per list of segment starts (ids from 3 up)."""
    seg = np.full((len(row_starts), length), 3, np.int32)
    for b, starts in enumerate(row_starts):
        for t in starts:
            seg[b, t:] += 1
    return jnp.asarray(seg)


def segments(row):
    """[(start, end)] of the runs of equal ids in one row."""
    cuts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def per_segment(scan, seg_BL):
    """The packed-document semantics built from `scan` without ids: every segment of
    every row is a sequence of its own, the initial state entering the first segment
    in the scan's direction, the last state the one after the last segment scanned.
    One call of `scan` on the batch of all segments, each padded to the longest: the
    padding is scanned before the segment (u = 0: its zero state stays zero), except
    for the first segment, which starts from the initial state and has it after."""
    seg = np.asarray(seg_BL)
    length = seg.shape[1]
    spans = [(b, lo, hi) for b, row in enumerate(seg) for lo, hi in segments(row)]
    width = max(hi - lo for _, lo, hi in spans)

    def run(reverse=False, **a):
        first = [(hi == length) if reverse else (lo == 0) for _, lo, hi in spans]
        before = [f == reverse for f in first]          # padding before it in time
        parts = {}
        for name, v in a.items():
            if name in TIME_INDEXED:
                pads = [((0, 0), (width - hi + lo, 0) if bf else (0, width - hi + lo), (0, 0))
                        for (_, lo, hi), bf in zip(spans, before, strict=True)]
                parts[name] = jnp.concatenate([jnp.pad(v[b:b + 1, lo:hi], p) for (b, lo, hi), p
                                               in zip(spans, pads, strict=True)])
            elif name == "initial_state":
                parts[name] = jnp.stack([v[b] if f else jnp.zeros_like(v[b])
                                         for (b, _, _), f in zip(spans, first, strict=True)])
            else:
                parts[name] = v
        y, h = scan(**parts, reverse=reverse)
        ys = [y[i:i + 1, width - hi + lo:] if bf else y[i:i + 1, :hi - lo]
              for i, ((_, lo, hi), bf) in enumerate(zip(spans, before, strict=True))]
        last = [i for i, (_, lo, hi) in enumerate(spans)
                if (lo == 0 if reverse else hi == length)]
        return jnp.concatenate(ys, 1).reshape(seg.shape + y.shape[2:]), h[jnp.asarray(last)]
    return run


def assert_close(got, want, fwd_tol=1e-5, grad_tol=1e-4):
    (y, h), grads = got
    (y_ref, h_ref), grads_ref = want
    assert rel_err(y, y_ref) < fwd_tol, ("y", rel_err(y, y_ref))
    assert rel_err(h, h_ref) < fwd_tol, ("h_last", rel_err(h, h_ref))
    for k in grads_ref:
        assert rel_err(grads[k], grads_ref[k]) < grad_tol, (k, rel_err(grads[k], grads_ref[k]))


ALL = set(NAMES)
BARE = {"u", "delta", "A", "B", "C"}


def test_reference_reverse_is_the_flipped_forward():
    """reverse=True: y and the last state (after step 0, from an initial state entering
    after step L-1) equal the forward scan of flipped inputs (the reference's gradients
    are autodiff of the same lax.scan; the kernels' are checked against them below)."""
    x = make_inputs(2, 13, 8, 4, seed=6)
    run = lambda fn, **kw: jax.jit(lambda a: fn(**a, delta_softplus=True,
                                                return_last_state=True, **kw))(x)
    y, h = run(selective_scan_reference, reverse=True)
    y_want, h_want = run(flipped(selective_scan_reference))
    assert rel_err(y, y_want) < 1e-6 and rel_err(h, h_want) < 1e-6


@pytest.mark.parametrize("shape, chunk, reverse", [
    ((2, 37, 16, 4), 8, False),    # ragged: 37 = 4 chunks of 8 + 5
    ((1, 1, 16, 4), None, False),  # L = 1
    ((2, 64, 130, 16), 16, False),  # L a multiple of the chunk, ragged D
    ((1, 300, 256, 16), None, False),  # default chunk
    ((2, 37, 16, 4), 8, True),     # reverse: the 3 padded steps come first
])
def test_xla_matches_reference(shape, chunk, reverse):
    x = make_inputs(*shape)
    want = outputs_and_grads(selective_scan_reference, x, ALL, reverse=reverse)
    got = outputs_and_grads(selective_scan_xla, x, ALL, chunk=chunk, reverse=reverse)
    assert_close(got, want)


@pytest.mark.parametrize("use", [BARE, BARE | {"z"}, BARE | {"D", "delta_bias"},
                                 BARE | {"initial_state"}])
@pytest.mark.parametrize("softplus", [False, True])
def test_xla_optional_inputs(use, softplus):
    x = make_inputs(2, 45, 24, 8, seed=1)
    if not softplus:  # delta must stay positive without the softplus
        x["delta"] = jax.nn.softplus(x["delta"])
    want = outputs_and_grads(selective_scan_reference, x, use, softplus)
    got = outputs_and_grads(selective_scan_xla, x, use, softplus, chunk=16)
    assert_close(got, want)


def test_xla_long_slow_decay():
    """L = 2048 with |A| ~ 1e-3 (states that barely decay): no drift from the
    polynomial exp over many steps."""
    x = make_inputs(1, 2048, 16, 4, seed=4)
    x["A"] = -1e-3 * jnp.exp(0.5 * jax.random.normal(jax.random.key(9), (16, 4)))
    want = outputs_and_grads(selective_scan_reference, x, ALL)
    got = outputs_and_grads(selective_scan_xla, x, ALL)
    assert_close(got, want)


def test_return_last_state_false_and_dispatch():
    x = make_inputs(1, 20, 16, 4)
    args = {k: x[k] for k in BARE}
    y = ops.selective_scan(**args, impl="xla")
    y_ref = ops.selective_scan(**args, impl="reference")
    assert y.shape == (1, 20, 16) and rel_err(y, y_ref) < 1e-5
    if jax.default_backend() == "cpu":
        assert _impl.resolve("auto", "selective_scan") == "xla"
    with pytest.raises(ValueError, match="impl="):
        ops.selective_scan(**args, impl="cuda")
    with pytest.raises(ValueError, match="B has shape"):
        ops.selective_scan(**{**args, "B": args["B"][:, :5]}, impl="xla")
    with pytest.raises(ValueError, match="segment_ids has shape"):
        ops.selective_scan(**args, segment_ids=jnp.zeros((1, 5), jnp.int32), impl="xla")


# Segment starts: at the chunk edges 8 and 16, a one-step segment at 8, one at the
# last step (the reverse scan's first), and a second row with one boundary.
SEGMENT_STARTS = ([8, 9, 30, 36], [16])


@pytest.mark.parametrize("reverse", [False, True])
def test_segments_equal_separate_scans(reverse):
    """Packed documents: with segment ids the reference and the xla path (chunks of 8,
    ragged) give every segment the outputs, last state and gradients of that segment
    scanned alone, forward and reverse."""
    x = make_inputs(2, 37, 16, 4, seed=7)
    seg = segment_ids_of(37, *SEGMENT_STARTS)
    want = outputs_and_grads(per_segment(selective_scan_reference, seg), x, ALL,
                             reverse=reverse)
    for fn, kw in ((selective_scan_reference, {}), (selective_scan_xla, dict(chunk=8))):
        got = outputs_and_grads(fn, x, ALL, reverse=reverse, segment_ids=seg, **kw)
        assert_close(got, want)


def test_xla_bf16_error_within_twice_reference():
    """bf16 inputs: the xla path's error against an fp32 evaluation of the same
    (bf16-rounded) inputs is at most 2x the reference's own bf16 error."""
    x = make_inputs(2, 96, 64, 16, seed=2, dtype=jnp.bfloat16)
    x32 = {k: v.astype(jnp.float32) for k, v in x.items()}
    truth = outputs_and_grads(selective_scan_reference, x32, ALL)
    ref16 = outputs_and_grads(selective_scan_reference, x, ALL)
    got16 = outputs_and_grads(selective_scan_xla, x, ALL, chunk=16)
    (y_t, h_t), g_t = truth
    (y_r, h_r), g_r = ref16
    (y_x, h_x), g_x = got16
    assert y_x.dtype == jnp.bfloat16
    assert rel_err(y_x, y_t) <= 2 * rel_err(y_r, y_t) + 1e-6
    assert rel_err(h_x, h_t) <= 2 * rel_err(h_r, h_t) + 1e-6
    for k in g_t:
        assert rel_err(g_x[k], g_t[k]) <= 2 * rel_err(g_r[k], g_t[k]) + 1e-6, k


def fwd_bwd_temp_vs_BLDN(scan_fn, bsz=1, length=8192, d=512, n=16):
    """(compiled forward+backward temp bytes of `scan_fn`, bytes of one fp32 [B, L, D, N])."""
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = dict(u=spec(bsz, length, d), delta=spec(bsz, length, d), A=spec(d, n),
                B=spec(bsz, length, n), C=spec(bsz, length, n), D=spec(d),
                z=spec(bsz, length, d), delta_bias=spec(d))

    def loss(a):
        y, h = scan_fn(**a, delta_softplus=True, return_last_state=True)
        return jnp.sum(y) + jnp.sum(h)

    compiled = jax.jit(jax.grad(loss)).lower(args).compile()
    return compiled.memory_analysis().temp_size_in_bytes, bsz * length * d * n * 4


def test_xla_memory_never_holds_BLDN():
    """B=1, L=8192, D=512, N=16: compiled forward+backward temp memory stays under
    one fp32 [B, L, D, N] array (268 MB)."""
    temp, one_bldn = fwd_bwd_temp_vs_BLDN(selective_scan_xla)
    assert temp < one_bldn, (temp, one_bldn)
