"""Numerical ops with interchangeable implementations (reference | xla | pallas | auto)."""
from jaxmix.ops.attention import attention
from jaxmix.ops.selective_scan import selective_scan, selective_state_update

__all__ = ["attention", "selective_scan", "selective_state_update"]
