"""Bidirectional Mamba mixer (Vision Mamba's "v2" block, as SSAMBA uses it).

in_proj -> (x, z) shared by both directions; the forward direction is the Mamba
block's causal conv + selective scan, the backward direction has its own conv, x_proj,
dt_proj, A_log and D (named with the suffix "_b", as Vim's conv1d_b, x_proj_b, ...)
and runs the conv anti-causally and the scan from the last position to the first (the
ops' `reverse` flags: no flipped copies of the activations). Both see the same z gate;
out = out_proj((y_fwd + y_bwd) / 2) (Vim's `if_divide_out`; `divide_out=False`
sums them, as MambaMixer's channel mixer does). Initialisation as the
Mamba block for both directions.

Non-causal: every output position depends on every input position (of its own
segment, with `segment_ids`: both directions stop at packed-document boundaries), so
it serves the `encoder` family only and has no decode cache.
"""
from typing import Any

import flax.linen as nn

from jaxmix.mixers.mamba import DEFAULTS, in_projection, out_projection, selective_branch


def refuse_decoding(name, decode):
    if decode:
        raise ValueError(f"{name} is bidirectional: it has no decoding")


def empty_cache(self, batch, max_len, dtype=None):
    """Nothing: a bidirectional mixer does not decode."""
    del self, batch, max_len, dtype
    return {}


class BiMamba(nn.Module):
    cfg: Any
    DEFAULTS = dict(DEFAULTS, divide_out=True)
    CAUSAL = False
    FIXED_SIZE_CACHE = True

    @nn.compact
    def __call__(self, x_BLD, *, segment_ids=None, positions=None, cache=None, decode=False,
                 train=False):
        del positions, cache, train
        refuse_decoding("bimamba", decode)
        x_BLI, z_BLI = in_projection(self, x_BLD)
        y_fwd, _, _ = selective_branch(self, x_BLI, z_BLI, segment_ids=segment_ids)
        y_bwd, _, _ = selective_branch(self, x_BLI, z_BLI, suffix="_b", reverse=True,
                                       segment_ids=segment_ids)
        y_BLI = (y_fwd + y_bwd) * (0.5 if self.cfg.get("divide_out", True) else 1.0)
        return out_projection(self, y_BLI, x_BLD.shape[-1]), None, {}

    init_cache = empty_cache

    def cache_axes(self):
        return {}
