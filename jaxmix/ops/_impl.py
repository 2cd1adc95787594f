"""Choosing an implementation: the one place that maps impl="auto" to a backend."""
import jax

IMPLS = ("reference", "xla", "pallas", "auto")


def resolve(impl: str, op: str, gpu: str = "xla") -> str:
    """Returns the concrete implementation for `impl` on the default backend: "auto" is
    "pallas" on TPU, `gpu` on GPU and "xla" elsewhere (the CPU)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    return {"tpu": "pallas", "gpu": gpu}.get(jax.default_backend(), "xla")
