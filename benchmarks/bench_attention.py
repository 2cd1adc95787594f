"""Attention benchmark: time and compiled temp memory, forward and forward+backward.

Implementations: reference (materialised fp32 softmax), xla (blocked, O(L)),
pallas (interpret mode off TPU: correctness-speed only, small L), and the
baseline `jax.nn.dot_product_attention(implementation="xla")` ("dpa").
One JSON line per measurement, then a summary line comparing xla to dpa:
forward+backward time ratio at L=4096 and temp-memory ratio at L=16384. A timed row
carries the roofline fields (benchmarks/roofline.py) of the flash kernel's cost
estimate for its shape, counted per query head (rows of other impls name it in
"work_from": the work the op must do).

  python benchmarks/bench_attention.py                         # L = 512 .. 32768
  python benchmarks/bench_attention.py --lengths 4096,16384 --impls xla,dpa
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import roofline  # noqa: E402
from jaxmix import ops  # noqa: E402

IMPLS = ("reference", "xla", "pallas", "dpa")


def attention_fn(impl, causal):
    if impl == "dpa":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation="xla")
    return lambda q, k, v: ops.attention(q, k, v, causal=causal, impl=impl)


def compiled(impl, causal, backward, args):
    f = attention_fn(impl, causal)
    if backward:
        w = jax.random.normal(jax.random.PRNGKey(3), args[0].shape, args[0].dtype)
        f = jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), (0, 1, 2))
    return jax.jit(f).lower(*args).compile()


def best_time(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def should_time(impl, length, a):
    if impl == "pallas":
        return length <= a.pallas_max_len
    if impl in ("reference", "dpa"):
        return length <= a.dense_time_max_len
    return length <= a.xla_time_max_len


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,1024,2048,4096,8192,16384,32768")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--kv-heads", type=int, default=0, help="0: same as --heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--pallas-max-len", type=int, default=512,
                   help="pallas runs (interpret mode off TPU) only up to this L")
    p.add_argument("--dense-time-max-len", type=int, default=8192,
                   help="reference/dpa are timed up to this L (memory is always reported)")
    p.add_argument("--xla-time-max-len", type=int, default=32768)
    a = p.parse_args()
    causal = not a.no_causal
    dtype = jnp.dtype(a.dtype)
    kv_heads = a.kv_heads or a.heads
    results = {}
    for length in (int(x) for x in a.lengths.split(",")):
        keys = jax.random.split(jax.random.PRNGKey(length), 3)
        q = jax.random.normal(keys[0], (a.batch, length, a.heads, a.head_dim), dtype)
        k, v = (jax.random.normal(kk, (a.batch, length, kv_heads, a.head_dim), dtype)
                for kk in keys[1:])
        for impl in a.impls.split(","):
            if impl == "pallas" and length > a.pallas_max_len:
                continue
            for name in a.passes.split(","):
                fn = compiled(impl, causal, name == "fwd+bwd", (q, k, v))
                temp = fn.memory_analysis().temp_size_in_bytes
                secs = best_time(fn, (q, k, v), a.repeats) if should_time(impl, length, a) else None
                row = dict(impl=impl, L=length, pass_=name, time_s=secs, temp_bytes=int(temp),
                           batch=a.batch, heads=a.heads, kv_heads=kv_heads,
                           head_dim=a.head_dim, dtype=a.dtype, causal=causal,
                           backend=jax.default_backend())
                row["pass"] = row.pop("pass_")
                if secs is not None:
                    row.update(roofline.fields(
                        secs, "flash_attention", a.batch, a.heads, length, length,
                        a.head_dim, causal=causal, backward=name == "fwd+bwd",
                        dtype_bytes=dtype.itemsize,
                        work_from=None if impl == "pallas" else "kernels_pallas.flash_attention"))
                results[(impl, length, name)] = row
                print(json.dumps(row), flush=True)

    def ratio(length, field):
        x, d = results.get(("xla", length, "fwd+bwd")), results.get(("dpa", length, "fwd+bwd"))
        if not x or not d or not x[field] or not d[field]:
            return None
        return x[field] / d[field]

    print(json.dumps({"summary": "xla vs jax.nn.dot_product_attention(xla), fwd+bwd",
                      "time_ratio_at_4096": ratio(4096, "time_s"),
                      "time_ratio_limit": 1.5,
                      "temp_memory_ratio_at_16384": ratio(16384, "temp_bytes"),
                      "temp_memory_ratio_limit": 0.1}), flush=True)


if __name__ == "__main__":
    main()
