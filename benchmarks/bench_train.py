"""Train-step throughput of a preset (default: configs/mamba_lm.py's default preset).

  python benchmarks/bench_train.py [--config configs/mamba_lm.py:default] [--steps 10]

Builds the same jit'd step as train.py (CPU host set-up, mesh, shardings, donation),
runs warm-up steps, then times `--steps` steps on real batches. Prints one JSON line
per measurement; the baseline in the same run is the reference scan implementation at
the same shapes.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxmix import cpu  # noqa: E402

cpu.keep_freed_memory()  # before any library starts threads

import jax  # noqa: E402

from jaxmix import config_files  # noqa: E402
from jaxmix.train.loop import Run  # noqa: E402


def load_config(spec):
    return config_files.load_config(spec, root=ROOT)


def tokens_per_sec(config, steps, warmup, workdir):
    r = Run(config, workdir)
    state, it = r.init_fn(), r.data.train_iter
    batches = [r.to_global(next(it)) for _ in range(warmup + steps)]
    step_fn = r.train_step.compile(state, batches[0])
    with jax.set_mesh(r.mesh):
        for b in batches[:warmup]:
            state, m = step_fn(state, b)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for b in batches[warmup:]:
            state, m = step_fn(state, b)
        jax.block_until_ready(m)
    seconds = time.perf_counter() - t0
    r.ckpt.close()
    return steps * config.train.batch_size * config.train.seq_len / seconds, seconds / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mamba_lm.py:default")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--baseline", default="reference", help="scan_impl of the baseline run")
    args = ap.parse_args()
    import tempfile
    cpu.prepare_training_host(load_config(args.config))  # as train.py does
    results = {}
    for impl in (args.baseline, "auto"):
        config = load_config(args.config)
        config.model.mixers.mamba.scan_impl = impl
        with tempfile.TemporaryDirectory() as workdir:
            tps, sec = tokens_per_sec(config, args.steps, args.warmup, workdir)
        results[impl] = tps
        print(json.dumps({"bench": "train_step", "config": args.config, "scan_impl": impl,
                          "batch_size": config.train.batch_size,
                          "seq_len": config.train.seq_len, "tokens_per_sec": round(tps, 1),
                          "seconds_per_step": round(sec, 4), "backend": jax.default_backend()}),
              flush=True)
    print(json.dumps({"bench": "train_step_speedup", "vs": args.baseline,
                      "ratio": round(results["auto"] / results[args.baseline], 3)}))


if __name__ == "__main__":
    main()
