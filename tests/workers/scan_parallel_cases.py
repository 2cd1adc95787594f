"""Worker (8 simulated CPU devices): the sequence-parallel selective scan and conv halo.

  python tests/workers/scan_parallel_cases.py '{"cases": [{"mesh": [data, fsdp, tensor, seq],
      "gate": bool, "init": bool, "impl": local scan impl (optional, "auto"; with
      "pallas" the scan's shard_map is unchecked and each device's local scan runs the
      kernel per device in a nested shard_map), "reverse": bool (optional)}, ...]}'
Each case runs `parallel.sequence_parallel_selective_scan` in a jit under
`jax.set_mesh` (batch over data/fsdp, length over sequence, channels D over tensor)
and `ops.selective_scan(impl="reference")` on one device, and prints the relative
errors (max |a - b| / max |b|) of y, the last state and every gradient; then the
same for `sequence_parallel_causal_conv` (output and d_x, d_w, d_bias as conv,
conv_d_x, ...) against the unsharded depthwise `lax.conv_general_dilated`. With
"reverse" both run with reverse=True and the oracles are the forward ones on inputs
flipped along time, their outputs flipped back.
  python tests/workers/scan_parallel_cases.py hlo  -> the all-gathers of the compiled scan
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
from jaxmix.parallel import scan_parallel  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
B, L, D, N = 2, 96, 8, 4
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
TIME_INDEXED = ("u", "delta", "B", "C", "z")


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


def conv_oracle(x_BLD, w_KD, bias_D):
    """The unsharded depthwise causal conv: feature_group_count=D, left padding K-1."""
    width, d = w_KD.shape
    y = jax.lax.conv_general_dilated(x_BLD, w_KD.reshape(width, 1, d), window_strides=(1,),
                                     padding=[(width - 1, 0)], feature_group_count=d,
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias_D


def flip_time(x):
    return jnp.flip(x, axis=1)


def flipped_scan(scan):
    """The reverse scan built from the forward `scan`: every time-indexed input flipped
    along time, y flipped back (the last state is then the one after step 0)."""
    def reverse_scan(**a):
        y, h = scan(**{k: flip_time(v) if k in TIME_INDEXED else v for k, v in a.items()})
        return flip_time(y), h
    return reverse_scan


def flipped_conv(conv):
    """The anti-causal conv built from the causal `conv`: flip(conv(flip(x)))."""
    return lambda x, w, bias: flip_time(conv(flip_time(x), w, bias))


def conv_grads(conv, ct_BLD):
    def loss(x, w, bias):
        y = conv(x, w, bias)
        return jnp.sum(y * ct_BLD), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def check_conv(mesh, bld, width=4, seed=2, reverse=False):
    """sequence_parallel_causal_conv (x over `bld`, w / bias over tensor) vs the oracle
    (flipped for `reverse`)."""
    rng = np.random.default_rng(seed)
    x, ct = (jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((width, D)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((D,)), jnp.float32)
    oracle = flipped_conv(conv_oracle) if reverse else conv_oracle
    (_, y_ref), g_ref = conv_grads(oracle, ct)(x, w, bias)

    def sp_conv(x, w, bias):
        x = jax.lax.with_sharding_constraint(x, bld)
        w = jax.lax.with_sharding_constraint(w, P(None, "tensor"))
        bias = jax.lax.with_sharding_constraint(bias, P("tensor"))
        return scan_parallel.sequence_parallel_causal_conv(x, w, bias, reverse=reverse)

    with jax.set_mesh(mesh):
        (_, y), g = conv_grads(sp_conv, ct)(x, w, bias)
    row = {"conv": rel(y, y_ref)}
    for name, a, b in zip(("x", "w", "bias"), g, g_ref, strict=True):
        row["conv_d_" + name] = rel(a, b)
    return row


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def check(case):
    args, cts = make_inputs(case["gate"], case["init"])
    args = {k: v for k, v in args.items() if v is not None}
    reverse = case.get("reverse", False)
    oracle = lambda **a: ops.selective_scan(**a, impl="reference")
    ref = jax.jit(jax.value_and_grad(
        loss_of(flipped_scan(oracle) if reverse else oracle, cts), has_aux=True))
    (_, (y_ref, h_ref)), g_ref = ref(args)
    mesh = jax.make_mesh(tuple(case["mesh"]), ("data", "fsdp", "tensor", "sequence"),
                         axis_types=(AxisType.Auto,) * 4)
    # As the Mamba mixer shards them: batch over data/fsdp, channels D over tensor.
    bld, bln = P(("data", "fsdp"), "sequence", "tensor"), P(("data", "fsdp"), "sequence")
    specs = {"u": bld, "delta": bld, "z": bld, "B": bln, "C": bln, "A": P("tensor"),
             "D": P("tensor"), "delta_bias": P("tensor"),
             "initial_state": P(("data", "fsdp"), "tensor")}

    def sp_scan(**a):
        a = {k: jax.lax.with_sharding_constraint(v, specs[k]) if k in specs else v
             for k, v in a.items()}
        return scan_parallel.sequence_parallel_selective_scan(
            **a, impl=case.get("impl", "auto"), reverse=reverse)

    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(loss_of(sp_scan, cts), has_aux=True))
        (_, (y, h)), g = fn(args)
    row = dict(case, y=rel(y, y_ref), h=rel(h, h_ref), **check_conv(mesh, bld, reverse=reverse))
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
