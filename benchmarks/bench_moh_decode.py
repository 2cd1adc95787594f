"""One decoded token of MoH attention vs dense multi-head attention over a long cache.

  python benchmarks/bench_moh_decode.py [--cache 8192] [--batch 1] [--heads 8]
      [--head_dim 64] [--active 0.5,0.75] [--impls xla,reference] [--iters 50]

Both mixers have the same shapes and a KV cache filled with `--cache` tokens; the timed
call is the jit'd mixer step for one new token (projections, the in-place cache write,
attention, gates), with the cache donated as in generation's decode loop. MoH computes only the shared + top-k heads the token activates.
For each `attn_impl` (xla: a decoded token of either mixer runs ops.decode_attention,
MoH's over its active heads only; reference: the dense step runs the masked-softmax
oracle, MoH's the same decode_attention), one JSON line per mixer: median
seconds per step and `ratio_to_dense` (the dense MHA step with the same impl, measured
in the same run, is the baseline), and `attention_ratio_to_dense`: the same ratio after
subtracting each mixer's step over a 1-slot cache (projections, routing, gates).
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxmix.mixers.attention import Attention  # noqa: E402
from jaxmix.mixers.moh import MoH  # noqa: E402


def config(a, cache, impl, **moh):
    return ml_collections.FrozenConfigDict(dict(
        MoH.DEFAULTS, d_model=a.heads * a.head_dim, n_layers=1, dtype="float32",
        n_heads=a.heads, n_kv_heads=a.heads, attn_impl=impl, max_cache_len=cache, **moh))


def seconds_per_step(module, params, cache, x, iters):
    """Median seconds of the step as generation runs it: the cache is donated and
    updated in place, each call writes the last slot and attends over all of them."""
    step = jax.jit(lambda p, x, c: module.apply({"params": p}, x, decode=True, cache=c)[:2],
                   donate_argnums=2)
    last = int(cache["index"])
    times = []
    for i in range(iters + 2):  # two warm-up calls (the first compiles)
        t0 = time.perf_counter()
        y, cache = step(params, x, cache)
        jax.block_until_ready((y, cache))
        if i >= 2:
            times.append(time.perf_counter() - t0)
        cache = dict(cache, index=jnp.asarray(last, jnp.int32))
    return statistics.median(times)


def filled_cache(module, batch, length):
    c = module.init_cache(batch, length, jnp.float32)
    k = jax.random.normal(jax.random.PRNGKey(1), c["k"].shape)
    v = jax.random.normal(jax.random.PRNGKey(2), c["v"].shape)
    return {"k": k, "v": v, "index": jnp.asarray(length - 1, jnp.int32)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--active", default="0.5,0.75", help="fractions of active heads")
    ap.add_argument("--impls", default="xla,reference", help="attn_impl of the decode steps")
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args(argv)
    x = jax.random.normal(jax.random.PRNGKey(0), (a.batch, 1, a.heads * a.head_dim))

    def timed(cls, cache_len, impl, **moh):
        m = cls(config(a, cache_len, impl, **moh))
        params = m.init(jax.random.PRNGKey(0), x)["params"]
        return seconds_per_step(m, params, filled_cache(m, a.batch, cache_len), x, a.iters)

    row = dict(bench="moh_decode", backend=jax.default_backend(), batch=a.batch,
               cache=a.cache, heads=a.heads, head_dim=a.head_dim)
    for impl in a.impls.split(","):
        dense, dense_base = timed(Attention, a.cache, impl), timed(Attention, 1, impl)
        print(json.dumps(dict(row, impl=impl, mixer="attention", active=1.0, seconds=dense,
                              ratio_to_dense=1.0, attention_ratio_to_dense=1.0)), flush=True)
        for frac in (float(f) for f in a.active.split(",")):
            active = round(frac * a.heads)
            shared = max(1, active // 2)
            moh = dict(shared_heads=shared, top_k=active - shared)
            sec, base = timed(MoH, a.cache, impl, **moh), timed(MoH, 1, impl, **moh)
            print(json.dumps(dict(row, impl=impl, mixer="moh", active=active / a.heads, **moh,
                                  seconds=sec, ratio_to_dense=sec / dense,
                                  attention_ratio_to_dense=(sec - base) / (dense - dense_base))),
                  flush=True)


if __name__ == "__main__":
    main()
