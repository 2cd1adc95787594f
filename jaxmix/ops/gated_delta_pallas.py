"""gated_delta_rule(impl="pallas"): the chunked forward as a Pallas kernel
(kernels_pallas.gated_delta), run per device under a mesh (batch over the mesh axes of
"batch", heads over those of "heads"), inside a custom_vjp whose backward
differentiates the chunked xla form (`gated_delta_rule_xla`, which recomputes the
forward chunk by chunk and keeps only chunk-boundary states). Off TPU the kernel runs
interpreted (`per_device.tpu_kernel_interpret`): slow, meant for tests.

This layer normalises and scales q and k, moves heads before time ([B, H, L, d]),
pads L to a multiple of the chunk (beta = 0 and g = 0 there, so the state passes) and
packs g, beta and the segment run index into the kernel's lane-dense [8, C] row block
per chunk. The kernel's matmuls take bf16 operands with fp32 accumulation (see
kernels_pallas.gated_delta); the backward (xla) stays fp32.
"""
import functools

import jax
import jax.numpy as jnp

from jaxmix.errors import ConfigError
from jaxmix.ops import per_device
from jaxmix.ops.gated_delta_common import prepare_inputs, run_ids, start_state
from jaxmix.ops.gated_delta_xla import gated_delta_rule_xla
from kernels_pallas import gated_delta as kernel


def check_chunk(chunk_size):
    if int(chunk_size) < 8 or int(chunk_size) % 8:
        raise ConfigError(f"gated_delta_rule: chunk_size={chunk_size} must be a positive "
                          f"multiple of 8 for impl='pallas' (the kernel's sublane tile)")


def _forward(q, k, v, g, beta, s0, seg, static):
    opts = dict(static)
    b, length, h, _ = q.shape
    q32, k32, v32, g32, b32 = prepare_inputs(q, k, v, g, beta, opts["normalize_qk"], opts["scale"])
    c = opts["chunk_size"]
    pad = -length % c
    heads_first = lambda x: jnp.pad(jnp.moveaxis(x, 2, 1),
                                    [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    runs = jnp.pad(run_ids(seg, b, length), [(0, 0), (0, pad)], mode="edge")
    o, state = kernel.delta_fwd(
        heads_first(q32), heads_first(k32), heads_first(v32),
        _rows(heads_first(g32), heads_first(b32), runs, c), s0, chunk=c,
        matmul_dtype=jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16,
        interpret=opts["interpret"])
    return jnp.moveaxis(o[:, :, :length], 1, 2).astype(q.dtype), state


def _rows(g_BHL, beta_BHL, runs_BL, chunk):
    """The kernel's lane-dense [B, H, Lp / C, 8, C] block per chunk: rows g, beta and
    the run index (fp32, broadcast over heads), zeros below."""
    b, h, lp = g_BHL.shape
    runs = jnp.broadcast_to(runs_BL.astype(jnp.float32)[:, None], (b, h, lp))
    rows = jnp.stack([g_BHL, beta_BHL, runs], axis=2)                       # [B, H, 3, Lp]
    rows = rows.reshape(b, h, 3, lp // chunk, chunk).transpose(0, 1, 3, 2, 4)
    return jnp.pad(rows, [(0, 0)] * 3 + [(0, kernel.N_ROWS - 3), (0, 0)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _core(q, k, v, g, beta, s0, seg, static):
    return _forward(q, k, v, g, beta, s0, seg, static)


def _core_fwd(q, k, v, g, beta, s0, seg, static):
    return _forward(q, k, v, g, beta, s0, seg, static), (q, k, v, g, beta, s0, seg)


def _core_bwd(static, res, cts):
    q, k, v, g, beta, s0, seg = res
    opts = dict(static)
    xla = lambda q, k, v, g, beta, s0: gated_delta_rule_xla(
        q, k, v, g, beta, initial_state=s0, segment_ids=seg,
        normalize_qk=opts["normalize_qk"], scale=opts["scale"], chunk_size=opts["chunk_size"])
    _, vjp = jax.vjp(xla, q, k, v, g, beta, s0)
    return vjp(cts) + (None,)


_core.defvjp(_core_fwd, _core_bwd)


def gated_delta_rule_pallas(q, k, v, g, beta, *, initial_state=None, segment_ids=None,
                            normalize_qk=True, scale=None, chunk_size=64, interpret=None):
    """Same contract as `gated_delta_rule_xla`; chunk_size a multiple of 8."""
    check_chunk(chunk_size)
    b, length, h, _ = q.shape
    s0 = start_state(q, v, initial_state)
    seg = (jnp.zeros((b, length), jnp.int32) if segment_ids is None
           else jnp.asarray(segment_ids))
    interpret = per_device.tpu_kernel_interpret() if interpret is None else interpret
    static = (("normalize_qk", bool(normalize_qk)),
              ("scale", None if scale is None else float(scale)),
              ("chunk_size", min(int(chunk_size), -(-length // 8) * 8)),
              ("interpret", interpret))
    b_ax = per_device.mesh_axes("batch", b)
    h_ax = per_device.mesh_axes("heads", h)
    s = per_device.spec
    blh, bhkv, bl = s(b_ax, (), h_ax), s(b_ax, h_ax), s(b_ax)
    body = lambda q, k, v, g, beta, s0, seg: _core(q, k, v, g, beta, s0, seg, static)
    return per_device.per_device(body, (blh, blh, blh, blh, blh, bhkv, bl), (blh, bhkv))(
        q, k, v, g, beta, s0, seg)
