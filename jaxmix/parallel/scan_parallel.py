"""Sequence-parallel Mamba: the selective scan and the conv1d halo across devices.

The recurrence h_t = a_t * h_{t-1} + b_t (a_t = exp(delta_t A), elementwise over
[B, D, N]) is split over the N devices of `axis_name`, each holding L/N steps:
  1. every device scans its chunk from a zero state (`ops.selective_scan`, any
     impl), giving local outputs and its final state h_i;
  2. its chunk decay is P_i = prod_t a_t = exp(A * sum_t delta_t) ([B, D, N]);
  3. the small (P_i, h_i) pairs are all-gathered and each device folds the ones
     to its left (an exclusive prefix): h_in = P_{i-1} h_in' + h_{i-1} ..., starting
     from the initial state (or zeros);
  4. the carried-in state reaches step t of the chunk decayed by
     exp(A * S_t) with S_t = cumsum(delta)_t, so the outputs get
        y_t += sum_n C_t[n] exp(A[:, n] S_t) h_in[:, n]
     computed over blocks of time steps ([B, T, D, N] temporaries of ~4 MiB, never
     [B, L/N, D, N]) with a hand-written backward that recomputes the decays.
The gating by silu(z) is applied after the correction. Gradients are exact
(autodiff through all_gather and the local scan's own custom_vjp).
With reverse=True (h_t = a_t h_{t+1} + b_t, see ops.selective_scan) the local scans
run reversed, the carries flow from the higher-index shards to the lower ones (the
fold starts at the last device, from the initial state) and S_t is the reverse
cumsum, sum_{s >= t} delta_s within the shard.
Segment ids (packed documents): the local scans reset at the boundaries inside a
shard (`ops.selective_scan(segment_ids=...)`), and the carry from the earlier shards
stops at the shard's first reset: with k_t the keep mask (0 where the state resets
before step t, a boundary at the shard's edge included: the neighbour's id comes by
one ppermute) and M_t = prod_{s <= t} k_s in the scan's direction, the carry-in term
is multiplied by M_t and the chunk decay P_i by M at its last step.

`conv_halo` gives each device the previous width-1 tokens of its left neighbour
(zeros on device 0) for the causal depthwise conv1d; with reverse=True the next
width-1 tokens of its right neighbour (zeros on the last device) for the
anti-causal conv y_t = sum_k w[k] x_{t+K-1-k} (= flip(causal_conv(flip(x)))), which
the backward direction of a bidirectional Mamba block runs. With segment ids a tap
x_s reaches y_t only when seg[s] == seg[t] (the halo carries the neighbour's ids).

Inside shard_map use `selective_scan_shard` / `conv_halo` / `causal_conv_shard`; they
run under shard_map's default `check_vma=True` (values typed varying where needed, see
`ops.vma`) and under `check_vma=False`, which a Pallas local scan needs. From a jit'd
model under `jax.set_mesh(mesh)` use `sequence_parallel_selective_scan` /
`sequence_parallel_causal_conv`: global arrays in, a shard_map manual over `axis_name`
only inside; batch and channels keep their automatic (data/fsdp/tensor) sharding,
which is correct since every channel's recurrence and conv are independent.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxmix import ops
from jaxmix.ops.scan_common import check_shapes, keep_mask, prepare_delta
from jaxmix.ops.selective_scan import resolve_impl
from jaxmix.ops.vma import match_vma, unify_vma, vma
from jaxmix.parallel.zigzag import mesh_axis_size


# Time steps per block of the carry-in correction: its [B, T, D, N] temporaries ~4 MiB.
CARRY_BLOCK_BYTES = 4 << 20


def _carry_block(shape_BLD, n):
    b, length, d = shape_BLD
    t = CARRY_BLOCK_BYTES // max(1, 4 * b * d * n)
    return int(max(8, min(length, t)))


def _blocks(x_BL_, t):
    """[B, L, ...] -> [nb, B, t, ...] (zero padded at the end)."""
    length = x_BL_.shape[1]
    nb = -(-length // t)
    x = jnp.pad(x_BL_, ((0, 0), (0, nb * t - length)) + ((0, 0),) * (x_BL_.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], nb, t, *x.shape[2:]), 1, 0)


def _unblocks(x_nBt_, length):
    x = jnp.moveaxis(x_nBt_, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


@jax.custom_vjp
def _carry_in(C_BLN, S_BLD, A_DN, h_BDN):
    """sum_n C[b,t,n] exp(A[d,n] S[b,t,d]) h[b,d,n] -> [B, L, D] (fp32).

    Walks time in blocks of T steps so only [B, T, D, N] is ever formed, forward
    and backward (a hand-written vjp: autodiff would keep [B, L, D, N] residuals).
    Inside shard_map call it as `_carry_in_vma`.
    """
    t = _carry_block(S_BLD.shape, A_DN.shape[1])

    def block(_, xs):
        c_BTN, s_BTD = xs
        e = jnp.exp(s_BTD[..., None] * A_DN)
        return None, jnp.einsum("btdn,btn,bdn->btd", e, c_BTN, h_BDN)

    _, out = lax.scan(block, None, (_blocks(C_BLN, t), _blocks(S_BLD, t)))
    return _unblocks(out, S_BLD.shape[1])


def _carry_in_fwd(C_BLN, S_BLD, A_DN, h_BDN):
    return _carry_in(C_BLN, S_BLD, A_DN, h_BDN), (C_BLN, S_BLD, A_DN, h_BDN)


def _carry_in_bwd(res, g_BLD):
    C_BLN, S_BLD, A_DN, h_BDN = res
    length, t = S_BLD.shape[1], _carry_block(S_BLD.shape, A_DN.shape[1])

    def block(carry, xs):
        dA_DN, dh_BDN = carry
        c_BTN, s_BTD, g_BTD = xs
        e = jnp.exp(s_BTD[..., None] * A_DN)
        ge = g_BTD[..., None] * e                          # [B, T, D, N]
        dc_BTN = jnp.einsum("btdn,bdn->btn", ge, h_BDN)
        gce = ge * c_BTN[:, :, None, :]
        dh_BDN = dh_BDN + gce.sum(1)
        r = gce * h_BDN[:, None]
        ds_BTD = jnp.einsum("btdn,dn->btd", r, A_DN)
        dA_DN = dA_DN + jnp.einsum("btdn,btd->dn", r, s_BTD)
        return (dA_DN, dh_BDN), (dc_BTN, ds_BTD)

    xs = (_blocks(C_BLN, t), _blocks(S_BLD, t), _blocks(g_BLD, t))
    init = (jnp.zeros_like(A_DN), jnp.zeros_like(h_BDN))
    (dA_DN, dh_BDN), (dc, ds) = lax.scan(block, init, xs)
    return _unblocks(dc, length), _unblocks(ds, length), dA_DN, dh_BDN


_carry_in.defvjp(_carry_in_fwd, _carry_in_bwd)


def _carry_in_vma(C_BLN, S_BLD, A_DN, h_BDN):
    """`_carry_in` with its inputs cast to one varying type (the replicated A next to
    the sharded C, S, h): the bwd's cotangents then match them, dA is psummed."""
    return _carry_in(*unify_vma(C_BLN, S_BLD, A_DN, h_BDN))


def _fold(P_JBDN, h_JBDN, h0_BDN, upto, reverse=False):
    """State after the chunks j < upto (j > upto when `reverse`, folded from the last
    chunk down; all of them when upto is None), from h0."""
    h = h0_BDN
    n = P_JBDN.shape[0]
    for j in (range(n - 1, -1, -1) if reverse else range(n)):
        nxt = P_JBDN[j] * h + h_JBDN[j]
        h = nxt if upto is None else jnp.where(j > upto if reverse else j < upto, nxt, h)
    return h


def _neighbour(x, axis_name, reverse):
    """x from the neighbour before this shard in the scan's direction: the left one
    (device i gets i - 1's), or with `reverse` the right one (zeros at the end)."""
    n = lax.axis_size(axis_name)
    pairs = [(i, i + 1) for i in range(n - 1)]
    return lax.ppermute(x, axis_name, [(j, i) for i, j in pairs] if reverse else pairs)


def _carry_mask(segment_ids, axis_name, reverse):
    """fp32 [B, L/N]: 1 while no reset has happened since the shard's first scanned
    step (a boundary with the neighbour's edge counts; never on the first device in
    the scan's direction), 0 from the first reset on; None without ids."""
    if segment_ids is None:
        return None
    keep_BL = keep_mask(segment_ids, reverse)
    edge, far = (-1, 0) if reverse else (0, -1)       # first and last scanned steps
    other = _neighbour(segment_ids[:, far], axis_name, reverse)
    first = lax.axis_index(axis_name) == (lax.axis_size(axis_name) - 1 if reverse else 0)
    keep_edge = (first | (segment_ids[:, edge] == other)).astype(jnp.float32)
    keep_BL = keep_BL.at[:, edge].set(keep_edge)
    return lax.cumprod(keep_BL, axis=1, reverse=reverse)


def selective_scan_shard(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, initial_state=None, return_last_state=False,
                         impl="auto", axis_name="sequence", reverse=False, segment_ids=None):
    """`ops.selective_scan` of the whole sequence, called on this device's shard.

    u, delta, z [B, L/N, D], B, C [B, L/N, N] and segment_ids [B, L/N] are this
    device's (contiguous) shards; A, D, delta_bias and initial_state [B, D, N] are the
    full (replicated) arrays. The returned last state is the global one (the same on
    every device). With `reverse` the scan runs from the last step to the first: the
    initial state enters the last device and the carries flow towards device 0.
    """
    check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)
    dl_BLD = prepare_delta(delta, delta_bias, delta_softplus)
    A_DN = A.astype(jnp.float32)
    state_shape = (u.shape[0],) + A.shape
    # Under check_vma the local scan starts from a zero state typed varying like the
    # data (its loop carry); under check_vma=False (a Pallas scan) nothing varies.
    zero_BDN = match_vma(jnp.zeros(state_shape, jnp.float32), u, dl_BLD, B, C)
    y_BLD, h_BDN = ops.selective_scan(u.astype(jnp.float32), dl_BLD, A_DN, B, C, D=D,
                                      initial_state=zero_BDN if vma(zero_BDN) else None,
                                      return_last_state=True, impl=impl, reverse=reverse,
                                      segment_ids=segment_ids)
    # S_t: the delta summed over the shard's steps up to t in the scan's direction.
    S_BLD = lax.cumsum(dl_BLD, axis=1, reverse=reverse)
    P_BDN = jnp.exp(S_BLD[:, 0 if reverse else -1, :, None] * A_DN)
    C_BLN = C.astype(jnp.float32)
    carry_BL = _carry_mask(segment_ids, axis_name, reverse)
    if carry_BL is not None:   # the carry stops at the shard's first reset
        P_BDN = P_BDN * carry_BL[:, 0 if reverse else -1, None, None]
        C_BLN = C_BLN * carry_BL[:, :, None]
    # Checked: gather as invariant values, so the global last state (the same on every
    # device) is typed replicated for out_specs P(); the transpose is then a slice.
    to = "invarying" if axis_name in vma(h_BDN) else "varying"
    P_all = lax.all_gather(P_BDN, axis_name, to=to)
    h_all = lax.all_gather(h_BDN, axis_name, to=to)
    h0_BDN = (jnp.zeros(state_shape, jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))
    h_in_BDN = _fold(P_all, h_all, h0_BDN, lax.axis_index(axis_name), reverse)
    y_BLD = y_BLD + _carry_in_vma(C_BLN, S_BLD, A_DN, h_in_BDN)
    if z is not None:
        y_BLD = y_BLD * jax.nn.silu(z.astype(jnp.float32))
    y_BLD = y_BLD.astype(u.dtype)
    if return_last_state:
        return y_BLD, _fold(P_all, h_all, h0_BDN, None, reverse)
    return y_BLD


def conv_halo(x_BL_, width, axis_name="sequence", reverse=False):
    """[B, width-1, ...]: the last width-1 tokens of the left neighbour (zeros on device
    0), or with `reverse` the first width-1 tokens of the right neighbour (zeros on the
    last device). x is [B, L/N, ...]: activations, or segment ids [B, L/N]."""
    if width - 1 > x_BL_.shape[1]:
        raise ValueError(f"conv_halo: the per-device length {x_BL_.shape[1]} is shorter than "
                         f"the conv halo {width - 1}; use fewer sequence shards")
    edge = x_BL_[:, :width - 1] if reverse else x_BL_[:, x_BL_.shape[1] - (width - 1):]
    return _neighbour(edge, axis_name, reverse)


def _conv(x_BLD, w_KD, bias_D, ctx_BKD, reverse, seg_BL=None, ctx_seg_BK=None):
    """`causal_conv` with its K-1 context inputs on the far side: before x_0, or after
    x_{L-1} when `reverse` (zeros when None); with segment ids `seg_BL` (and the
    context's, `ctx_seg_BK`, or any ids when the context is zeros) a tap counts only
    within its output's segment."""
    width, length = w_KD.shape[0], x_BLD.shape[1]
    if ctx_BKD is None:
        ctx_BKD = jnp.zeros((x_BLD.shape[0], width - 1, x_BLD.shape[2]), x_BLD.dtype)
    ctx_BKD = ctx_BKD.astype(x_BLD.dtype)
    if seg_BL is not None and ctx_seg_BK is None:   # zeros there: any ids do
        ctx_seg_BK = jnp.broadcast_to(seg_BL[:, :1], (seg_BL.shape[0], width - 1))
    join = (lambda x, ctx: jnp.concatenate([x, ctx], 1)) if reverse else (
        lambda x, ctx: jnp.concatenate([ctx, x], 1))
    xp = join(x_BLD, ctx_BKD)
    segp = None if seg_BL is None else join(seg_BL, ctx_seg_BK.astype(seg_BL.dtype))
    y = 0
    for i in range(width):
        # Tap i reads offset o of the padded input: x_{t-K+1+i}, or x_{t+K-1-i} (reverse).
        o = width - 1 - i if reverse else i
        tap = xp[:, o:o + length] * w_KD[i]
        if segp is not None and i != width - 1:    # tap K-1 is x_t itself
            tap = jnp.where((segp[:, o:o + length] == seg_BL)[..., None], tap, 0)
        y = y + tap
    return y if bias_D is None else y + bias_D


def causal_conv(x_BLD, w_KD, bias_D=None, ctx_BKD=None, reverse=False, segment_ids=None):
    """Depthwise causal conv y_t = sum_k w[k] x_{t-K+1+k} (+ bias) over [B, L, D], the
    K-1 inputs before x_0 taken from `ctx_BKD` [B, K-1, D] (zeros when None).

    reverse=True is the anti-causal conv y_t = sum_k w[k] x_{t+K-1-k} (+ bias), zeros
    past x_{L-1}: flip(causal_conv(flip(x))) with the same weights. A decode context
    only exists for the causal direction, so `ctx_BKD` with `reverse` is an error.
    segment_ids [B, L] (packed documents): x_s reaches y_t only when seg[s] == seg[t];
    decoding (a context) takes none."""
    if reverse and ctx_BKD is not None:
        raise ValueError("causal_conv: a decode context (ctx_BKD) with reverse=True makes "
                         "no sense (the reverse conv reads the future)")
    if segment_ids is not None and ctx_BKD is not None:
        raise ValueError("causal_conv: a decode context (ctx_BKD) takes no segment_ids; "
                         "pass one or the other")
    return _conv(x_BLD, w_KD, bias_D, ctx_BKD, reverse, segment_ids)


def causal_conv_shard(x_BLD, w_KD, bias_D, axis_name="sequence", reverse=False,
                      segment_ids=None):
    """`causal_conv` of the whole sequence on this device's shard (the left context is
    the neighbour's halo; with `reverse` the right context, the next neighbour's;
    segment_ids [B, L/N] this shard's ids, their halo comes along)."""
    width = w_KD.shape[0]
    if width == 1:
        return _conv(x_BLD, w_KD, bias_D, None, reverse)
    ctx = conv_halo(x_BLD, width, axis_name, reverse)
    ctx_seg = (None if segment_ids is None
               else conv_halo(segment_ids, width, axis_name, reverse))
    return _conv(x_BLD, w_KD, bias_D, ctx, reverse, segment_ids, ctx_seg)


def _check_length(length, n, axis_name, what):
    if length % n:
        raise ValueError(f"{what}: length {length} must be a multiple of mesh.{axis_name}={n}; "
                         f"change train.seq_len")


def sequence_parallel_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                     delta_softplus=False, initial_state=None,
                                     return_last_state=False, impl="auto",
                                     axis_name="sequence", reverse=False, segment_ids=None):
    """`ops.selective_scan` on global arrays, sequence-parallel over the ambient mesh.

    Same signature and result as `ops.selective_scan`; when the mesh set by
    `jax.set_mesh` has `axis_name` > 1 the length is split over it (only that axis
    goes manual; batch and channels, e.g. u [B, L, D] as P(("data", "fsdp"), "sequence",
    "tensor"), keep their automatic sharding). Otherwise it is exactly
    `ops.selective_scan`. `reverse` scans from the last step to the first (the carries
    then flow from the higher-index shards to the lower ones); segment_ids [B, L]
    reset the state at segment boundaries, across shards too.
    """
    n = mesh_axis_size(axis_name)
    if n == 1:
        return ops.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, initial_state=initial_state,
                                  return_last_state=return_last_state, impl=impl,
                                  reverse=reverse, segment_ids=segment_ids)
    check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)
    _check_length(u.shape[1], n, axis_name, "sequence_parallel_selective_scan")
    seq, rep = P(None, axis_name), P()
    sharded = {"u": u, "delta": delta, "B": B, "C": C}
    if z is not None:
        sharded["z"] = z
    if segment_ids is not None:
        sharded["segment_ids"] = jnp.asarray(segment_ids)
    replicated = {"A": A}
    for name, arr in (("D", D), ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if arr is not None:
            replicated[name] = arr

    def body(sharded, replicated):
        return selective_scan_shard(**sharded, **replicated, delta_softplus=delta_softplus,
                                    return_last_state=return_last_state, impl=impl,
                                    axis_name=axis_name, reverse=reverse)

    out_specs = (seq, rep) if return_last_state else seq
    # check_vma=False only around a Pallas local scan: jax 0.10 rejects a pallas_call
    # (even interpret mode) inside a vma-checked shard_map.
    fn = jax.shard_map(body, in_specs=(seq, rep), out_specs=out_specs, axis_names={axis_name},
                       check_vma=resolve_impl(impl) != "pallas")
    return fn(sharded, replicated)


def sequence_parallel_causal_conv(x_BLD, w_KD, bias_D=None, axis_name="sequence",
                                  reverse=False, segment_ids=None):
    """Depthwise causal conv over global [B, L, D] with an explicit ppermute halo.

    x [B, L, D], w [K, D], bias [D] (or None) -> y [B, L, D] with
    y_t = sum_k w[k] x_{t-K+1+k} + bias (zeros before t = 0); with `reverse` the
    anti-causal y_t = sum_k w[k] x_{t+K-1-k} + bias (zeros past the end; the halo
    comes from the next shard). With segment_ids [B, L] a tap x_s reaches y_t only
    when seg[s] == seg[t] (the halo carries its ids). Under a mesh with
    `axis_name` > 1 a shard_map manual over `axis_name` only (check_vma=True) splits
    the length; batch and channels keep their automatic sharding (e.g. D over
    "tensor", w and bias alike). Otherwise the plain one-device conv.
    (Under plain jit the global-view conv is also correct: XLA's SPMD partitioner
    inserts its own halo exchange. This is the explicit, shard_map version.)
    """
    n = mesh_axis_size(axis_name)
    if n == 1:
        return causal_conv(x_BLD, w_KD, bias_D, reverse=reverse, segment_ids=segment_ids)
    _check_length(x_BLD.shape[1], n, axis_name, "sequence_parallel_causal_conv")
    seq, rep = P(None, axis_name), P()
    if bias_D is None:
        bias_D = jnp.zeros(w_KD.shape[1:], x_BLD.dtype)
    if segment_ids is None:
        fn = jax.shard_map(lambda x, w, b: causal_conv_shard(x, w, b, axis_name, reverse),
                           in_specs=(seq, rep, rep), out_specs=seq, axis_names={axis_name})
        return fn(x_BLD, w_KD, bias_D)
    fn = jax.shard_map(lambda x, w, b, s: causal_conv_shard(x, w, b, axis_name, reverse, s),
                       in_specs=(seq, rep, rep, seq), out_specs=seq, axis_names={axis_name})
    return fn(x_BLD, w_KD, bias_D, jnp.asarray(segment_ids))
