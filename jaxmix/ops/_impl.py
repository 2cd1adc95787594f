"""Choosing an implementation: the one place that maps impl="auto" to a backend."""
import jax

IMPLS = ("reference", "xla", "pallas", "auto")


def resolve(impl: str, op: str) -> str:
    """Returns the concrete implementation for `impl` on the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    return "pallas" if jax.default_backend() == "tpu" else "xla"
