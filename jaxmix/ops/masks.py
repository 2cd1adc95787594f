"""Attention's positions and masks, shared by the dispatcher (jaxmix.ops.attention),
its implementations and the mixers' decoding paths."""
import jax.numpy as jnp


def default_positions(batch, q_len, kv_len):
    """Bottom-right aligned positions: q [B, L] at i + S - L, kv [B, S] at j."""
    q_pos = jnp.arange(q_len, dtype=jnp.int32) + (kv_len - q_len)
    kv_pos = jnp.arange(kv_len, dtype=jnp.int32)
    return (jnp.broadcast_to(q_pos, (batch, q_len)), jnp.broadcast_to(kv_pos, (batch, kv_len)))


def mask_of(q_pos_BL, kv_pos_BS, q_seg_BL, kv_seg_BS, causal, window, sink=0):
    """Boolean [B, L, S]: True where query l may attend to key s. None if unmasked."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if causal or window:
        mask = kv_pos_BS[:, None, :] <= q_pos_BL[:, :, None]
    if window:
        recent = kv_pos_BS[:, None, :] > q_pos_BL[:, :, None] - window
        if sink:
            recent = recent | (kv_pos_BS[:, None, :] < sink)
        mask = both(mask, recent)
    if q_seg_BL is not None:
        mask = both(mask, q_seg_BL[:, :, None] == kv_seg_BS[:, None, :])
    return mask
