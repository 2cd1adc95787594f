"""Sequence-parallel gated delta rule on 2, 4 and 8 simulated CPU devices: outputs,
final state and every gradient against the one-device reference recurrence, with the
state composed across devices (and passed device to device), with resets inside
shards and exactly at shard starts."""
import json
import os

import jax.numpy as jnp
import numpy as np

from conftest import ROOT, devices_env, json_rows

ENV = devices_env(8)
RTOL = 1e-4
# (data, fsdp, tensor, sequence)
CASES = [dict(mesh=[1, 1, 1, 8], init=True, segments=True),
         dict(mesh=[2, 1, 1, 4], init=False, segments=True),
         dict(mesh=[1, 2, 2, 2], init=True, segments=False),
         dict(mesh=[2, 1, 1, 4], init=True, segments=True, method="pass")]


def test_sequence_parallel_delta_rule_matches_one_device():
    script = os.path.join(ROOT, "tests", "workers", "delta_parallel_cases.py")
    rows = json_rows([script, json.dumps({"cases": CASES})], ENV)
    assert len(rows) == len(CASES)
    for row in rows:
        errors = {k: v for k, v in row.items() if k in ("o", "state") or k.startswith("d_")}
        want = {"o", "state", "d_q", "d_k", "d_v", "d_g", "d_beta"}
        want |= {"d_initial_state"} if row["init"] else set()
        assert set(errors) == want, row
        assert errors["o"] <= 1e-5 and errors["state"] <= 1e-5, row
        assert max(errors.values()) <= RTOL, row


def test_the_map_of_a_sequence_gives_its_final_state():
    from jaxmix.ops import gated_delta as gd
    rng = np.random.default_rng(3)
    b, length, h, dk, dv = 2, 40, 2, 8, 4
    q, k = (jnp.asarray(rng.standard_normal((b, length, h, dk)), jnp.float32) for _ in "qk")
    v = jnp.asarray(rng.standard_normal((b, length, h, dv)), jnp.float32)
    g = -jnp.asarray(rng.uniform(0, 0.3, (b, length, h)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 1, (b, length, h)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    seg = jnp.asarray(np.repeat([[0] * 25 + [1] * 15], b, 0))
    for ids in (None, seg):
        P_, Q_ = gd.gated_delta_rule_map(q, k, v, g, beta, segment_ids=ids, chunk_size=16)
        _, want = gd.gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=ids,
                                      impl="reference")
        got = jnp.einsum("bhkj,bhjv->bhkv", P_, s0) + Q_
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))))
