"""Selective scan: reference vs xla vs pallas (interpret mode off TPU), one JSON line
per (impl, shape, pass) with the median time, the compiled temp memory and, for a
timed row, the roofline fields (benchmarks/roofline.py) of the scan kernel's cost
estimate for this backend (the xla and reference rows name it in "work_from").

  .venv/bin/python benchmarks/bench_scan.py                 # default shapes
  .venv/bin/python benchmarks/bench_scan.py --shapes 8,256,512,16 1,8192,512,16

Inputs are the Mamba mixer's (softplus(delta + bias), D skip, z gate, last state).
An impl is only *run* when its compiled temp memory is under --max_run_bytes (the
reference at long L is compiled and reported, not run); pallas in interpret mode is
only run up to --max_interpret_elems B*L*D elements, because the interpreter is slow.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import roofline  # noqa: E402
from jaxmix import ops  # noqa: E402

DEFAULT_SHAPES = ("1,256,512,16", "8,256,512,16", "1,2048,512,16", "1,8192,512,16")


def inputs(bsz, length, d, n):
    ks = jax.random.split(jax.random.key(0), 8)
    return dict(
        u=jax.random.normal(ks[0], (bsz, length, d)),
        delta=jax.random.normal(ks[1], (bsz, length, d)) - 2.0,
        A=-jnp.broadcast_to(jnp.arange(1.0, n + 1), (d, n)),
        B=jax.random.normal(ks[2], (bsz, length, n)),
        C=jax.random.normal(ks[3], (bsz, length, n)),
        D=jnp.ones((d,)), z=jax.random.normal(ks[4], (bsz, length, d)),
        delta_bias=jnp.zeros((d,)))


def make_fns(impl):
    def fwd(x):
        return ops.selective_scan(**x, delta_softplus=True, return_last_state=True, impl=impl)

    def loss(x):
        y, h = fwd(x)
        return jnp.sum(y) + jnp.sum(h)

    return {"fwd": jax.jit(fwd), "fwd_bwd": jax.jit(jax.grad(loss))}


def measure(fn, x, iters):
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="B,L,D,N")
    ap.add_argument("--impls", nargs="*", default=("reference", "xla", "pallas"))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--max_run_bytes", type=float, default=2e9)
    ap.add_argument("--max_interpret_elems", type=int, default=300_000)
    args = ap.parse_args()
    print(json.dumps(dict(bench="env", backend=jax.default_backend(), jax=jax.__version__,
                          cpus=os.cpu_count())), flush=True)
    for spec in args.shapes:
        bsz, length, d, n = (int(v) for v in spec.split(","))
        x = inputs(bsz, length, d, n)
        bldn_bytes = bsz * length * d * n * 4
        for impl in args.impls:
            interpret = impl == "pallas" and jax.default_backend() != "tpu"
            for name, fn in make_fns(impl).items():
                row = dict(bench="scan", impl=impl + ("_interpret" if interpret else ""),
                           pass_=name, B=bsz, L=length, D=d, N=n, bldn_fp32_bytes=bldn_bytes)
                compiled = fn.lower(x).compile()
                row["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
                too_big = row["temp_bytes"] > args.max_run_bytes
                too_slow = interpret and bsz * length * d > args.max_interpret_elems
                if too_big or too_slow:
                    row["skipped"] = "temp memory" if too_big else "interpret mode too slow"
                else:
                    med, best = measure(compiled, x, args.iters)
                    row.update(seconds=med, min_seconds=best,
                               ns_per_elem=1e9 * med / (bsz * length * d * n))
                    kernel = roofline.scan_kernel()
                    row.update(roofline.fields(
                        med, kernel, bsz, length, d, n, backward=name == "fwd_bwd",
                        dtype_bytes=x["u"].dtype.itemsize,
                        work_from=None if impl == "pallas" else f"kernels_pallas.{kernel}"))
                print(json.dumps(row).replace("pass_", "pass"), flush=True)


if __name__ == "__main__":
    main()
