"""DuoAttention decoding: KV-cache bytes and decode time, full attention vs DuoAttention.

KV bytes are read from the cache arrays `jaxmix.generate.init_cache` allocates for T
context tokens (every leaf, all layers), next to the paper's model
  bytes(r) = bytes_per_token x (r x T + (1 - r) x (sink + recent)).
Decode time is the mean over `--steps` single-token steps (one jit'd `lax.scan`, the
path `jaxmix.generate` takes) after prefilling `--decode-context` tokens, for every
configuration in the same run. The model is the passkey transformer's shape (4 layers,
d_model 128, 4 heads) with random weights unless --workdir is given; retrieval heads
are taken from --duo (a duo_heads.json) or, without one, the first r x KV heads of each
layer.

  python benchmarks/bench_duo_decode.py
  python benchmarks/bench_duo_decode.py --workdir runs/passkey --duo runs/passkey/duo_heads.json
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxmix import duo, models  # noqa: E402
from jaxmix import generate as gen  # noqa: E402


def passkey_shape():
    from jaxmix.mixers.attention import Attention
    return ml_collections.ConfigDict(dict(
        family="lm", d_model=128, n_layers=4, vocab_size=256, d_ff=256, dtype="float32",
        mixer_pattern=("attention",),
        mixers={"attention": dict(Attention.DEFAULTS, n_heads=4, n_kv_heads=4)}))


def load(a):
    if a.workdir:
        from jaxmix import workdir
        _, params, config = workdir.load_workdir(a.workdir)
        cfg = models.normalize_config(config.model)
    else:
        cfg = passkey_shape()
        params = nn.unbox(jax.jit(models.build(cfg).init)(
            jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    gen.set_max_cache_len(cfg, max(a.contexts) + a.steps + 1)
    return cfg, params


def variant(cfg, params, ratio, a):
    """(model, params) of full attention (ratio None) or DuoAttention keeping `ratio`."""
    if ratio is None:
        return models.build(cfg), params
    layers = duo.attention_layers(cfg)
    if a.duo:
        alpha, idx, _ = duo.load_heads(a.duo, cfg)
        retrieval = duo.retrieval_heads(alpha, sparsity=1.0 - ratio)
    else:
        hkv = layers[0][1]
        retrieval = np.zeros((len(layers), hkv), bool)
        retrieval[:, :int(round(ratio * hkv))] = True
        idx = [i for i, _, _ in layers]
    dcfg, dparams = duo.deploy(cfg, params, retrieval, idx, a.sink, a.recent)
    return models.build(dcfg), dparams


def kv_bytes(model, context):
    return sum(x.nbytes for x in jax.tree.leaves(gen.init_cache(model, 1, context)))


def decode_ms(model, params, a):
    context = a.decode_context
    prompt = jax.random.randint(jax.random.PRNGKey(0), (1, context), 0, 256)
    cache = gen.init_cache(model, 1, context + a.steps + 1)
    logits, cache = gen.make_prefill(model)(params, prompt, cache)
    decode = gen.make_decode(model, a.steps, 0.0)
    rng = jax.random.PRNGKey(1)
    jax.block_until_ready(decode(params, logits, cache, rng))  # compile + warm up
    best = float("inf")
    for _ in range(a.repeats):
        t = time.perf_counter()
        jax.block_until_ready(decode(params, logits, cache, rng))
        best = min(best, time.perf_counter() - t)
    return 1000 * best / a.steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--duo", default=None)
    p.add_argument("--ratios", default="0.25,0.5", help="fractions of retrieval heads")
    p.add_argument("--contexts", default="8192,32768")
    p.add_argument("--decode-context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sink", type=int, default=duo.DEPLOY_SINK)
    p.add_argument("--recent", type=int, default=duo.DEPLOY_RECENT)
    a = p.parse_args()
    a.contexts = [int(x) for x in a.contexts.split(",")]
    cfg, params = load(a)
    full_model, _ = variant(cfg, params, None, a)
    per_token = kv_bytes(full_model, 2) - kv_bytes(full_model, 1)
    summary = {}
    for ratio in [None] + [float(r) for r in a.ratios.split(",")]:
        model, p_ = variant(cfg, params, ratio, a)
        name = "full" if ratio is None else f"duo_{int(100 * ratio)}"
        r = 1.0 if ratio is None else ratio
        for context in a.contexts:
            measured = kv_bytes(model, context)
            formula = per_token * (r * context + (1 - r) * (a.sink + a.recent))
            print(json.dumps(dict(config=name, context=context, kv_bytes=measured,
                                  formula_bytes=int(formula), retrieval_ratio=r)), flush=True)
            summary[f"{name}_kv_bytes_{context}"] = measured
        ms = decode_ms(model, p_, a)
        summary[f"{name}_decode_ms"] = ms
        print(json.dumps(dict(config=name, decode_context=a.decode_context,
                              decode_ms_per_token=ms, backend=jax.default_backend())),
              flush=True)
    print(json.dumps({"summary": "DuoAttention vs full attention", **summary}), flush=True)


if __name__ == "__main__":
    main()
