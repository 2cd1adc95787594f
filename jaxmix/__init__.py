"""jaxmix: long-sequence token mixers in JAX/Flax, with Pallas kernels."""
from jaxmix import models, ops, parallel

__version__ = "0.1.0"
__all__ = ["models", "ops", "parallel"]
