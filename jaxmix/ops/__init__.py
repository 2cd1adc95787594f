"""Numerical ops with interchangeable implementations (reference | xla | pallas | auto)."""
from jaxmix.ops.attention import attention, decode_attention
from jaxmix.ops.gated_delta import gated_delta_rule
from jaxmix.ops.selective_scan import selective_scan, selective_state_update

__all__ = ["attention", "decode_attention", "gated_delta_rule", "selective_scan",
           "selective_state_update"]
