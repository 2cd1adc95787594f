"""Worker (8 simulated CPU devices): the sequence-parallel selective scan and conv halo.

  python tests/workers/scan_parallel_cases.py '{"cases": [{"mesh": [data, fsdp, tensor, seq],
      "gate": bool, "init": bool}, ...]}'
Each case runs `parallel.sequence_parallel_selective_scan` in a jit under
`jax.set_mesh` and `ops.selective_scan(impl="reference")` on one device, and prints
the relative errors (max |a - b| / max |b|) of y, the last state and every gradient,
plus the error of `sequence_parallel_causal_conv` against the one-device conv.
  python tests/workers/scan_parallel_cases.py hlo  -> the all-gathers of the compiled scan
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

from jaxmix import ops  # noqa: E402
from jaxmix.parallel import scan_parallel  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
B, L, D, N = 2, 96, 8, 4
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(gate, init, seed=0):
    rng = np.random.default_rng(seed)
    f = np.float32
    args = {"u": rng.standard_normal((B, L, D)).astype(f),
            "delta": (rng.standard_normal((B, L, D)) - 1.5).astype(f),
            "A": -np.broadcast_to(np.arange(1, N + 1, dtype=f), (D, N)).copy()
            * rng.uniform(0.2, 1.0, (D, 1)).astype(f),
            "B": rng.standard_normal((B, L, N)).astype(f),
            "C": rng.standard_normal((B, L, N)).astype(f),
            "D": rng.standard_normal((D,)).astype(f),
            "z": rng.standard_normal((B, L, D)).astype(f) if gate else None,
            "delta_bias": (0.1 * rng.standard_normal((D,))).astype(f),
            "initial_state": rng.standard_normal((B, D, N)).astype(f) if init else None}
    cts = (rng.standard_normal((B, L, D)).astype(f), rng.standard_normal((B, D, N)).astype(f))
    return args, cts


def loss_of(scan, cts):
    def loss(args):
        y, h = scan(**args, delta_softplus=True, return_last_state=True)
        return jnp.sum(y * cts[0]) + jnp.sum(h * cts[1]), (y, h)
    return loss


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def check(case):
    args, cts = make_inputs(case["gate"], case["init"])
    args = {k: v for k, v in args.items() if v is not None}
    ref = jax.jit(jax.value_and_grad(
        loss_of(lambda **a: ops.selective_scan(**a, impl="reference"), cts), has_aux=True))
    (_, (y_ref, h_ref)), g_ref = ref(args)
    mesh = jax.make_mesh(tuple(case["mesh"]), ("data", "fsdp", "tensor", "sequence"),
                         axis_types=(AxisType.Auto,) * 4)
    batch = P(("data", "fsdp"), "sequence")

    def sp_scan(**a):
        for k in ("u", "delta", "B", "C", "z"):
            if k in a:
                a[k] = jax.lax.with_sharding_constraint(a[k], batch)
        return scan_parallel.sequence_parallel_selective_scan(**a)

    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(loss_of(sp_scan, cts), has_aux=True))
        (_, (y, h)), g = fn(args)
        w = jnp.asarray(np.random.default_rng(1).standard_normal((4, D)), jnp.float32)
        conv = jax.jit(lambda x, w: scan_parallel.sequence_parallel_causal_conv(x, w, w[0]))
        conv_err = rel(conv(args["u"], w),
                       scan_parallel.causal_conv_shard_local(args["u"], w, w[0]))
    row = dict(case, y=rel(y, y_ref), h=rel(h, h_ref), conv=conv_err)
    for k in g:
        row["d_" + k] = rel(g[k], g_ref[k])
    return row


def hlo_report():
    """Shapes of every all-gather in the compiled fwd+bwd of the scan over 8 devices."""
    import re
    args, cts = make_inputs(True, False)
    args = {k: v for k, v in args.items() if v is not None}
    mesh = jax.make_mesh((1, 1, 1, 8), ("data", "fsdp", "tensor", "sequence"),
                         axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh):
        fn = jax.jit(jax.grad(lambda a: loss_of(
            scan_parallel.sequence_parallel_selective_scan, cts)(a)[0]))
        text = fn.lower(args).compile().as_text()
    gathers = re.findall(r"= (\w+\[[\d,]*\])[^ ]* all-gather(?:-start)?\(", text)
    return {"all_gather_shapes": gathers, "max_state_elems": 8 * B * D * N,
            "collective_permutes": len(re.findall(r" collective-permute(?:-start)?\(", text))}


def main():
    if sys.argv[1] == "hlo":
        print(json.dumps(hlo_report()), flush=True)
        return
    for case in json.loads(sys.argv[1])["cases"]:
        print(json.dumps(check(case)), flush=True)


if __name__ == "__main__":
    main()
