"""Per-device launch settings of the GPU selective-scan kernels (selective_scan_gpu).

Each entry gives
  block_d     channels per program (a power of two): the program's state is
              [block_d, Np] fp32 in registers;
  chunk       steps per chunk: the forward saves the state at every chunk start, both
              kernels load a chunk's rows in one go before its recurrence, and the
              backward holds the chunk's chunk + 1 recomputed states in registers;
  num_warps   warps per program;
  num_stages  Triton's software-pipelining depth;
  prefetch    load the next chunk's rows before running the current one (True) or
              only the current chunk's rows at its start (False: fewer live registers).

TUNING is keyed by a substring of `jax.Device.device_kind` ("NVIDIA H100 80GB HBM3",
"NVIDIA H200", ...), matched case-insensitively in the table's order; DEFAULT serves
every other device (and the interpreter off GPU). All entries are provisional: they
were set from the register budget (about chunk * (4 + 2 Np / 4) row registers a thread
with 4 warps and Np = 16, twice that with prefetch), not measured; a GPU sweep of
block_d / chunk / num_warps is to replace them.
"""
import jax

DEFAULT = dict(block_d=32, chunk=16, num_warps=4, num_stages=1, prefetch=True)

TUNING = {
    "H200": dict(block_d=32, chunk=16, num_warps=4, num_stages=1, prefetch=True),
    "H100": dict(block_d=32, chunk=16, num_warps=4, num_stages=1, prefetch=True),
    "A100": dict(block_d=32, chunk=8, num_warps=4, num_stages=1, prefetch=True),
}


def _first_device_kind():
    """The first device's kind string ("cpu" off GPU)."""
    return jax.devices()[0].device_kind


def settings(device_kind=None):
    """The settings dict (a copy) for a device kind (default: the first device's): the
    first TUNING entry whose key occurs in it, else DEFAULT."""
    kind = (_first_device_kind() if device_kind is None else device_kind).lower()
    for key, entry in TUNING.items():
        if key.lower() in kind:
            return dict(entry)
    return dict(DEFAULT)
