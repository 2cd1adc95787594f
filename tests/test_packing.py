"""Packed documents at the model level: an LM over a window of three documents
(segment ids 1, 2, 3; positions restarting at 0 in each) gives every document the
logits it gets alone, whatever its neighbours hold, with attention only, Mamba only
and a hybrid of both, on the xla and the Pallas (interpret mode) paths."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmix import models

DOC_LENS = (11, 7, 14)            # the middle document starts at 11, the last at 18
LENGTH, VOCAB = sum(DOC_LENS), 64
STARTS = np.cumsum((0,) + DOC_LENS)
SEGMENT_IDS = np.repeat(np.arange(1, 4, dtype=np.int32), DOC_LENS)[None]
POSITIONS = np.concatenate([np.arange(n, dtype=np.int32) for n in DOC_LENS])[None]
PATTERNS = {"attention": ("attention",), "mamba": ("mamba",), "hybrid": ("mamba", "attention")}


def model_of(pattern, impl):
    c = models.default_mixers("mamba", "attention")
    c["mamba"].update(d_state=4, scan_impl=impl)
    c["attention"].update(n_heads=2, attn_impl=impl)
    return models.build(dict(family="lm", d_model=32, n_layers=len(PATTERNS[pattern]),
                             vocab_size=VOCAB, d_ff=0, dtype="float32",
                             mixer_pattern=PATTERNS[pattern], mixers=c))


@functools.lru_cache(maxsize=None)
def params_of(pattern):
    """The same parameters for both impls (their trees do not depend on it)."""
    model = model_of(pattern, "xla")
    tokens = np.zeros((1, 8), np.int32)
    return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])


# Pallas (interpret mode) runs the hybrid by default, which holds both kernels; its
# attention-only and Mamba-only models run with -m exhaustive.
CASES = [(p, "xla") for p in sorted(PATTERNS)] + [("hybrid", "pallas")] + [
    pytest.param(p, "pallas", marks=pytest.mark.exhaustive) for p in ("attention", "mamba")]


@pytest.mark.parametrize("pattern, impl", CASES)
def test_packed_documents_do_not_see_each_other(pattern, impl):
    model, params = model_of(pattern, impl), params_of(pattern)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, LENGTH), np.int32)
    mid = slice(STARTS[1], STARTS[2])
    tokens[1] = tokens[0]
    tokens[1, mid] = (tokens[0, mid] + 1 + np.arange(DOC_LENS[1])) % VOCAB
    # Each document alone (no ids, positions from 0), padded after its end: the causal
    # LM never looks at the padding.
    docs = np.zeros((3, max(DOC_LENS)), np.int32)
    for doc, n in enumerate(DOC_LENS):
        docs[doc, :n] = tokens[0, STARTS[doc]:STARTS[doc] + n]

    @jax.jit
    def run(params, tokens, docs):
        seg, pos = (jnp.broadcast_to(a, tokens.shape) for a in (SEGMENT_IDS, POSITIONS))
        apply = functools.partial(model.apply, {"params": params})
        return (apply(tokens, segment_ids=seg, positions=pos)[0], apply(docs)[0])

    both, single = (np.asarray(a) for a in run(params, tokens, docs))
    # (a) changing the middle document changes its logits and no other document's.
    for doc in (0, 2):
        lo, hi = STARTS[doc], STARTS[doc + 1]
        np.testing.assert_allclose(both[1, lo:hi], both[0, lo:hi], atol=1e-6, rtol=0)
    assert not np.allclose(both[1, mid], both[0, mid], atol=1e-3)
    # (b) each document's logits in the window equal its logits run alone.
    scale = float(np.max(np.abs(single)))
    for doc, n in enumerate(DOC_LENS):
        lo = STARTS[doc]
        np.testing.assert_allclose(both[0, lo:lo + n], single[doc, :n], atol=1e-5 * scale,
                                   rtol=0)
