"""Streaming (sink + recent window) attention against full causal attention.

Times forward+backward of `ops.attention(..., causal=True, sliding_window=R, sink=S)`
and of full causal attention with the same implementation, shapes and dtype, in one
run. One JSON line per measurement, then a summary with the time ratio (target: at
most 0.15 at L 16384, S 64, R 256 for the xla path, whose cost is O(L x (S + R))).

  python benchmarks/bench_streaming.py                       # xla, L 16384
  python benchmarks/bench_streaming.py --impls xla,pallas --lengths 4096   # on a TPU/GPU
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_attention import best_time  # noqa: E402
from jaxmix import ops  # noqa: E402


def fwd_bwd(impl, window, sink, args):
    w = jax.random.normal(jax.random.PRNGKey(3), args[0].shape, args[0].dtype)

    def loss(q, k, v):
        o = ops.attention(q, k, v, causal=True, sliding_window=window, sink=sink, impl=impl)
        return jnp.sum(o * w)
    return jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="16384")
    p.add_argument("--impls", default="xla")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    dtype = jnp.dtype(a.dtype)
    summary = {}
    for length in (int(x) for x in a.lengths.split(",")):
        keys = jax.random.split(jax.random.PRNGKey(length), 3)
        args = tuple(jax.random.normal(kk, (a.batch, length, a.heads, a.head_dim), dtype)
                     for kk in keys)
        for impl in a.impls.split(","):
            times = {}
            for name, window, sink in (("full", None, 0), ("streaming", a.recent, a.sink)):
                fn = fwd_bwd(impl, window, sink, args)
                times[name] = best_time(fn, args, a.repeats)
                print(json.dumps(dict(impl=impl, L=length, attention=name, sink=sink,
                                      recent=window, time_s=times[name], batch=a.batch,
                                      heads=a.heads, head_dim=a.head_dim, dtype=a.dtype,
                                      backend=jax.default_backend())), flush=True)
            summary[f"{impl}_L{length}"] = times["streaming"] / times["full"]
    print(json.dumps({"summary": "fwd+bwd time, streaming / full causal", **summary,
                      "limit": 0.15}), flush=True)


if __name__ == "__main__":
    main()
