"""Ring attention and long-context training on 8 simulated CPU devices.

  .venv/bin/python benchmarks/bench_ring.py memory [--length 65536]
      per-device compiled temp memory of ring attention forward+backward over 8
      devices vs the single-device blocked xla path at the same L (compile only).
  .venv/bin/python benchmarks/bench_ring.py timing [--length 2048]
      forward+backward seconds of ring vs all-gather-K/V (both 8 devices) vs one
      device, at a short per-device chunk (L / 8 tokens per device).
  .venv/bin/python benchmarks/bench_ring.py step --config configs/long_context.py:PRESET
          [--set mesh.sequence=1 train.seq_len=16384 ...] [--compile-only]
      one training step of a preset (compile + run): seconds, compiled per-device
      memory and the process's peak RSS (all 8 simulated devices together), through
      the trainer's own Run (the mixers go sequence-parallel when mesh.sequence > 1).
Prints one JSON line per measurement.
"""
import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

from benchmarks.roofline import best_seconds  # noqa: E402
from jaxmix import ops, parallel  # noqa: E402
from jaxmix.ops.attention_xla import attention_xla  # noqa: E402
from jaxmix.parallel.ring_attention import RING_BLOCK  # noqa: E402
from jaxmix.parallel.zigzag import shard_positions  # noqa: E402

SEQ = P(None, "sequence")


def emit(**row):
    print(json.dumps(row), flush=True)


def seq_mesh(n):
    return jax.make_mesh((n,), ("sequence",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])


def ring_loss(n, causal=True, layout="zigzag"):
    def body(q, k, v):
        return parallel.ring_attention(q, k, v, causal=causal, layout=layout)
    fn = jax.shard_map(body, mesh=seq_mesh(n), in_specs=(SEQ,) * 3, out_specs=SEQ,
                       check_vma=False)
    return lambda q, k, v: jnp.sum(fn(q, k, v))


def allgather_loss(n, causal=True, layout="zigzag"):
    """Baseline: all-gather K/V (and positions) once, then blocked attention locally."""
    def body(q, k, v):
        pos = shard_positions(layout, "sequence", q.shape[0], q.shape[1])
        k_all, v_all, pos_all = (lax.all_gather(x, "sequence", axis=1, tiled=True)
                                 for x in (k, v, pos))
        out, _ = attention_xla(q, k_all, v_all, causal=causal, q_positions=pos,
                               kv_positions=pos_all, block_q=RING_BLOCK, block_k=RING_BLOCK)
        return out
    fn = jax.shard_map(body, mesh=seq_mesh(n), in_specs=(SEQ,) * 3, out_specs=SEQ,
                       check_vma=False)
    return lambda q, k, v: jnp.sum(fn(q, k, v))


def single_loss(causal=True):
    return lambda q, k, v: jnp.sum(ops.attention(q, k, v, causal=causal, impl="xla"))


def shapes(length, b=1, hq=8, hkv=2, d=64, dtype=jnp.float32):
    return (jax.ShapeDtypeStruct((b, length, hq, d), dtype),
            jax.ShapeDtypeStruct((b, length, hkv, d), dtype),
            jax.ShapeDtypeStruct((b, length, hkv, d), dtype))


def grad_fn(loss):
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def compiled_memory(loss, args):
    mem = grad_fn(loss).lower(*args).compile().memory_analysis()
    return {"temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes)}


def bench_memory(length, n=8):
    args = shapes(length)
    ring = compiled_memory(ring_loss(n), args)
    emit(bench="ring_memory", impl=f"ring x{n} (per device)", length=length, **ring)
    single = compiled_memory(single_loss(), args)
    emit(bench="ring_memory", impl="xla single device", length=length, **single)
    ratio = ring["temp_bytes"] / max(1, single["temp_bytes"])
    emit(bench="ring_memory", summary=True, length=length, temp_ratio=round(ratio, 4),
         ok=ratio <= 0.2)
    return ratio


def bench_timing(length, n=8, iters=5, single=True):
    key = jax.random.key(0)
    args = [jax.random.normal(k, s.shape, s.dtype)
            for k, s in zip(jax.random.split(key, 3), shapes(length))]
    rows = {}
    cases = [(f"{kind}_{layout}", make(n, True, layout)) for layout in ("zigzag", "contiguous")
             for kind, make in (("ring", ring_loss), ("allgather", allgather_loss))]
    if single:
        cases.append(("single_device", single_loss()))
    for name, loss in cases:
        rows[name] = best_seconds(grad_fn(loss), *args, iters=iters)
        emit(bench="ring_timing", impl=name, length=length, per_device=length // n,
             causal=True, fwd_bwd_s=round(rows[name], 5))
    best = min(rows[f"allgather_{x}"] for x in ("zigzag", "contiguous"))
    emit(bench="ring_timing", summary=True, length=length, per_device=length // n,
         ring_zigzag_over_best_allgather=round(rows["ring_zigzag"] / best, 3))


def _load_config(spec):
    from benchmarks.bench_train import load_config
    return load_config(spec)


def bench_step(spec, overrides, compile_only=False):
    """One train step of a preset on 8 simulated devices, via the trainer's Run."""
    import tempfile
    from jaxmix.train.loop import Run
    config = _load_config(spec)
    for item in overrides:
        key, _, value = item.partition("=")
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = type(node[leaf])(json.loads(value))
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        r = Run(config, workdir)
        state = r.init_fn()
        batch = r.to_global(next(r.data.train_iter))
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = r.train_step.compile(state, batch)
        t_compile = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if os.environ.get("BENCH_RING_HLO"):
            with open(os.environ["BENCH_RING_HLO"], "w") as f:
                f.write(compiled.as_text())
        t0 = time.perf_counter()
        loss = grad_norm = None
        if not compile_only:
            with jax.set_mesh(r.mesh):
                state, metrics = compiled(state, batch)
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        t_step = time.perf_counter() - t0
        r.ckpt.close()
    gib = 1 << 30
    emit(bench="long_context_step", config=spec, seq_len=config.train.seq_len,
         grad_norm=grad_norm,
         n_params=int(sum(x.size for x in jax.tree.leaves(state.params))),
         batch_size=config.train.batch_size, mesh=dict(r.mesh.shape), loss=loss,
         step_s=round(t_step, 2), compile_s=round(t_compile, 2), init_s=round(t_init, 2),
         per_device_temp_gib=round(mem.temp_size_in_bytes / gib, 3),
         per_device_args_gib=round(mem.argument_size_in_bytes / gib, 3),
         per_device_peak_gib=round((mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                    + mem.output_size_in_bytes - mem.alias_size_in_bytes)
                                   / gib, 3),
         process_peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                    / (1 << 20), 3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("memory", "timing", "step"))
    ap.add_argument("--length", type=int, default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-single", action="store_true", help="timing: skip the 1-device run")
    ap.add_argument("--compile-only", action="store_true", help="step: compile, do not run")
    ap.add_argument("--config", default="configs/long_context.py:mamba-1m")
    ap.add_argument("--set", nargs="*", default=[], help="overrides a.b=json_value")
    args = ap.parse_args()
    if args.mode == "memory":
        bench_memory(args.length or 65536)
    elif args.mode == "timing":
        bench_timing(args.length or 2048, iters=args.iters, single=not args.no_single)
    else:
        bench_step(args.config, args.set, args.compile_only)


if __name__ == "__main__":
    main()
