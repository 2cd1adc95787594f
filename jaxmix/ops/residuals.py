"""Names for what the kernels' custom VJPs keep for their backward.

A rematerialised block recomputes its forward inside the backward pass, and with it
every custom_vjp's forward (the whole selective scan, for instance) unless what that
forward computed is saved. Each op's forward passes the values it computes for its
outputs and its backward (not its inputs, which cheap projections recompute) through
`keep`, which tags them with `checkpoint_name`. The "save_kernels" and
"dots_saveable" policies of `jaxmix.models.remat` save every value with this name, so
the op's forward runs once per step and only the code around it is recomputed. The
tag is free outside remat (an identity).
"""
import jax
from jax.ad_checkpoint import checkpoint_name

KERNEL_RESIDUALS = "kernel_residuals"


def keep(tree):
    """`tree` with every array tagged KERNEL_RESIDUALS (None leaves stay None)."""
    return jax.tree.map(lambda x: checkpoint_name(x, KERNEL_RESIDUALS), tree)
