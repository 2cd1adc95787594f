"""MambaMixer (Behrouz et al. 2024): a selective token mixer and a selective channel
mixer, for the `encoder` family (non-causal, a fixed number of tokens).

Token mixer (this module): the paper sums d unidirectional selective (S6) blocks run
over different orderings of the sequence; in 1-D the two orderings are forward and
backward, so the output is Mamba_fwd(x) + Mamba_bwd(x), two Mamba blocks with their own
in_proj/out_proj (the backward one's weights named with "_b") whose backward block
runs its conv and scan in reverse (the ops' `reverse` flags). Segment ids keep both
directions inside each packed document.

Channel mixer (`channel_mixer(cfg)`, which the encoder puts where a transformer has its
MLP): the same selective machinery with the roles of tokens and channels exchanged.
x [B, L, D] is transposed to [B, D, L]: the D channels are the sequence and the L token
values of a channel its features, so its linear layers act along the token axis and the
mixer needs a fixed L. One in_proj (L -> 2 x channel_inner: x and the shared gate),
then a forward and a backward scan over the channels, each with its own conv, x_proj,
dt_proj, A_log and D, summed (the paper's y = SSM(x_fwd) * gate + Flip(SSM(x_bwd)) *
gate), then out_proj back to L: a `bimamba` block over the transpose with
`divide_out=False`. `channel_inner` 0 means L, the paper's width; long inputs want a
smaller one (its projections hold 3 x L x channel_inner weights). Its projections act
along the token axis, so it takes no segment ids: it sees the whole window.

The weighted averaging of all earlier layers' outputs lives in the encoder
(`model.layer_average`), since it spans layers.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxmix.mixers.bimamba import BiMamba, empty_cache, refuse_decoding
from jaxmix.mixers.mamba import DEFAULTS as MAMBA_DEFAULTS
from jaxmix.mixers.mamba import in_projection, out_projection, selective_branch

DEFAULTS = dict(MAMBA_DEFAULTS, channel_inner=0)


class ChannelMixer(nn.Module):
    """The selective channel mixer: a bidirectional selective scan over the channels of
    x [B, L, D], its projections along the token axis."""
    cfg: Any

    @nn.compact
    def __call__(self, x_BLD):
        length = x_BLD.shape[1]
        cfg = ml_collections.FrozenConfigDict({**self.cfg, "divide_out": False,
                                               "d_inner": self.cfg.channel_inner or length})
        xT_BDL = jnp.swapaxes(x_BLD, 1, 2)
        y_BDL, _, _ = BiMamba(cfg, name="scan")(xT_BDL)
        return jnp.swapaxes(y_BDL, 1, 2)


class MambaMixer(nn.Module):
    cfg: Any
    DEFAULTS = DEFAULTS
    CAUSAL = False
    FIXED_SIZE_CACHE = True

    @nn.compact
    def __call__(self, x_BLD, *, segment_ids=None, positions=None, cache=None, decode=False,
                 train=False):
        del positions, cache, train
        refuse_decoding("mambamixer", decode)
        d_model = x_BLD.shape[-1]
        y_BLD = 0.0
        for suffix, reverse in (("", False), ("_b", True)):
            x_BLI, z_BLI = in_projection(self, x_BLD, suffix)
            y_BLI, _, _ = selective_branch(self, x_BLI, z_BLI, suffix=suffix, reverse=reverse,
                                           segment_ids=segment_ids)
            y_BLD = y_BLD + out_projection(self, y_BLI, d_model, suffix)
        return y_BLD, None, {}

    @staticmethod
    def channel_mixer(cfg):
        return ChannelMixer(cfg)

    init_cache = empty_cache

    def cache_axes(self):
        return {}
