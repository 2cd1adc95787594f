"""Relaxed atomic float add for Triton-backend Pallas kernels.

`pallas.triton.atomic_add` lowers to `tt.atomic_rmw fadd` with acquire-release
ordering, which on NVIDIA GPUs adds memory fences around every atomic. Adding
independent partial sums into an output needs atomicity only, so `atomic_add`
here lowers to the same op with relaxed ordering (`tt.atomic_rmw fadd, relaxed,
gpu`). It is a primitive of its own that shares Pallas' atomic typing and its
interpret-mode rule (a read-add-write of the indexed block) and has its own
Triton lowering rule; both come from JAX internals, so when those are missing
(another JAX version) `atomic_add` is `pallas.triton.atomic_add` and RELAXED is
False.
"""
from jax.experimental.pallas import triton as pltriton

try:
    from jax._src import core as _core
    from jax._src import tree_util as _tree_util
    from jax._src.lib.triton import dialect as _tt
    from jax._src.pallas.triton import lowering as _lowering
    from jax._src.pallas.triton import primitives as _prims
    from jax._src.state import discharge as _discharge
    from jax._src.state import primitives as _state_prims
    from jax._src.state import indexing as _indexing
    _ADD = _prims.AtomicOpType.ADD
    _needed = (_lowering.register_lowering, _lowering._compute_pointers_from_indices,
               _lowering._ensure_ir_value, _lowering._atomic_rmw, _prims._atomic_abstract_eval,
               _prims._atomic_rmw_discharge_rule, _tt.MemSemantic.RELAXED, _tt.RMWOp.FADD)
except (ImportError, AttributeError):
    _needed = None

RELAXED = _needed is not None


if RELAXED:
    relaxed_add_p = _core.Primitive("atomic_add_relaxed")
    relaxed_add_p.def_effectful_abstract_eval(_prims._atomic_abstract_eval)
    _discharge.register_discharge_rule(relaxed_add_p)(_prims._atomic_rmw_discharge_rule)

    @_lowering.register_lowering(relaxed_add_p)
    def _relaxed_add_lowering(ctx, *args_flat, args_tree, atomic_type):
        """ref[idx] += val as tt.atomic_rmw fadd with relaxed ordering at GPU scope."""
        del atomic_type
        ptr, transforms, val, mask = args_tree.unflatten(args_flat)
        *_, val_aval, _ = args_tree.unflatten(ctx.avals_in)
        if mask is not None or len(transforms) != 1 or not isinstance(
                transforms[0], _indexing.NDIndexer):
            raise NotImplementedError("relaxed atomic_add: one indexer, no mask")
        ptr = _lowering._compute_pointers_from_indices(ptr, ctx.block_infos[0], transforms[0])
        val = _lowering._ensure_ir_value(val, val_aval)
        return _lowering._atomic_rmw(_tt.RMWOp.FADD, ptr, val,
                                     semantic=_tt.MemSemantic.RELAXED)

    def atomic_add(ref, idx, val):
        """ref[idx] += val atomically (relaxed ordering); float refs, no mask."""
        ref, transforms = _state_prims.get_ref_and_transforms(ref, idx, "atomic_add")
        args_flat, args_tree = _tree_util.tree_flatten((ref, transforms, val, None))
        return relaxed_add_p.bind(*args_flat, args_tree=args_tree, atomic_type=_ADD)
else:
    def atomic_add(ref, idx, val):
        """ref[idx] += val atomically (Pallas' acquire-release atomic add)."""
        return pltriton.atomic_add(ref, idx, val)
