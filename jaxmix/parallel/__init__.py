"""Mesh, logical-axis rules and the shard_map code (ring attention, sequence-parallel scan)."""
from jaxmix.parallel.mesh import (AXES, DEFAULT_RULES, batch_sharding, make_mesh, mesh_shape,
                                  process_batch_slice, replicated, rules_of)

__all__ = ["AXES", "DEFAULT_RULES", "batch_sharding", "make_mesh", "mesh_shape", "process_batch_slice", "replicated",
           "rules_of"]
