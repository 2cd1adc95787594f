"""Running well on a CPU host: freed memory kept mapped, one device per core, and
compiler options for the host's vector width. All three matter only on the CPU backend
and are no-ops elsewhere; train.py and the benchmarks apply them before JAX starts.

Freed memory. XLA:CPU allocates a step's temp buffer (hundreds of MB for a small LM)
with malloc on one of its runtime threads and frees it at the end. glibc serves such a
request from a per-thread arena by mmap and returns it with munmap, so the next step
touches fresh pages: on this project's 2-core CPU machine the Mamba LM step spent about
a third of its CPU time in minor page faults (365 MB re-faulted per step,
`getrusage().ru_minflt`).

`keep_freed_memory()` sets glibc's malloc to one arena, no mmap for large blocks and no
trimming, so freed buffers are reused as they are. The process then keeps its peak heap
for its lifetime, the usual trade for a training process (the same as running with
`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`). It must run before
JAX starts its threads (before the first computation). A no-op on non-glibc systems and
when JAXMIX_KEEP_FREED_MEMORY=0.

One device per core. Within one XLA:CPU device the time steps of the selective scan are
small fused loops that gain nothing from a second core (the Mamba LM step's scan takes
the same time on one core as on two). Exposing each core as its own CPU device and
running the step data-parallel over them puts every core to work on its own part of the
batch: the Mamba LM train step at batch 8 goes from 0.35 s to about 0.27 s on this
project's 2-core machine. `use_cores_as_devices(devices_for_batch(batch))` does that
when JAX has not been told otherwise (XLA_FLAGS with
--xla_force_host_platform_device_count, or jax_num_cpu_devices).

Vector width. XLA:CPU emits 256-bit loops by default; on AVX-512 hosts 512-bit loops
make the step about 5% faster (`compiler_options`).

Whole loops. XLA:CPU runs a while loop as a sequence of runtime tasks per iteration,
one per fused op. With two devices in one process the selective scan's loops ran about
1.5x slower than on a core of their own (profiled; most likely a device's next task
starting on the other core, away from the scan state in its cache). XLA:CPU compiles a
loop whose one iteration touches fewer than `xla_cpu_small_while_loop_byte_threshold`
bytes (default 1 KiB) into a single function instead; `compile_loops_whole()` raises
that threshold (an XLA_FLAGS backend option, so for the whole process) for training
processes. The Mamba LM train step on 2 CPU devices gets 7 to 10% faster and the
transformer's about 4%, but batch-1 Mamba decoding gets about 17% slower, which is why
only training processes (train.py, the train benchmarks) set it.
"""
import ctypes
import ctypes.util
import functools
import os
import re

# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def keep_freed_memory():
    """Returns True when glibc's malloc was reconfigured."""
    if os.environ.get("JAXMIX_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without it)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0)
    # glibc reads the threshold as a size_t, so -1 is SIZE_MAX: never trim the heap.
    ok = ok and mallopt(M_TRIM_THRESHOLD, -1)
    return bool(ok)


def cores():
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def devices_for_batch(batch_size, cap=0):
    """The largest device count, at most one per core (and at most `cap` when > 0),
    that divides `batch_size`."""
    limit = min(cores(), cap) if cap > 0 else cores()
    return max(d for d in range(1, limit + 1) if batch_size % d == 0)


def use_cores_as_devices(n):
    """Before JAX initialises: make `n` CPU devices. Returns False (and changes nothing)
    when JAX was already told how many to make, or is already running."""
    import jax
    flags = os.environ.get("XLA_FLAGS", "")
    if ("xla_force_host_platform_device_count" in flags or jax.config.jax_num_cpu_devices > 0
            or _backend_started()):
        return False
    jax.config.update("jax_num_cpu_devices", int(n))
    return True


# Per-iteration bytes below which a while loop is compiled whole: covers the selective
# scan's loops up to about 64 sequences of 512 channels x 16 states per device.
WHOLE_LOOP_BYTES = 64 << 20


def compile_loops_whole(threshold=WHOLE_LOOP_BYTES):
    """Before JAX starts: have XLA:CPU compile every while loop whose one iteration
    touches fewer than `threshold` bytes into one function (see the module docstring).
    Returns False (and changes nothing) when XLA_FLAGS already sets backend options,
    when JAXMIX_WHOLE_LOOPS=0, or when JAX is already running."""
    flags = os.environ.get("XLA_FLAGS", "")
    if ("xla_backend_extra_options" in flags or os.environ.get("JAXMIX_WHOLE_LOOPS") == "0"
            or _backend_started()):
        return False
    option = f"--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold={threshold}"
    os.environ["XLA_FLAGS"] = f"{flags} {option}".strip()
    return True


def prepare_training_host(config):
    """train.py's set-up of a single-process run, before JAX starts: freed memory kept
    mapped, while loops compiled whole, and one CPU device per core (capped by
    train.cpu_devices; 1 turns it off) when the batch and the config's mesh can use
    them. Returns the lines to report: a train.cpu_devices this host or the batch
    cannot honour, and the count used instead."""
    from jaxmix.errors import ConfigError
    from jaxmix.parallel.mesh import mesh_shape
    keep_freed_memory()
    compile_loops_whole()
    cap, batch = int(config.train.get("cpu_devices", 0)), config.train.batch_size
    n = devices_for_batch(batch, cap)
    try:
        mesh_shape(config.mesh, n)
    except ConfigError:  # a mesh fixed to other sizes: leave the devices as they are
        return []
    if n > 1 and not use_cores_as_devices(n):
        return []  # the device count was set another way (XLA_FLAGS, jax config)
    using = f"using {n} CPU device{'s' if n > 1 else ''}"
    if cap > cores():
        return [f"train.cpu_devices={cap} is more than this host's {cores()} cores; {using}"]
    if cap > 1 and n < cap:
        return [f"train.cpu_devices={cap}: train.batch_size={batch} is not divisible by "
                f"{cap}; {using}"]
    return []


def host_memory_bytes():
    """This machine's memory as this process may use it: the physical memory, or a
    smaller cgroup (container) limit."""
    sizes = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                sizes.append(int(f.read().strip()))
        except (OSError, ValueError):  # absent, or "max" (no limit)
            pass
    return min(sizes)


def on_cpu():
    """True when JAX computes on the CPU backend: the CPU-only speed pieces (the
    polynomial softplus and exp2 of the selective scan, `linear`'s hand-written
    backward, the one-vector gradient all-reduce) are used only then; TPU and GPU
    get the plain XLA ops, which their compilers fuse and overlap on their own."""
    import jax
    return jax.default_backend() == "cpu"


def _backend_started():
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()


def compiler_options(devices):
    """XLA compiler options for a jit over `devices` (a sequence): 512-bit loops on
    AVX-512 CPUs, None elsewhere."""
    if len(devices) == 0 or devices[0].platform != "cpu" or not _has_avx512():
        return None
    return {"xla_cpu_prefer_vector_width": 512}


@functools.lru_cache(maxsize=None)
def _has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"\bavx512f\b", f.read()) is not None
    except OSError:
        return False
