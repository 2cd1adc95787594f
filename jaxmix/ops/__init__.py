"""Numerical ops with interchangeable implementations (reference | xla | pallas | auto)."""
from jaxmix.ops.attention import attention
from jaxmix.ops.selective_scan import selective_scan

__all__ = ["attention", "selective_scan"]
