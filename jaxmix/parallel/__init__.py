"""Mesh, logical-axis rules and the shard_map code (ring attention, sequence-parallel scan and delta rule)."""
from jaxmix.parallel.delta_parallel import sequence_parallel_gated_delta_rule
from jaxmix.parallel.mesh import (AXES, DEFAULT_RULES, batch_sharding, make_mesh, mesh_shape,
                                  process_batch_slice, rules_of)
from jaxmix.parallel.ring_attention import ring_attention, sequence_parallel_attention
from jaxmix.parallel.scan_parallel import (causal_conv, sequence_parallel_causal_conv,
                                           sequence_parallel_selective_scan)
from jaxmix.parallel.zigzag import from_zigzag, to_zigzag

__all__ = ["AXES", "DEFAULT_RULES", "batch_sharding", "causal_conv", "from_zigzag",
           "make_mesh", "mesh_shape", "process_batch_slice", "ring_attention", "rules_of",
           "sequence_parallel_attention", "sequence_parallel_causal_conv",
           "sequence_parallel_gated_delta_rule",
           "sequence_parallel_selective_scan", "to_zigzag"]
