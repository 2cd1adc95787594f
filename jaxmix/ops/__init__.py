"""Numerical ops with interchangeable implementations (reference | xla | pallas | auto)."""
from jaxmix.ops.selective_scan import selective_scan

__all__ = ["selective_scan"]
