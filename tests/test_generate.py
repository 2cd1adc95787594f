"""Decoding: cached logits equal the full forward pass (Mamba, attention, hybrid);
greedy/top-k/top-p sampling; constant generation memory for Mamba; workdir loading
and the `python -m jaxmix.generate` CLI."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmix import generate as gen
from jaxmix import models
from jaxmix import workdir as workdir_lib

BATCH, PROMPT, TOTAL = 2, 5, 13


def small_config(family):
    import mamba_lm  # configs/ is on sys.path (conftest)
    if family == "mamba":
        return mamba_lm.get_config("smoke")
    import transformer_lm
    c = transformer_lm.get_config("smoke")
    if family == "hybrid":
        c.model.update(mixer_pattern=("mamba", "mamba", "attention"), n_layers=3)
    return c


@functools.lru_cache(maxsize=None)
def built(family):
    config = small_config(family)
    lm = models.build(config.model)
    params = nn.unbox(lm.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    # perturb so norms and biases are not at their trivial init
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return config, lm, jax.tree.unflatten(tree, leaves)


def tokens(n, seed=0, vocab=256):
    return jax.random.randint(jax.random.PRNGKey(seed), (BATCH, n), 0, vocab, jnp.int32)


# The hybrid's decoding (both cache kinds in one model) is checked by default in
# test_greedy_is_argmax_of_forward[hybrid]; here it runs with -m exhaustive.
@pytest.mark.parametrize("family", ["mamba", "attention",
                                    pytest.param("hybrid", marks=pytest.mark.exhaustive)])
def test_decode_matches_forward(family):
    _, lm, params = built(family)
    seq = tokens(TOTAL)
    full, _ = jax.jit(lambda p, t: lm.apply({"params": p}, t))(params, seq)
    step = jax.jit(lambda p, t, c: lm.apply({"params": p}, t, decode=True, cache=c))
    cache = gen.init_cache(lm, BATCH, TOTAL)
    # prefill, a chunk of 3 continuing from the cache, then single tokens
    pieces, start = [], 0
    for size in (PROMPT, 3) + (1,) * (TOTAL - PROMPT - 3):
        logits, _, cache = step(params, seq[:, start:start + size], cache)
        pieces.append(logits)
        start += size
    decoded = jnp.concatenate(pieces, axis=1)
    assert float(jnp.abs(decoded - full).max()) <= 1e-5


def test_mamba_decode_step_runs_no_kernel():
    """With scan_impl=pallas the prefill runs the scan kernel, a one-token decode step a
    plain step of the recurrence: no pallas_call in its jaxpr, and the cached decode
    still equals the full forward pass."""
    config, _, params = built("mamba")
    config.model.mixers.mamba.scan_impl = "pallas"
    lm = models.build(config.model)
    seq = tokens(TOTAL - 4)
    full, _ = jax.jit(lambda p, t: lm.apply({"params": p}, t))(params, seq)
    step = lambda p, t, c: lm.apply({"params": p}, t, decode=True, cache=c)
    cache = gen.init_cache(lm, BATCH, TOTAL)
    assert "pallas_call" in str(jax.make_jaxpr(step)(params, seq[:, :PROMPT], cache))
    logits, _, cache = jax.jit(step)(params, seq[:, :PROMPT], cache)
    pieces = [logits]
    for t in range(PROMPT, seq.shape[1]):
        assert "pallas_call" not in str(jax.make_jaxpr(step)(params, seq[:, t:t + 1], cache))
        logits, _, cache = jax.jit(step)(params, seq[:, t:t + 1], cache)
        pieces.append(logits)
    assert float(jnp.abs(jnp.concatenate(pieces, axis=1) - full).max()) <= 1e-5


@pytest.mark.parametrize("family", ["mamba", "hybrid"])
def test_greedy_is_argmax_of_forward(family):
    """Teacher-forced check: each greedy token is the argmax of the full forward pass
    over prompt + the tokens before it."""
    config, lm, params = built(family)
    prompt = tokens(PROMPT, seed=2)
    new = gen.generate(lm, params, prompt, max_new_tokens=TOTAL - PROMPT, temperature=0.0)
    assert new.shape == (BATCH, TOTAL - PROMPT) and new.dtype == jnp.int32
    logits, _ = lm.apply({"params": params}, jnp.concatenate([prompt, new], axis=1))
    want = jnp.argmax(logits[:, PROMPT - 1:-1, :config.model.vocab_size], axis=-1)
    np.testing.assert_array_equal(new, want)


def test_sampling_filters():
    _, lm, params = built("mamba")
    prompt = tokens(PROMPT, seed=3)
    kw = dict(max_new_tokens=6)
    greedy = gen.generate(lm, params, prompt, temperature=0.0, **kw)
    np.testing.assert_array_equal(greedy, gen.generate(lm, params, prompt, top_k=1, **kw))
    np.testing.assert_array_equal(greedy, gen.generate(lm, params, prompt, top_p=1e-6, **kw))
    a = gen.generate(lm, params, prompt, temperature=1.0, rng=jax.random.PRNGKey(5), **kw)
    b = gen.generate(lm, params, prompt, temperature=1.0, rng=jax.random.PRNGKey(5), **kw)
    np.testing.assert_array_equal(a, b)  # reproducible for a fixed rng
    c = gen.generate(lm, params, prompt, temperature=1.0, rng=jax.random.PRNGKey(6), **kw)
    assert not np.array_equal(a, c)  # and the rng is what the draws follow

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.PRNGKey(0)
    draws = np.asarray(gen.sample_logits(logits, keys, top_k=2))
    assert set(draws) == {0, 1}
    draws = np.asarray(gen.sample_logits(logits, keys, top_p=0.85))  # nucleus {0, 1, 2}
    assert set(draws) == {0, 1, 2}
    freq = np.bincount(np.asarray(gen.sample_logits(logits, keys)), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_padded_vocab_never_sampled():
    config = small_config("mamba")
    config.model.vocab_size = 250  # padded to 256 rows
    lm = models.build(config.model)
    params = nn.unbox(lm.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params["embed"]["embedding"] = params["embed"]["embedding"].at[250:].set(10.0)
    new = gen.generate(lm, params, tokens(PROMPT, vocab=250), max_new_tokens=8,
                       temperature=2.0)
    assert int(new.max()) < 250


def test_mamba_generation_memory_is_constant():
    _, lm, params = built("mamba")
    prompt = tokens(PROMPT)
    logits, cache = gen.make_prefill(lm)(params, prompt, gen.init_cache(lm, BATCH, PROMPT))
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    temp = {}
    for n in (16, 256):
        decode = gen.make_decode(lm, n, 0.0, None, None)
        compiled = decode.lower(params, logits, cache, jax.random.PRNGKey(0)).compile()
        temp[n] = compiled.memory_analysis().temp_size_in_bytes
        out_cache = jax.eval_shape(
            lambda p, c: lm.apply({"params": p}, prompt[:, :1], decode=True, cache=c)[2],
            params, cache)
        assert jax.tree.map(lambda a: a.shape, out_cache) == jax.tree.map(
            lambda a: a.shape, cache)
    # only the token outputs and per-step keys may grow (a few bytes per token and row),
    # never anything the size of the recurrent state
    assert temp[256] - temp[16] <= 32 * BATCH * (256 - 16) < cache_bytes * 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from jaxmix.convert import write_workdir
    config, lm, params = built("mamba")
    out = tmp_path_factory.mktemp("gen_workdir")
    write_workdir(str(out), config, jax.tree.map(np.asarray, params))
    return str(out)


def test_load_workdir_and_sample_text(workdir):
    _, _, params = built("mamba")
    lm, loaded, config = workdir_lib.load_workdir(workdir)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = gen.sample_text(lm, loaded, "def ", 12, temperature=0.0)
    want = gen.generate(lm, loaded, gen.encode_bytes("def "), max_new_tokens=12,
                        temperature=0.0)
    assert isinstance(text, str) and text == gen.decode_bytes(np.asarray(want)[0])


def test_cli(workdir, capsys, tmp_path):
    assert gen.main(["--workdir", workdir, "--prompt", "def ", "--max_new_tokens", "5",
                     "--temperature", "0.8", "--top_k", "20", "--top_p", "0.9",
                     "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert gen.main(["--workdir", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert gen.main(["--workdir", workdir, "--top_p", "1.5"]) == 2
