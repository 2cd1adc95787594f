"""Sequence-parallel selective scan and conv halo on 8 simulated CPU devices.

The scan and the conv run in shard_maps with the default check_vma=True (the Pallas
case unchecked, as a pallas_call needs; its local scans run the kernel per device over
batch and channels too); the conv is checked, values and gradients, against the
unsharded depthwise `lax.conv_general_dilated`. The reverse case (reverse=True) checks
both against the forward oracles run on inputs flipped along time.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, devices_env

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
    proc = subprocess.run([sys.executable, script, arg], capture_output=True, text=True,
                          env=dict(os.environ, **ENV), timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


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
