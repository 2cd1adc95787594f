"""Rematerialisation policies (`model.remat`): what a block keeps from its forward pass
for the backward, and what it recomputes.

  "none"           everything the backward needs is kept (fastest, most memory)
  "block"          a block keeps only its input and recomputes its whole forward
                   inside the backward, kernels included (least memory)
  "save_kernels"   as "block", but what the kernels computed is kept
                   (`jaxmix.ops.residuals`: the selective scan's output and chunk
                   states, ...): the projections, norms and gates are recomputed, a
                   kernel's forward never is; per Mamba layer that keeps the fp32
                   [B, L, d_inner] scan output
  "dots_saveable"  as "save_kernels", keeping the matmul outputs too (more memory, no
                   matmul recomputed)

`True` and `False` (the field's older values) read as "block" and "none".
"""
import jax

from jaxmix.errors import ConfigError
from jaxmix.ops.residuals import KERNEL_RESIDUALS

POLICIES = ("none", "block", "save_kernels", "dots_saveable")


def policy_name(cfg):
    """The model config's `remat` as one of POLICIES (one-line ConfigError otherwise)."""
    value = cfg.get("remat", "none")
    if isinstance(value, bool):
        return "block" if value else "none"
    if value not in POLICIES:
        raise ConfigError(f"model.remat={value!r}: choose from {', '.join(POLICIES)} "
                          f"(or true/false for block/none)")
    return value


def checkpoint_policy(name):
    """The `jax.checkpoint` policy of a POLICIES name other than "none"."""
    kernels = jax.checkpoint_policies.save_only_these_names(KERNEL_RESIDUALS)
    if name == "block":
        return jax.checkpoint_policies.nothing_saveable
    if name == "save_kernels":
        return kernels
    if name == "dots_saveable":
        return jax.checkpoint_policies.save_from_both_policies(
            kernels, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"no checkpoint policy for remat={name!r}")
