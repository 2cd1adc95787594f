"""Varying-manual-axes (vma) typing for code that may run inside `jax.shard_map`.

Inside a shard_map with the default `check_vma=True` every value's type records the
manual mesh axes it varies over (`jax.typeof(x).manual_axis_type.varying`). Loop and
cond carries must keep one type, so a carry initialised from a constant (not varying)
and updated with sharded data (varying) is rejected; so is a custom_vjp whose bwd
rule returns a varying cotangent for a non-varying primal. `match_vma` casts such
values (`lax.pcast(..., to="varying")`, whose transpose is a psum) up to the axes of
the data they are combined with. Outside shard_map, or under `check_vma=False`,
nothing varies and these helpers return their input unchanged (no op is added).
"""
import jax
from jax import lax


def vma(x):
    """frozenset of the manual mesh axes `x` varies over (empty outside shard_map)."""
    if x is None:
        return frozenset()
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def vma_of(*trees):
    """Union of the varying axes of every leaf of `trees` (None leaves ignored)."""
    axes = frozenset()
    for leaf in jax.tree.leaves(trees):
        axes |= vma(leaf)
    return axes


def cast_vma(tree, axes):
    """Every leaf of `tree` made varying over `axes` (only the axes it lacks)."""
    def cast(x):
        missing = tuple(sorted(frozenset(axes) - vma(x)))
        return lax.pcast(x, missing, to="varying") if missing else x
    return jax.tree.map(cast, tree) if axes else tree


def match_vma(tree, *like):
    """`tree` cast to vary over every axis some leaf of `like` varies over."""
    return cast_vma(tree, vma_of(*like))


def unify_vma(*trees):
    """All `trees` cast to one common varying set (the union of theirs): the inputs of a
    custom_vjp, so that its cotangents have the primals' types. Returns a tuple."""
    axes = vma_of(*trees)
    return tuple(cast_vma(t, axes) for t in trees)
