"""The encoder backbone (non-causal): embed -> positions -> blocks -> norm -> a head.

Inputs are tokens [B, L] (`patch_dim` 0: an embedding table of vocab_size rows) or
continuous patches [B, L, F] (`patch_dim` F: a linear patch embedding with a bias).
Masked positions (`mask_BL`, or `mask_idx` [B, N] patch indices) are replaced by a
learned mask embedding (Xavier-normal, as SSAST) before the positions are added; with
`cls_token` a learned CLS token is prepended at position 0; learned absolute positions
(`max_len` rows, plus one for the CLS token) are added; normal(0.02) inits.

Every layer is a pre-norm residual mixer stage followed by a pre-norm channel stage:
the mixer class's `channel_mixer` when it has one (MambaMixer's selective channel
mixer), else the SwiGLU MLP when d_ff > 0, else nothing. Mixers must be
bidirectional (models.build checks).

`layer_average` (MambaMixer's weighted averaging of earlier features): with y_tok(i),
y_ch(i) the outputs of layer i's mixer and channel stages and y_tok(0) = y_ch(0) = the
embedded input, layer l's mixer stage reads sum_{i<l} a_i y_tok(i) + b_i y_ch(i) and
its channel stage sum_{i<=l} c_i y_tok(i) + sum_{i<l} d_i y_ch(i): n(2n+3) learned
scalars for n layers. The paper leaves their initialisation open; here they start as
the identity (DenseFormer's choice): weight 1 on the most recent output, 0 elsewhere,
so the model starts as the plain residual stack and learns the extra connections.

Heads (`head`): "features" returns the final-normed features [B, L(+1), D];
"classify" pools them (mean over the patch positions, or the CLS token with
pool="cls") into logits [B, n_classes]; "masked_patch" returns SSAMBA's two
predictions at the masked positions `mask_idx`, each [B, N, patch_dim]: the
discriminative one (cpred: Linear-ReLU-Linear, scored by InfoNCE) and the generative
one (gpred, scored by MSE); "masked_token" returns logits [B, L, V] over the tied
embedding (masked-token prediction on bytes).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmix.models.config import layer_mixers
from jaxmix.models.lm import combine_aux, padded_vocab
from jaxmix.nn import DenseGeneral, RMSNorm, SwiGLU, compute_dtype, constrain

DEFAULTS = dict(patch_dim=0, max_len=512, cls_token=False, pool="mean", n_classes=0,
                head="features", layer_average=False)
HEADS = ("features", "classify", "masked_patch", "masked_token")


def field(cfg, name):
    return cfg.get(name, DEFAULTS[name])


class EncoderLayer(nn.Module):
    """A mixer stage and a channel stage, each pre-norm residual."""
    cfg: Any
    mixer_cls: Any
    mixer_cfg: Any

    def setup(self):
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        eps = cfg.get("norm_eps", 1e-5)
        self.norm = RMSNorm(eps, dtype)
        self.mixer = self.mixer_cls(self.mixer_cfg)
        channel = getattr(self.mixer_cls, "channel_mixer", None)
        if channel is not None:
            self.channel_norm = RMSNorm(eps, dtype)
            self.channel = channel(self.mixer_cfg)
        elif cfg.get("d_ff", 0):
            self.mlp_norm = RMSNorm(eps, dtype)
            self.mlp = SwiGLU(cfg.d_ff, cfg.n_layers, cfg.get("mlp_bias", False), dtype)

    def mix(self, x, train):
        y, _, aux = self.mixer(self.norm(x), train=train)
        return x + y.astype(jnp.float32), aux

    def channels(self, x):
        if hasattr(self, "channel"):
            return x + self.channel(self.channel_norm(x)).astype(jnp.float32)
        if hasattr(self, "mlp"):
            return x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)
        return x


def identity_weights(n, one_at):
    def init(key, shape, dtype=jnp.float32):
        del key, shape
        return jnp.zeros((n,), dtype).at[one_at].set(1.0)
    return init


def mask_from_indices(mask_idx_BN, length):
    """Boolean [B, length]: True at the indices `mask_idx_BN`."""
    rows = jnp.arange(mask_idx_BN.shape[0])[:, None]
    return jnp.zeros((mask_idx_BN.shape[0], length), bool).at[rows, mask_idx_BN].set(True)


def gather_positions(x_BLD, idx_BN):
    return jnp.take_along_axis(x_BLD, idx_BN[..., None], axis=1)


class Encoder(nn.Module):
    """Returns (head output, aux); see the module docstring for the heads."""
    cfg: Any

    def embed_inputs(self, inputs, mask_BL):
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        embed = None
        if field(cfg, "patch_dim"):
            x = DenseGeneral(cfg.d_model, (None, "embed"), use_bias=True, dtype=dtype,
                             name="patch_embed")(inputs)
        else:
            embed = nn.Embed(padded_vocab(cfg), cfg.d_model, dtype=dtype, name="embed",
                             embedding_init=nn.with_logical_partitioning(
                                 nn.initializers.normal(0.02), ("vocab", "embed")))
            x = embed(inputs)
        x = x.astype(jnp.float32)
        if field(cfg, "head") in ("masked_patch", "masked_token"):
            mask_D = self.param("mask_embed", nn.initializers.xavier_normal(),
                                (1, cfg.d_model))[0]
            if mask_BL is not None:
                x = jnp.where(mask_BL[..., None], mask_D, x)
        bsz, length = x.shape[:2]
        n_cls = int(field(cfg, "cls_token"))
        if n_cls:
            cls_D = self.param("cls_token", nn.initializers.normal(0.02), (cfg.d_model,))
            x = jnp.concatenate([jnp.broadcast_to(cls_D, (bsz, 1, cfg.d_model)), x], axis=1)
        max_len = field(cfg, "max_len")
        if length > max_len:
            raise ValueError(f"encoder: {length} input positions, more than "
                             f"model.max_len={max_len}")
        pos_PD = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (max_len + n_cls, cfg.d_model))
        x = x + pos_PD[:length + n_cls]
        return constrain(x, ("batch", "length", "embed")), embed

    def blocks(self, x, train):
        cfg = self.cfg
        average = field(cfg, "layer_average")
        ys_tok, ys_ch, layer_aux = [x], [x], []
        for i, (_, cls, mixer_cfg) in enumerate(layer_mixers(cfg)):
            layer = EncoderLayer(cfg, cls, mixer_cfg, name=f"layers_{i}")
            n = i + 1  # outputs so far of each kind: the input and i layers
            if average:
                w = self.param(f"average_mix_{i}", identity_weights(2 * n, 2 * n - 1),
                               (2 * n,))
                x = sum(w[j] * y for j, y in enumerate(ys_tok + ys_ch))
            x, aux = layer.mix(x, train)
            ys_tok.append(x)
            if average:
                w = self.param(f"average_channel_{i}", identity_weights(2 * n + 1, n),
                               (2 * n + 1,))
                x = sum(w[j] * y for j, y in enumerate(ys_tok + ys_ch))
            x = constrain(layer.channels(x), ("batch", "length", "embed"))
            ys_ch.append(x)
            layer_aux.append(aux)
        return x, layer_aux

    @nn.compact
    def __call__(self, inputs, *, mask_BL=None, mask_idx=None, train=False):
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        head, n_cls = field(cfg, "head"), int(field(cfg, "cls_token"))
        if mask_idx is not None:
            mask_BL = mask_from_indices(mask_idx, inputs.shape[1])
        x, embed = self.embed_inputs(inputs, mask_BL)
        x, layer_aux = self.blocks(x, train)
        x = RMSNorm(cfg.get("norm_eps", 1e-5), dtype, name="norm_f")(x)
        aux = combine_aux(cfg, layer_aux)
        if head == "features":
            return x.astype(jnp.float32), aux
        if head == "classify":
            pooled = x[:, 0] if field(cfg, "pool") == "cls" else jnp.mean(x[:, n_cls:], 1)
            logits = DenseGeneral(field(cfg, "n_classes"), ("embed", None), use_bias=True,
                                  dtype=dtype, name="classifier")(pooled)
            return logits.astype(jnp.float32), aux
        if head == "masked_patch":
            h = gather_positions(x[:, n_cls:], mask_idx)
            preds = []
            for name in ("cpred", "gpred"):
                hid = DenseGeneral(cfg.d_model, ("embed", "mlp"), use_bias=True, dtype=dtype,
                                   name=f"{name}_0")(h)
                preds.append(DenseGeneral(field(cfg, "patch_dim"), ("mlp", None),
                                          use_bias=True, dtype=dtype,
                                          name=f"{name}_1")(jax.nn.relu(hid))
                             .astype(jnp.float32))
            return tuple(preds), aux
        logits = embed.attend(x[:, n_cls:].astype(dtype))
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab")), aux

    def example_inputs(self, seq_len):
        """(args, kwargs) of a call whose params are those of every call (model init):
        max_len positions whatever `seq_len` (a channel mixer's weights are sized by it)."""
        cfg = self.cfg
        seq_len = field(cfg, "max_len")
        if field(cfg, "patch_dim"):
            inputs = jnp.zeros((1, seq_len, field(cfg, "patch_dim")), jnp.float32)
        else:
            inputs = jnp.zeros((1, seq_len), jnp.int32)
        kwargs = {"mask_idx": jnp.zeros((1, 1), jnp.int32)} if (
            field(cfg, "head") == "masked_patch") else {}
        return (inputs,), kwargs
