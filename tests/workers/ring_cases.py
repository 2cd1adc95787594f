"""Worker (8 simulated CPU devices): ring attention against full reference attention.

  python tests/workers/ring_cases.py '{"cases": [...]}'   -> one JSON line per case
  python tests/workers/ring_cases.py hlo                  -> collectives in the compiled ring
  python tests/workers/ring_cases.py wrapper              -> sequence_parallel_attention in
                                                             a jit on a data/tensor/sequence mesh
  python tests/workers/ring_cases.py memory               -> benchmarks/bench_ring.py memory
  python tests/workers/ring_cases.py bf16                 -> bf16 ring vs plain bf16 errors
A case: {"n": ring size, "causal": bool, "layout": "contiguous"|"zigzag", "hq": int,
"hkv": int, "segments": bool, "masked_rows": bool (q and kv segment ids differ so
some queries see no key), "q_chunks": kernel calls per hop, "window": sliding window,
"sink": sink keys kept outside the window, "check_vma": the shard_map's (default
True), "wrapper": run through `sequence_parallel_attention` in a jit on a mesh of
just the sequence axis instead of `ring_attention` in a shard_map (all optional)}. Each line reports the largest absolute error of the output and
of dq, dk, dv against dense attention under the mask of tests/masks.py (`visible`,
written independently of jaxmix's mask code).
"""
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

from jaxmix import parallel  # noqa: E402
from masks import masked_attention, visible  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
B, L, D = 2, 128, 16


def make_inputs(case, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, L, case["hq"], D), np.float32)
    k = rng.standard_normal((B, L, case["hkv"], D), np.float32)
    v = rng.standard_normal((B, L, case["hkv"], D), np.float32)
    dout = rng.standard_normal((B, L, case["hq"], D), np.float32)
    seg = None
    if case.get("segments") or case.get("masked_rows"):
        starts = rng.random((B, L)) < 1 / 24  # documents of ~24 tokens cross the shards
        seg = np.cumsum(starts, axis=1).astype(np.int32)
    if case.get("masked_rows"):
        q_seg = seg.copy()
        q_seg[:, 5::7] = -1  # these queries' segment has no keys: rows must give 0
        seg = (q_seg, seg)
    return q, k, v, dout, seg


def expected_mask(seg, causal, window=None, sink=0):
    """[B, L, L] bool from masks.visible (seg: None, [B, L] or a pair (q, kv))."""
    q_seg, kv_seg = seg if isinstance(seg, tuple) else (seg, seg)
    return visible(B, L, L, causal=causal, window=window, sink=sink, q_seg=q_seg,
                   kv_seg=kv_seg)


def reference(q, k, v, dout, seg, causal, window=None, sink=0):
    """Output and grads of sum(o * dout) under masks.visible's mask, dense fp32."""
    mask = expected_mask(seg, causal, window, sink)

    def loss(q, k, v):
        o, _ = masked_attention(q, k, v, mask)
        return jnp.sum(o * dout), o
    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, grads


def ring_fn(n, causal, layout, has_seg, q_chunks=None, window=None, check_vma=True,
            sink=0):
    mesh = jax.make_mesh((n,), ("sequence",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])
    spec = P(None, "sequence")

    def body(q, k, v, seg):
        return parallel.ring_attention(q, k, v, axis_name="sequence", causal=causal,
                                       segment_ids=seg if has_seg else None, layout=layout,
                                       q_chunks=q_chunks, sliding_window=window,
                                       sink=sink)

    return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec,
                         check_vma=check_vma)


def run_wrapper(case, q, k, v, dout, seg):
    """Output and grads of `sequence_parallel_attention` (token order in and out; the
    zigzag layout is applied inside) on a mesh of just the n-device sequence axis."""
    from jaxmix.parallel.ring_attention import sequence_parallel_attention
    mesh = jax.make_mesh((case["n"],), ("sequence",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:case["n"]])

    def loss(q, k, v):
        o = sequence_parallel_attention(q, k, v, causal=case["causal"], segment_ids=seg,
                                        layout=case["layout"],
                                        sliding_window=case.get("window"),
                                        sink=case.get("sink", 0))
        return jnp.sum(o * dout), o
    with jax.set_mesh(mesh):
        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            q, k, v)
    return np.asarray(o), [np.asarray(g) for g in grads]


def run_ring(case, q, k, v, dout, seg):
    """Ring output and grads, in token order (zigzag applied and undone outside jit)."""
    if case.get("wrapper"):
        return run_wrapper(case, q, k, v, dout, seg)
    n, layout = case["n"], case["layout"]
    fn = ring_fn(n, case["causal"], layout, seg is not None, case.get("q_chunks"),
                 case.get("window"), case.get("check_vma", True), case.get("sink", 0))
    zig = layout == "zigzag"
    z = (lambda x: np.asarray(parallel.to_zigzag(x, n))) if zig else np.asarray
    unz = (lambda x: np.asarray(parallel.from_zigzag(np.asarray(x), n))) if zig else np.asarray
    seg_in = jax.tree.map(z, seg) if seg is not None else np.zeros((B, L), np.int32)

    @jax.jit
    def go(q, k, v, dout, seg_in):
        def loss(q, k, v):
            o = fn(q, k, v, seg_in)
            return jnp.sum(o * dout), o
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, o), grads = go(z(q), z(k), z(v), z(dout), seg_in)
    return unz(o), [unz(g) for g in grads]


def check(case):
    q, k, v, dout, seg = make_inputs(case)
    o_ref, g_ref = reference(q, k, v, dout, seg, case["causal"], case.get("window"),
                             case.get("sink", 0))
    o, g = run_ring(case, q, k, v, dout, seg)
    row = dict(case, out_err=float(jnp.max(jnp.abs(o - o_ref))))
    for name, a, b in zip(("dq", "dk", "dv"), g, g_ref, strict=True):
        row[name + "_err"] = float(jnp.max(jnp.abs(a - b)))
    if case.get("masked_rows"):
        dead = np.asarray(seg[0]) == -1
        row["masked_rows_max"] = float(np.abs(np.asarray(o)[dead]).max())
    return row


def bf16_report():
    """bf16 ring vs the fp32 oracle, next to a plain bf16 implementation's error."""
    from jaxmix.ops.attention import attention_reference
    case = dict(n=4, causal=True, layout="zigzag", hq=4, hkv=1, segments=True, q_chunks=2)
    q, k, v, dout, seg = make_inputs(case)
    bf = jnp.bfloat16
    q, k, v, dout = (np.asarray(jnp.asarray(x, bf).astype(jnp.float32)) for x in (q, k, v, dout))
    o32, g32 = reference(q, k, v, dout, seg, True)

    def plain(q, k, v):
        o, _ = attention_reference(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                                   upcast=False)
        return jnp.sum(o.astype(jnp.float32) * dout), o
    (_, o_pl), g_pl = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2), has_aux=True))(
        *(jnp.asarray(x, bf) for x in (q, k, v)))
    o_r, g_r = run_ring(case, *(jnp.asarray(x, bf) for x in (q, k, v)), dout, seg)

    def err(a, b):
        return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - b)))
    row = {"ring_out_err": err(o_r, o32), "plain_out_err": err(o_pl, o32)}
    for name, a, b, c in zip(("dq", "dk", "dv"), g_r, g_pl, g32, strict=True):
        row[f"ring_{name}_err"], row[f"plain_{name}_err"] = err(a, c), err(b, c)
    return row


def hlo_report():
    """Compiled fwd and fwd+bwd of an 8-device ring: which collectives appear."""
    fn = ring_fn(8, True, "zigzag", True)
    shape = jax.ShapeDtypeStruct((B, L, 4, D), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, L, 1, D), jnp.float32)
    seg = jax.ShapeDtypeStruct((B, L), jnp.int32)

    def grads(q, k, v, s):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, s)), argnums=(0, 1, 2))(q, k, v)

    out = {}
    for name, f in (("forward", fn), ("backward", grads)):
        out[name] = collective_counts(jax.jit(f).lower(shape, kv, kv, seg).compile().as_text())
    return out


def collective_counts(hlo_text):
    """How many of each collective op (sync or async start) a compiled HLO text holds."""
    return {op: hlo_text.count(f" {op}(") + hlo_text.count(f" {op}-start(")
            for op in ("collective-permute", "all-gather", "all-reduce", "all-to-all",
                       "reduce-scatter")}


def wrapper_report():
    """sequence_parallel_attention inside jit on a (data 2, tensor 2, sequence 2) mesh."""
    from jaxmix.parallel.ring_attention import sequence_parallel_attention
    mesh = jax.make_mesh((2, 1, 2, 2), ("data", "fsdp", "tensor", "sequence"),
                         axis_types=(AxisType.Auto,) * 4)
    case = dict(hq=4, hkv=2, segments=True)
    q, k, v, dout, seg = make_inputs(case, seed=1)
    rows = []
    for layout in ("contiguous", "zigzag"):
        def loss(q, k, v):
            q = jax.lax.with_sharding_constraint(q, P("data", "sequence", "tensor"))
            o = sequence_parallel_attention(q, k, v, causal=True, segment_ids=seg,
                                            layout=layout)
            return jnp.sum(o * dout), o
        with jax.set_mesh(mesh):
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            (_, o), g = step(q, k, v)
            text = step.lower(q, k, v).compile().as_text()
        o_ref, g_ref = reference(q, k, v, dout, seg, True)
        row = {"layout": layout, "out_err": float(jnp.max(jnp.abs(o - o_ref))),
               "collectives": collective_counts(text)}
        for name, a, b in zip(("dq", "dk", "dv"), g, g_ref, strict=True):
            row[name + "_err"] = float(jnp.max(jnp.abs(a - b)))
        rows.append(row)
    return rows


def main():
    arg = sys.argv[1]
    if arg == "hlo":
        print(json.dumps(hlo_report()), flush=True)
    elif arg == "bf16":
        print(json.dumps(bf16_report()), flush=True)
    elif arg == "memory":
        from benchmarks.bench_ring import bench_memory
        bench_memory(65536)
    elif arg == "wrapper":
        for row in wrapper_report():
            print(json.dumps(row), flush=True)
    else:
        for case in json.loads(arg)["cases"]:
            print(json.dumps(check(case)), flush=True)


if __name__ == "__main__":
    main()
