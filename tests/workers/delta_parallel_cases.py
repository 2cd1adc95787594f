"""Worker (8 simulated CPU devices): the sequence-parallel gated delta rule.

  python tests/workers/delta_parallel_cases.py '{"cases": [{"mesh": [data, fsdp, tensor,
      seq], "init": bool, "segments": bool, "method": "compose" | "pass"}, ...]}'
Each case runs `parallel.sequence_parallel_gated_delta_rule` in a jit under
`jax.set_mesh` (batch over data/fsdp, length over sequence, heads over tensor) and
`ops.gated_delta_rule(impl="reference")` on one device, and prints the relative
errors (max |a - b| / max |b|) of the outputs, the final state and every gradient.
"""
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

from jaxmix import ops  # noqa: E402
from jaxmix.parallel import delta_parallel  # noqa: E402

B, L, H, DK, DV = 2, 96, 2, 8, 16


def make_inputs(init, segments, seed=0):
    rng = np.random.default_rng(seed)
    f = np.float32
    args = {"q": rng.standard_normal((B, L, H, DK)).astype(f),
            "k": rng.standard_normal((B, L, H, DK)).astype(f),
            "v": rng.standard_normal((B, L, H, DV)).astype(f),
            "g": -rng.uniform(0.0, 0.3, (B, L, H)).astype(f),
            "beta": rng.uniform(0.1, 1.0, (B, L, H)).astype(f)}
    if init:
        args["initial_state"] = rng.standard_normal((B, H, DK, DV)).astype(f)
    seg = None
    if segments:  # resets inside shards and exactly at shard starts (48, 72 of 96)
        seg = np.zeros((B, L), np.int32)
        for start in (13, 48, 72):
            seg[:, start:] += 1
        seg[1, 30:] += 1
    cts = (rng.standard_normal((B, L, H, DV)).astype(f),
           rng.standard_normal((B, H, DK, DV)).astype(f))
    return args, seg, cts


def loss_of(op, seg, cts):
    def loss(args):
        o, s = op(**args, segment_ids=seg)
        return jnp.sum(o * cts[0]) + jnp.sum(s * cts[1]), (o, s)
    return loss


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def check(case):
    args, seg, cts = make_inputs(case["init"], case["segments"])
    ref = jax.jit(jax.value_and_grad(loss_of(
        lambda **a: ops.gated_delta_rule(**a, impl="reference"), seg, cts), has_aux=True))
    (_, (o_ref, s_ref)), g_ref = ref(args)
    mesh = jax.make_mesh(tuple(case["mesh"]), ("data", "fsdp", "tensor", "sequence"),
                         axis_types=(AxisType.Auto,) * 4)
    blh = P(("data", "fsdp"), "sequence", "tensor")
    specs = {"q": blh, "k": blh, "v": blh, "g": blh, "beta": blh,
             "initial_state": P(("data", "fsdp"), "tensor"),
             "segment_ids": P(("data", "fsdp"), "sequence")}

    def sp(**a):
        a = {k: v if v is None else jax.lax.with_sharding_constraint(v, specs[k])
             for k, v in a.items()}
        return delta_parallel.sequence_parallel_gated_delta_rule(
            **a, chunk_size=16, method=case.get("method", "compose"))

    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(loss_of(sp, seg, cts), has_aux=True))
        (_, (o, s)), g = fn(args)
    row = dict(case, o=rel(o, o_ref), state=rel(s, s_ref))
    for k in g:
        row["d_" + k] = rel(g[k], g_ref[k])
    return row


def main():
    for case in json.loads(sys.argv[1])["cases"]:
        print(json.dumps(check(case)), flush=True)


if __name__ == "__main__":
    main()
