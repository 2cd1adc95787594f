"""Audio encoders side by side: SSAMBA (bimamba), the AST-like transformer (attention:
the memory-efficient blocked kernel, and the reference one that materialises the L x L
scores as SSAST's does) and MambaMixer, at the CPU presets' parameter counts.

  python benchmarks/bench_encoders.py [--lengths 512 4096] [--batch 2] [--steps 3]
      [--runs ssamba=WORKDIR attention=WORKDIR mambamixer=WORKDIR]

For every kind and patch count: one jit'd forward + backward step of the classifier
on random patches (train.py's loss); prints one JSON line with its params, patches/s
and XLA's temp memory (the fwd+bwd activations), and the ratio of each to the
materialised-attention baseline measured in the same run. `--runs` adds the held-out
accuracy (the last val_acc in metrics.jsonl) of trained workdirs. MambaMixer's channel
mixer projects the token axis to `--channel_inner` values (default 8; its full width,
L, would hold 3 L^2 weights at these lengths), which keeps its parameter count near
the others'; every model's learned position table grows with L (L x d_model).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import audio_encoder  # noqa: E402
from jaxmix import models  # noqa: E402
from jaxmix.train import objectives  # noqa: E402

KINDS = {"ssamba": ("ssamba", {}), "attention": ("attention", {}),
         "attention_materialised": ("attention", {"attn_impl": "reference"}),
         "mambamixer": ("mambamixer", {})}
BASELINE = "attention_materialised"


def model_config(kind, length, channel_inner):
    preset, entry = KINDS[kind]
    c = audio_encoder.get_config(preset).model
    c.max_len = length
    name = c.mixer_pattern[0]
    c.mixers[name].update(entry)
    if name == "mambamixer":
        c.mixers[name].channel_inner = channel_inner
    return c


def measure(kind, length, batch, steps, channel_inner):
    model = models.build(model_config(kind, length, channel_inner))
    args, kw = models.example_inputs(model)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), *args, **kw)["params"]
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    rng = np.random.default_rng(0)
    data = {"patches": jnp.asarray(rng.normal(size=(batch, length, model.cfg.patch_dim)),
                                   jnp.float32),
            "label": jnp.asarray(rng.integers(0, model.cfg.n_classes, batch), jnp.int32)}
    grad = jax.jit(jax.value_and_grad(
        lambda p, b: objectives.terms(model, p, b, train=True)[0]))
    compiled = grad.lower(params, data).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params, data))
    t0 = time.perf_counter()
    for _ in range(steps):
        out = compiled(params, data)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - t0) / steps
    return dict(params=n_params, patches_per_sec=round(batch * length / seconds, 1),
                step_seconds=round(seconds, 4), fwd_bwd_temp_mib=round(temp / 2**20, 1))


def last_val_acc(workdir):
    acc = None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            acc = row.get("val_acc", acc)
    return acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--channel_inner", type=int, default=8)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--runs", nargs="*", default=[], help="KIND=WORKDIR of trained runs")
    a = ap.parse_args()
    runs = dict(r.split("=", 1) for r in a.runs)
    for length in a.lengths:
        rows = {kind: measure(kind, length, a.batch, a.steps, a.channel_inner)
                for kind in a.kinds}
        base = rows.get(BASELINE)
        for kind, row in rows.items():
            row = dict(bench="encoders", kind=kind, patches=length, batch=a.batch, **row)
            if base:
                row["speed_vs_materialised"] = round(row["patches_per_sec"]
                                                     / base["patches_per_sec"], 2)
                row["memory_vs_materialised"] = round(row["fwd_bwd_temp_mib"]
                                                      / base["fwd_bwd_temp_mib"], 3)
            preset = KINDS[kind][0]
            if preset in runs:
                row["val_acc"] = last_val_acc(runs[preset])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
