"""Sequence-parallel selective scan and conv halo on 8 simulated CPU devices.

The scan and the conv run in shard_maps with the default check_vma=True (the Pallas
case unchecked, as a pallas_call needs; its local scans run the kernel per device over
batch and channels too); the conv is checked, values and gradients, against the
unsharded depthwise `lax.conv_general_dilated`. The reverse case (reverse=True) checks
both against the forward oracles run on inputs flipped along time.
"""
import json
import os
import sys

import numpy as np
import pytest

from conftest import ROOT, devices_env, json_rows

ENV = devices_env(8)
RTOL = 1e-5
# (data, fsdp, tensor, sequence): sequence 8, 4 and 2, with batch and (tensor = 2)
# channels sharded too; the local scan "xla" (auto on CPU), "reference" or "pallas";
# the reverse case runs the scan and the conv with reverse=True (carries and halo from
# the higher shards) against the flipped one-device oracles.
CASES = [dict(mesh=[1, 1, 1, 8], gate=True, init=True),
         dict(mesh=[2, 1, 1, 4], gate=False, init=False, impl="reference"),
         dict(mesh=[1, 2, 2, 2], gate=True, init=True),
         dict(mesh=[2, 1, 2, 2], gate=True, init=False, impl="pallas"),
         dict(mesh=[1, 1, 2, 4], gate=True, init=True, reverse=True)]
CONV = {"conv", "conv_d_x", "conv_d_w", "conv_d_bias"}


def worker(arg, timeout=900):
    script = os.path.join(ROOT, "tests", "workers", "scan_parallel_cases.py")
    return json_rows([script, arg], ENV, timeout)


def test_sequence_parallel_scan_matches_one_device():
    rows = worker(json.dumps({"cases": CASES}))
    assert len(rows) == len(CASES)
    for row in rows:
        errors = {k: v for k, v in row.items()
                  if k in ("y", "h") or k in CONV or k.startswith("d_")}
        want = {"y", "h", "d_u", "d_delta", "d_A", "d_B", "d_C", "d_D", "d_delta_bias"} | CONV
        want |= {"d_z"} if row["gate"] else set()
        want |= {"d_initial_state"} if row["init"] else set()
        assert set(errors) == want, row
        assert max(errors.values()) <= RTOL, row


def test_only_the_small_chunk_states_are_gathered():
    report = worker("hlo")[0]
    assert report["all_gather_shapes"], report
    for shape in report["all_gather_shapes"]:
        dims = [int(d) for d in shape[shape.index("[") + 1:-1].split(",")]
        assert np.prod(dims) <= report["max_state_elems"], report


def test_without_a_sequence_axis_it_is_the_plain_scan_and_conv():
    import jax.numpy as jnp

    from jaxmix import ops
    from jaxmix.parallel.scan_parallel import (causal_conv, sequence_parallel_causal_conv,
                                               sequence_parallel_selective_scan)
    rng = np.random.default_rng(0)
    b, length, d, n = 1, 16, 4, 2
    u, delta = (jnp.asarray(rng.standard_normal((b, length, d)), jnp.float32) for _ in range(2))
    bc = jnp.asarray(rng.standard_normal((b, length, n)), jnp.float32)
    a = -jnp.ones((d, n))
    y, h = sequence_parallel_selective_scan(u, delta, a, bc, bc, delta_softplus=True,
                                            return_last_state=True)
    y_ref, h_ref = ops.selective_scan(u, delta, a, bc, bc, delta_softplus=True,
                                      return_last_state=True)
    assert jnp.allclose(y, y_ref) and jnp.allclose(h, h_ref)
    y_rev = sequence_parallel_selective_scan(u, delta, a, bc, bc, delta_softplus=True,
                                             reverse=True)
    y_ref = ops.selective_scan(u, delta, a, bc, bc, delta_softplus=True, reverse=True)
    assert jnp.allclose(y_rev, y_ref) and not jnp.allclose(y_rev, y)
    w = jnp.asarray(rng.standard_normal((4, d)), jnp.float32)
    conv = sequence_parallel_causal_conv(u, w, w[1])
    xp = jnp.pad(u, ((0, 0), (3, 0), (0, 0)))
    expect = sum(xp[:, k:k + length] * w[k] for k in range(4)) + w[1]
    assert jnp.allclose(conv, expect, atol=1e-6)
    # reverse: the anti-causal conv y_t = sum_k w[k] u_{t+3-k}, zeros past the end
    conv = sequence_parallel_causal_conv(u, w, w[1], reverse=True)
    xp = jnp.pad(u, ((0, 0), (0, 3), (0, 0)))
    expect = sum(xp[:, 3 - k:3 - k + length] * w[k] for k in range(4)) + w[1]
    assert jnp.allclose(conv, expect, atol=1e-6)
    with pytest.raises(ValueError, match="reverse=True"):
        causal_conv(u, w, None, jnp.zeros((b, 3, d)), reverse=True)


@pytest.mark.parametrize("reverse", [False, True])
def test_conv_with_segment_ids_equals_separate_convs(reverse):
    """Packed documents: with segment ids the conv of every segment equals that segment
    convolved alone (one-token segments and a boundary at the last step included)."""
    import jax.numpy as jnp

    from jaxmix.parallel.scan_parallel import causal_conv
    from test_selective_scan import segment_ids_of, segments
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 20, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    seg = segment_ids_of(20, [5, 6, 7, 19], [10])
    got = causal_conv(x, w, w[0], reverse=reverse, segment_ids=seg)
    for b, row in enumerate(np.asarray(seg)):
        for lo, hi in segments(row):
            alone = causal_conv(x[b:b + 1, lo:hi], w, w[0], reverse=reverse)
            np.testing.assert_allclose(got[b:b + 1, lo:hi], alone, atol=1e-6, rtol=0)
    assert not np.allclose(got, causal_conv(x, w, w[0], reverse=reverse), atol=1e-3)
    with pytest.raises(ValueError, match="takes no segment_ids"):
        causal_conv(x, w, None, jnp.zeros((2, 3, 3)), segment_ids=seg)


# Packed documents: segment ids with boundaries right at shard edges (L = 96: 24 and
# 48 divide every shard length), inside a shard, within the conv halo of an edge
# (48, 50) and a long segment whose state crosses several shards; forward over 8
# shards with the xla local scan (values and gradients), reverse over 4 with the
# Pallas one (values: the gradients are autodiff of the same carry masking).
SEG_CASES = [dict(mesh=[1, 1, 1, 8], impl="xla", grads=True),
             dict(mesh=[2, 1, 1, 4], impl="pallas", reverse=True, grads=False)]
SEG_CUTS = ([24, 30], [5, 48, 50])


def segment_rows(cases):
    """Worker side (8 devices): per case the relative errors of the sequence-parallel
    scan (y, last state, gradients) and conv (output, gradients) with segment ids
    against the one-device ops with the same ids."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, PartitionSpec as P
    sys.path.insert(0, os.path.join(ROOT, "tests", "workers"))
    import scan_parallel_cases as w

    from jaxmix import ops
    from jaxmix.parallel import scan_parallel
    seg = np.zeros((w.B, w.L), np.int32)
    for b, cuts in enumerate(SEG_CUTS):
        for c in cuts:
            seg[b, c:] += 1
    seg = jnp.asarray(seg + 7)
    rows = []
    for case in cases:
        reverse = case.get("reverse", False)
        args, cts = w.make_inputs(True, True, seed=3)
        mesh = jax.make_mesh(tuple(case["mesh"]), ("data", "fsdp", "tensor", "sequence"),
                             axis_types=(AxisType.Auto,) * 4)
        bl = P(("data", "fsdp"), "sequence")
        oracle = functools.partial(ops.selective_scan, impl="reference", reverse=reverse,
                                   segment_ids=seg)
        if case["grads"]:
            grads = lambda scan: jax.jit(jax.value_and_grad(w.loss_of(scan, cts),
                                                            has_aux=True))
            conv_grads = w.conv_grads
        else:   # the same structure, values only: (loss, aux), no gradients
            grads = lambda scan: jax.jit(lambda a: (w.loss_of(scan, cts)(a), {}))
            conv_grads = lambda conv, ct: jax.jit(lambda *a: ((0.0, conv(*a)), ()))
        (_, (y_ref, h_ref)), g_ref = grads(oracle)(args)

        def sp_scan(**a):
            s = jax.lax.with_sharding_constraint(seg, bl)
            return scan_parallel.sequence_parallel_selective_scan(
                **a, impl=case["impl"], reverse=reverse, segment_ids=s)

        x, ct = args["u"], cts[0]
        wk = jnp.asarray(np.random.default_rng(1).standard_normal((4, w.D)), jnp.float32)
        conv = lambda sp: lambda x, wk, bias: sp(x, wk, bias, reverse=reverse,
                                                 segment_ids=seg)
        (_, c_ref), gc_ref = conv_grads(conv(scan_parallel.causal_conv), ct)(x, wk, wk[0])
        with jax.set_mesh(mesh):
            (_, (y, h)), g = grads(sp_scan)(args)
            (_, c), gc = conv_grads(conv(scan_parallel.sequence_parallel_causal_conv),
                                    ct)(x, wk, wk[0])
        row = dict(case, y=w.rel(y, y_ref), h=w.rel(h, h_ref), conv=w.rel(c, c_ref))
        row.update({"d_" + k: w.rel(g[k], g_ref[k]) for k in g})
        row.update({f"conv_d{i}": w.rel(a, b)
                    for i, (a, b) in enumerate(zip(gc, gc_ref, strict=True))})
        rows.append(row)
    return rows


def test_sequence_parallel_segments_match_one_device():
    """The carry from earlier shards stops at the first reset of a shard, and the conv
    halo carries its segment ids: the sharded scan and conv with segment ids equal the
    one-device ops (checked against per-segment runs in test_selective_scan)."""
    rows = json_rows([os.path.abspath(__file__), json.dumps(SEG_CASES)], ENV, 600)
    assert len(rows) == len(SEG_CASES)
    for row in rows:
        errors = {k: v for k, v in row.items()
                  if k in ("y", "h") or k.startswith(("d_", "conv"))}
        assert len(errors) == (3 + 9 + 3 if row["grads"] else 3), row
        assert max(errors.values()) <= RTOL, row


if __name__ == "__main__":   # the worker of the segment test (8 simulated devices)
    for r in segment_rows(json.loads(sys.argv[1])):
        print(json.dumps(r), flush=True)
