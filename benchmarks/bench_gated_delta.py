"""Gated delta rule: reference vs the chunked xla form, one JSON line per (impl, shape,
pass) with the median time and the compiled temp memory; with --devices N, the
sequence-parallel op on N simulated CPU devices, composing the per-device state maps
against passing states device to device, next to the one-device op.

  .venv/bin/python benchmarks/bench_gated_delta.py                  # memory + speed
  .venv/bin/python benchmarks/bench_gated_delta.py --shapes 1,2048,4,64,64
  .venv/bin/python benchmarks/bench_gated_delta.py --devices 8 --shapes 1,4096,4,64,64

Shapes are B,L,H,d_k,d_v. `state_array_bytes` is one [B, L, H, d_k, d_v] fp32 array:
the chunked form's fwd+bwd must stay under it (it keeps states at chunk boundaries
only); the reference's autodiff keeps one state per token. An impl is only run when
its temp memory is under --max_run_bytes (otherwise compiled and reported). A timed
row carries the roofline fields (benchmarks/roofline.py) of the gated-delta kernel's
cost estimate at --chunk_size (the xla, reference and sequence-parallel rows name it
in "work_from": the work the op must do).
"""
import argparse
import json
import os
import sys

if "--devices" in sys.argv:  # before jax is imported
    n_dev = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={n_dev}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

from benchmarks import roofline  # noqa: E402
from benchmarks.bench_scan import measure  # noqa: E402
from jaxmix import ops, parallel  # noqa: E402

DEFAULT_SHAPES = ("1,2048,4,64,64", "1,16384,4,128,128")


def inputs(bsz, length, h, dk, dv):
    ks = jax.random.split(jax.random.key(0), 5)
    return dict(q=jax.random.normal(ks[0], (bsz, length, h, dk)),
                k=jax.random.normal(ks[1], (bsz, length, h, dk)),
                v=jax.random.normal(ks[2], (bsz, length, h, dv)),
                g=-jax.random.uniform(ks[3], (bsz, length, h), maxval=0.2),
                beta=jax.random.uniform(ks[4], (bsz, length, h)))


def make_fns(op):
    def fwd(x):
        return op(**x)

    def loss(x):
        o, s = op(**x)
        return jnp.sum(o) + jnp.sum(s)
    return {"fwd": jax.jit(fwd), "fwd_bwd": jax.jit(jax.grad(loss))}


def report(name, fns, x, base, args):
    for pass_, fn in fns.items():
        row = dict(base, impl=name, **{"pass": pass_})
        compiled = fn.lower(x).compile()
        row["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
        if row["temp_bytes"] > args.max_run_bytes:
            row["skipped"] = "temp memory"
        else:
            row["seconds"], row["min_seconds"] = measure(compiled, x, args.iters)
            row.update(roofline.fields(
                row["seconds"], "gated_delta", base["B"], base["H"], base["L"], base["d_k"],
                base["d_v"], chunk=args.chunk_size, backward=pass_ == "fwd_bwd",
                dtype_bytes=x["q"].dtype.itemsize,
                work_from=None if name == "pallas" else "kernels_pallas.gated_delta"))
        print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="B,L,H,d_k,d_v")
    ap.add_argument("--impls", nargs="*", default=("reference", "xla"))
    ap.add_argument("--devices", type=int, default=0,
                    help="sequence-parallel on this many simulated CPU devices")
    ap.add_argument("--chunk_size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--max_run_bytes", type=float, default=4e9)
    args = ap.parse_args()
    print(json.dumps(dict(bench="env", backend=jax.default_backend(), jax=jax.__version__,
                          devices=jax.device_count(), cpus=os.cpu_count())), flush=True)
    for spec in args.shapes:
        bsz, length, h, dk, dv = (int(v) for v in spec.split(","))
        x = inputs(bsz, length, h, dk, dv)
        base = dict(bench="gated_delta", B=bsz, L=length, H=h, d_k=dk, d_v=dv,
                    state_array_bytes=bsz * length * h * dk * dv * 4)
        for impl in args.impls:
            op = lambda impl=impl, **a: ops.gated_delta_rule(**a, impl=impl,
                                                             chunk_size=args.chunk_size)
            report(impl, make_fns(op), x, base, args)
        if args.devices:
            mesh = jax.make_mesh((args.devices,), ("sequence",), axis_types=(AxisType.Auto,))
            for method in ("compose", "pass"):
                def sp(method=method, **a):
                    a = {k: jax.lax.with_sharding_constraint(v, P(None, "sequence"))
                         for k, v in a.items()}
                    return parallel.sequence_parallel_gated_delta_rule(
                        **a, chunk_size=args.chunk_size, method=method)
                with jax.set_mesh(mesh):
                    report(f"sequence_parallel_{method}_{args.devices}", make_fns(sp), x,
                           base, args)


if __name__ == "__main__":
    main()
