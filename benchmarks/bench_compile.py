"""Compile time of the model's gradient against its depth: the 130m Mamba shape
(configs/mamba_lm.py:130m: d_model 768, bf16, model.remat as the preset sets it) at
2 and 24 layers, L 256, batch 1, with the layers run as a scan over repeats
(`model.scan_layers="scan"`, as the preset sets it) and, as the baseline in the same
run, unrolled.

  .venv/bin/python benchmarks/bench_compile.py [--layers 2 24] [--remat block]

One JSON line per (layout, layers) with the seconds of `lower` and `compile`, then one
line per layout with the deep/shallow compile-time ratio. The CPU host is set up as
train.py sets it (whole-loop compilation of small while loops).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxmix import cpu  # noqa: E402

cpu.compile_loops_whole()  # as train.py sets up a CPU host

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxmix import config_files, models  # noqa: E402


def grad_fn(model):
    def loss(params, tokens):
        logits, _ = model.apply({"params": params}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
    return jax.jit(jax.grad(loss))


def compile_seconds(n_layers, scan_layers, remat, seq_len):
    config = config_files.load_config("configs/mamba_lm.py:130m", root=ROOT)
    config.model.update(n_layers=n_layers, scan_layers="scan" if scan_layers else "unroll")
    if remat:
        config.model.remat = remat
    model = models.build(config.model)
    params = models.abstract_params(model)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    t0 = time.perf_counter()
    lowered = grad_fn(model).lower(params, tokens)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
            "remat": models.remat.policy_name(config.model)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs=2, default=(2, 24),
                    help="the shallow and the deep layer count (default: 2 24)")
    ap.add_argument("--seq_len", type=int, default=256, help="tokens per row (default: 256)")
    ap.add_argument("--remat", default="",
                    help="model.remat policy (default: the preset's)")
    args = ap.parse_args()
    for scan_layers in (True, False):
        layout = "scan" if scan_layers else "unrolled"
        times = {}
        for n in args.layers:
            row = compile_seconds(n, scan_layers, args.remat, args.seq_len)
            times[n] = row["lower_s"] + row["compile_s"]
            print(json.dumps({"layout": layout, "n_layers": n, "seq_len": args.seq_len,
                              **row}), flush=True)
        shallow, deep = args.layers
        print(json.dumps({"layout": layout, "deep_over_shallow": round(
            times[deep] / times[shallow], 2), "backend": jax.default_backend()}), flush=True)


if __name__ == "__main__":
    main()
