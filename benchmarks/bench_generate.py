"""Greedy decoding throughput against prompt length, Mamba vs attention.

  python benchmarks/bench_generate.py [--families mamba_lm,transformer_lm]
      [--batches 1,8] [--prompt_lens 64,256,1024] [--new_tokens 64] [--preset default]

For each (family, batch, prompt length): one jit'd prefill of the prompt, then the jit'd
`lax.scan` decode loop of --new_tokens greedy tokens (timed separately, best of
--repeats, after a compile/warm-up call). One JSON line per measurement with
decode tokens/s, ms per decoded token, prefill ms, and `vs_shortest`: the per-token
cost relative to the same family and batch at the shortest prompt (the baseline in
this run). Mamba's recurrent state makes it ~1.0; attention's KV cache makes it grow.
"""
import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxmix import config_files  # noqa: E402
from jaxmix import generate as gen  # noqa: E402
from jaxmix import models  # noqa: E402


def load_config(name, preset):
    return config_files.load_config(f"configs/{name}.py:{preset}", root=ROOT)


def best_time(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(lm, params, batch, prompt_len, new_tokens, repeats):
    prompt = jax.random.randint(jax.random.PRNGKey(0), (batch, prompt_len), 0,
                                lm.cfg.vocab_size, jnp.int32)
    cache0 = gen.init_cache(lm, batch, prompt_len + new_tokens)
    prefill = gen.make_prefill(lm)
    decode = gen.make_decode(lm, new_tokens, 0.0, None, None)
    prefill_s = best_time(lambda: prefill(params, prompt, cache0), repeats)
    logits, cache = prefill(params, prompt, cache0)
    rng = jax.random.PRNGKey(0)
    decode_s = best_time(lambda: decode(params, logits, cache, rng), repeats)
    return prefill_s, decode_s


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="mamba_lm,transformer_lm")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt_lens", default="64,256,1024")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    lens = sorted(int(x) for x in a.prompt_lens.split(","))
    for family in a.families.split(","):
        config = load_config(family, a.preset)
        lm = models.build(config.model)
        params = jax.jit(lambda r: nn.unbox(lm.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(
            jax.random.PRNGKey(0))
        for batch in (int(x) for x in a.batches.split(",")):
            base = None
            for length in lens:
                prefill_s, decode_s = measure(lm, params, batch, length, a.new_tokens,
                                              a.repeats)
                per_token_ms = 1e3 * decode_s / a.new_tokens
                base = base or per_token_ms
                print(json.dumps(dict(
                    bench="generate", family=family, preset=a.preset,
                    backend=jax.default_backend(), batch=batch, prompt_len=length,
                    new_tokens=a.new_tokens, decode_tokens_per_sec=round(
                        batch * a.new_tokens / decode_s, 1),
                    ms_per_token=round(per_token_ms, 3), prefill_ms=round(1e3 * prefill_s, 2),
                    vs_shortest=round(per_token_ms / base, 3))), flush=True)


if __name__ == "__main__":
    main()
