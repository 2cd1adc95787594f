"""attention(impl="pallas"): layout, padding and custom_vjp around kernels_pallas.

Transposes [B, L, H, D] to the kernels' [B, H, L, D], pads the head dim to 128
lanes and L, S to multiples of the blocks (512 x 512 by default, each clipped to its
128-rounded length; padded keys are masked in-kernel, padded queries sliced off),
broadcasts segment ids and row statistics to the
TPU-friendly layouts the kernels expect, and runs forward, dq and dk/dv kernels.
Off TPU the kernels run interpreted (`per_device.tpu_kernel_interpret`: TPU interpret
mode on one CPU device, the generic interpreter otherwise). Not yet run on a real TPU.
Explicit q/kv positions are not supported here (use impl="xla").
"""
import functools
import math

import jax
import jax.numpy as jnp

from jaxmix.ops.per_device import tpu_kernel_interpret
from kernels_pallas import flash_attention as fa

BLOCK_Q = fa.DEFAULT_BLOCK   # 512, clipped to the 128-rounded lengths in `_prepare`
BLOCK_K = fa.DEFAULT_BLOCK


def _round_up(x, m):
    return -(-x // m) * m


def _to_kernel(x_BLHD, length, dp):
    x = x_BLHD.transpose(0, 2, 1, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, dp - x.shape[3])))


def _rows(x_BHL, length):
    """[B, H, L] fp32 -> [B, H, Lp, 128] broadcast along lanes."""
    x = jnp.pad(x_BHL, ((0, 0), (0, 0), (0, length - x_BHL.shape[2])))
    return jnp.broadcast_to(x[..., None], x.shape + (fa.LANES,))


def _prepare(q, k, v, q_seg, kv_seg, causal, window, sink, scale, block_q, block_k):
    b, l, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    dp = _round_up(d, fa.LANES)
    bq = min(block_q, _round_up(l, fa.LANES))
    bk = min(block_k, _round_up(s_len, fa.LANES))
    lp, sp = _round_up(l, bq), _round_up(s_len, bk)
    spec = fa.Spec(causal=bool(causal), window=window, sink=sink, scale=float(scale),
                   q_len=l, kv_len=s_len, offset=s_len - l, block_q=bq, block_k=bk,
                   groups=hq // hkv, segments=q_seg is not None)
    segs = (None, None)
    if q_seg is not None:
        qs = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, lp - l)))
        ks = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, sp - s_len)))
        segs = (jnp.broadcast_to(qs[:, :, None], (b, lp, fa.LANES)),
                jnp.broadcast_to(ks[:, None, :], (b, fa.SUBLANES, sp)))
    return spec, lp, sp, dp, segs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def _flash(q, k, v, q_seg, kv_seg, causal, window, sink, scale, block_q, block_k, interpret):
    return _forward(q, k, v, q_seg, kv_seg, causal, window, sink, scale, block_q, block_k,
                    interpret)[0]


def _forward(q, k, v, q_seg, kv_seg, causal, window, sink, scale, block_q, block_k,
             interpret):
    b, l, hq, d = q.shape
    spec, lp, sp, dp, segs = _prepare(q, k, v, q_seg, kv_seg, causal, window, sink, scale,
                                      block_q, block_k)
    o, lse = fa.flash_fwd(_to_kernel(q, lp, dp), _to_kernel(k, sp, dp), _to_kernel(v, sp, dp),
                          *segs, spec, interpret=interpret)
    out = o[:, :, :l, :d].transpose(0, 2, 1, 3)
    lse = lse[:, :, :l, 0]
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _backward(causal, window, sink, scale, block_q, block_k, interpret, res, cts):
    q, k, v, q_seg, kv_seg, out, lse = res
    dout, dlse = cts
    l, d, s_len = q.shape[1], q.shape[3], k.shape[1]
    spec, lp, sp, dp, segs = _prepare(q, k, v, q_seg, kv_seg, causal, window, sink, scale,
                                      block_q, block_k)
    delta = jnp.einsum("blhd,blhd->bhl", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    args = (_to_kernel(q, lp, dp), _to_kernel(k, sp, dp), _to_kernel(v, sp, dp),
            _to_kernel(dout.astype(q.dtype), lp, dp), _rows(lse, lp), _rows(delta, lp)) + segs
    dq = fa.flash_bwd_dq(*args, spec, interpret=interpret)
    dk, dv = fa.flash_bwd_dkv(*args, spec, interpret=interpret)
    back = lambda x, n: x[:, :, :n, :d].transpose(0, 2, 1, 3)
    return back(dq, l), back(dk, s_len), back(dv, s_len), None, None


def _flash_fwd(q, k, v, q_seg, kv_seg, causal, window, sink, scale, block_q, block_k,
               interpret):
    return _forward(q, k, v, q_seg, kv_seg, causal, window, sink, scale, block_q, block_k,
                    interpret)


_flash.defvjp(_flash_fwd, _backward)


def attention_pallas(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                     q_positions=None, kv_positions=None, sliding_window=None, sink=0,
                     scale=None, block_q=BLOCK_Q, block_k=BLOCK_K, interpret=None):
    """(out [B, L, Hq, D], lse [B, Hq, L] fp32) from the Pallas kernels. `sink` keys
    stay visible outside the sliding window (ignored without one)."""
    if q_positions is not None or kv_positions is not None:
        raise ValueError("attention(impl='pallas'): q_positions/kv_positions are not "
                         "supported; use impl='xla'")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    interpret = tpu_kernel_interpret() if interpret is None else interpret
    window = None if sliding_window is None else int(sliding_window)
    sink = int(sink) if window else 0
    return _flash(q, k, v, q_segment_ids, kv_segment_ids, bool(causal), window, sink, scale,
                  int(block_q), int(block_k), interpret)
