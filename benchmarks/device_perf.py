"""Performance figures for one GPU session, as JSON lines on stdout (logs on stderr):

  python benchmarks/device_perf.py [--budget 450]   # on the GPU
  python benchmarks/device_perf.py --dry-run        # every section, toy sizes, on the CPU

Sections, in order; each writes its rows (flushed) as soon as it has them, so a run cut
off by a timeout still returns what it measured. Every row carries "check", "backend"
and "device_kind" (benchmarks/device_check.py's rows); a section or setting that raises
becomes one row with "ok": false and "error", and the script goes on.
  env               jax / jaxlib versions, device kind, count and memory, the vendor peaks
                    of this kind and the measured ones (benchmarks/roofline.py).
  scan_sweep        forward of jaxmix.ops.scan_pallas_gpu.selective_scan_pallas_gpu at
                    B 8, L 2048, D 1536, N 16, bf16 over block_d x num_warps x chunk
                    (the default setting first, then those nearest it), then forward +
                    backward of the 3 fastest forward settings; roofline fields of the
                    GPU scan kernel's cost estimate for that setting's block_d and
                    chunk on every row.
  scan              device_check's scan figure (fwd+bwd of <scan(x), w> w.r.t. every
                    input, GB/s as device_check counts them) of ops.selective_scan's
                    default impl and of the chosen setting (the fastest fwd+bwd of the
                    sweep), with roofline fields.
  train_step        device_check's mamba_lm:130m train step (8 x 2048 tokens) with
                    model.remat "none", "block" and "save_kernels": step time,
                    tokens/s, MFU, compile time; the last also writes a 2-step jax.profiler trace, copied flat into $OUT when
                    OUT is set (else left in a temp dir), its files named in the row.
  attention_packed  causal attention over packed rows (segment ids, several documents a
                    row) fwd+bwd through ops.attention impl "xla", "pallas", "auto" and
                    cuDNN (jax.nn.dot_product_attention(implementation="cudnn") with the
                    segment mask), TFLOP/s of useful work (FlashAttention-2's count over
                    each document's causal triangle), roofline fields of the flash
                    kernel's estimate for the whole causal row (work_from for the routes
                    that are not that kernel). A "pallas" route that would run
                    interpreted on an accelerator is skipped.
  budget            settings or a section not started because the elapsed time had
                    passed that phase's share of --budget (SHARE): which ones, and the
                    elapsed seconds.
  summary           all ok, the failed rows, total seconds.
--dry-run runs on the CPU at toy sizes (two forward sweep points, one fwd+bwd), the
Pallas kernels in interpret mode, the smoke model: every section's rows in about a
minute on 2 cores.
"""
import argparse
import glob
import importlib.metadata
import itertools
import os
import shutil
import sys
import tempfile
import time

if "--dry-run" in sys.argv:  # before jax is imported
    os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import device_check as dc  # noqa: E402 (sets up a CPU host first)
from benchmarks import roofline  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmix import ops  # noqa: E402
from jaxmix.ops.attention import choose_impl  # noqa: E402
from jaxmix.ops.scan_pallas_gpu import selective_scan_pallas_gpu  # noqa: E402
from jaxmix.ops.selective_scan import resolve_impl  # noqa: E402

SIZES = {
    "full": dict(scan=(8, 2048, 1536, 16), block_d=(16, 32, 64), num_warps=(2, 4, 8),
                 chunk=(8, 16, 32, 64), top=3, iters=10,
                 train=("configs/mamba_lm.py:130m", 8, 2048), steps=(2, 5),
                 attn=(2, 4096, 16, 128), docs=6),
    "dry": dict(scan=(1, 16, 16, 4), block_d=(16,), num_warps=(4,), chunk=(8, 16), top=1,
                iters=1, train=("configs/mamba_lm.py:smoke", 2, 32), steps=(1, 1),
                attn=(1, 64, 2, 32), docs=3),
}
# The elapsed share of --budget up to which each phase may start another setting.
SHARE = {"scan_sweep fwd": 0.30, "scan_sweep fwd_bwd": 0.38, "scan": 0.45,
         "train_step": 0.85, "attention_packed": 1.0}
REMATS = ("none", "block", "save_kernels")  # the model.remat policies the step runs with
TRACE_FILES = ("*.xplane.pb", "perfetto_trace.json.gz")


class Budget:
    def __init__(self, seconds):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.t0

    def allows(self, phase, skipped):
        """True while the elapsed time is under `phase`'s share; else reports a budget
        row naming `skipped` (the settings or section not run) and returns False."""
        if self.elapsed() < SHARE[phase] * self.seconds:
            return True
        dc.report("budget", phase=phase, skipped=skipped, elapsed_s=self.elapsed(),
                  budget_s=self.seconds, share=SHARE[phase])
        return False


def environment():
    dev = jax.devices()[0]
    stats = (dev.memory_stats() or {}) if hasattr(dev, "memory_stats") else {}
    spec = roofline.spec_peaks(dev.device_kind)
    measured_flops, measured_bw = roofline.measured_peaks()
    return dict(ok=True, jax=jax.__version__, jaxlib=importlib.metadata.version("jaxlib"),
                device_count=jax.device_count(), local_devices=jax.local_device_count(),
                platform_version=getattr(dev.client, "platform_version", None),
                compute_capability=getattr(dev, "compute_capability", None),
                memory_bytes_limit=stats.get("bytes_limit"),
                memory_bytes_in_use=stats.get("bytes_in_use"),
                spec_peak_flops=spec and spec[0], spec_peak_bw=spec and spec[1],
                measured_matmul_flops=measured_flops, measured_copy_bw=measured_bw,
                peak_source=roofline.device_peaks()[2])


# ------------------------------------------------------------------------ scan sweep
def scan_args(shape):
    args = dc.scan_inputs(*shape, dtype=jnp.bfloat16)
    del args["initial_state"]  # as the Mamba mixer trains: no states in or out
    return args


def default_setting():
    """The GPU scan kernel's default (block_d, num_warps, chunk) on this device."""
    try:
        from kernels_pallas import scan_gpu_tuning
        s = scan_gpu_tuning.settings()
        return s["block_d"], s["num_warps"], s["chunk"]
    except ImportError:  # the wrapper's constants, before a tuning table
        from jaxmix.ops import scan_pallas_gpu as wrapper
        return getattr(wrapper, "BLOCK_D", 32), 4, getattr(wrapper, "CHUNK", 64)


def gpu_scan(**setting):
    return lambda a: selective_scan_pallas_gpu(**a, delta_softplus=True, **setting)


def sweep_row(shape, args, setting, backward, iters):
    fn = gpu_scan(**setting)
    if backward:
        w = dc.normal(99, args["u"].shape, jnp.bfloat16)
        grad = jax.grad(lambda x, w: jnp.vdot(fn(x), w).astype(jnp.float32))
        sec, best = dc.median_seconds(grad, (args, w), iters)
    else:
        sec, best = dc.median_seconds(fn, (args,), iters)
    return dict(**setting, ok=True, seconds=sec, min_seconds=best,
                **roofline.fields(sec, "selective_scan_gpu", *shape, backward=backward,
                                  dtype_bytes=2, block_d=setting["block_d"],
                                  chunk=setting["chunk"]))


def scan_sweep(size, budget):
    """Returns the chosen setting: the fastest fwd+bwd (else forward) one measured."""
    shape, iters = size["scan"], size["iters"]
    args = scan_args(shape)
    default = default_setting()
    grid = list(itertools.product(size["block_d"], size["num_warps"], size["chunk"]))
    # The default first, then one changed coordinate, then two, ...: a run cut short by
    # the budget has still varied each knob on its own.
    grid = sorted(grid, key=lambda s: sum(a != b for a, b in zip(s, default)))
    label = dict(shape=dict(zip("BLDN", shape)), dtype="bfloat16")
    fwd_times, times = {}, {}
    for pass_, settings in (("fwd", grid), ("fwd_bwd", None)):
        if settings is None:  # the fastest forward settings, fwd+bwd
            fwd_times, times = times, {}
            settings = sorted(fwd_times, key=fwd_times.get)[:size["top"]]
        for i, (block_d, warps, chunk) in enumerate(settings):
            if not budget.allows(f"scan_sweep {pass_}", [f"{pass_} block_d={b} num_warps="
                                                          f"{w} chunk={c}"
                                                          for b, w, c in settings[i:]]):
                break
            setting = dict(block_d=block_d, num_warps=warps, chunk=chunk)
            where = dict(setting, **label, is_default=(block_d, warps, chunk) == default,
                         **{"pass": pass_})
            row = {}

            def one(setting=setting, row=row, where=where):
                row.update(sweep_row(shape, args, setting, pass_ == "fwd_bwd", iters))
                return {**row, **where}
            dc.guarded("scan_sweep", where, one)
            if row:
                times[block_d, warps, chunk] = row["seconds"]
        if not times:
            break
    times = times or fwd_times
    best = min(times, key=times.get) if times else None
    return dict(zip(("block_d", "num_warps", "chunk"), best)) if best else None


def scan_figure(size, chosen):
    """device_check's scan_speed row for the default impl and the chosen setting."""
    shape = bsz, length, d, n = size["scan"]
    default_impl = resolve_impl("auto")
    kernel = roofline.scan_kernel()
    fns = {f"ops.selective_scan ({default_impl})":
           lambda a: ops.selective_scan(**a, delta_softplus=True)}
    if chosen:
        fns["selective_scan_pallas_gpu " + " ".join(f"{k}={v}" for k, v in chosen.items())] = \
            gpu_scan(**chosen)
    else:
        fns["selective_scan_pallas_gpu (chosen)"] = "no sweep setting was measured"

    def extra(name, sec):
        if name.startswith("ops."):
            work = None if default_impl == "pallas" else f"kernels_pallas.{kernel}"
            return roofline.fields(sec, kernel, *shape, backward=True, dtype_bytes=2,
                                   work_from=work)
        return roofline.fields(sec, "selective_scan_gpu", *shape, backward=True,
                               dtype_bytes=2, block_d=chosen["block_d"],
                               chunk=chosen["chunk"])
    nbytes = (11 * bsz * length * d + 6 * bsz * length * n) * 2  # device_check's count
    dc.speed_rows("scan", fns, scan_args(shape), nbytes / 1e9, "gbps", size["iters"],
                  extra=extra, shape=dict(zip("BLDN", shape)), dtype="bfloat16",
                  setting=chosen, gb_counted=nbytes / 1e9)


# ------------------------------------------------------------------------ train step
def keep_trace(trace_dir):
    """Copies the trace's files flat into $OUT (set: files deeper than two folders don't
    come back from a device run); returns the paths that hold them."""
    found = [p for pat in TRACE_FILES
             for p in glob.glob(os.path.join(trace_dir, "**", pat), recursive=True)]
    out = os.environ.get("OUT")
    if not out:
        return found
    kept = []
    for path in found:
        name = "train_trace." + ("xplane.pb" if path.endswith(".xplane.pb")
                                 else os.path.basename(path))
        kept.append(shutil.copy(path, os.path.join(out, name)))
    return kept


def train_steps(size, budget):
    spec = size["train"][0]
    values = REMATS
    for i, remat in enumerate(values):
        if not budget.allows("train_step", [f"remat={v!r}" for v in values[i:]]):
            return
        trace = i == len(values) - 1

        def one(remat=remat, trace=trace):
            trace_dir = tempfile.mkdtemp(prefix="device_perf_trace_") if trace else None
            row = dc.train_step(size, remat=remat, trace_dir=trace_dir)
            if trace:
                files = keep_trace(trace_dir)
                row.update(trace_dir=trace_dir, trace_files=files,
                           trace_bytes=sum(os.path.getsize(f) for f in files))
            return dict(row, remat_requested=remat)
        dc.guarded("train_step", dict(config=spec, remat_requested=remat), one)


# ------------------------------------------------------------------ packed attention
def packed_segments(bsz, length, docs):
    """segment ids [B, L] int32: each row `docs` documents of random lengths, and the
    useful causal pair count: sum over documents of len^2 / 2."""
    rng = np.random.default_rng(7)
    ids, pairs = np.zeros((bsz, length), np.int32), 0.0
    for b in range(bsz):
        cuts = np.sort(rng.choice(np.arange(1, length), docs - 1, replace=False))
        bounds = np.concatenate([[0], cuts, [length]])
        for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            ids[b, lo:hi] = j
            pairs += (hi - lo) ** 2 / 2
    return jnp.asarray(ids), pairs


def lowers_to_kernel(fn, args):
    """Whether fn(args) compiles to a Pallas kernel call (not the interpreter)."""
    text = jax.jit(fn).lower(args).as_text()
    return any(t in text for t in ("__gpu$xla.gpu.triton", "mosaic_gpu", "tpu_custom_call"))


def attention_packed(size):
    bsz, length, heads, dim = size["attn"]
    seg, pairs = packed_segments(bsz, length, size["docs"])
    qkv = dc.qkv_inputs(bsz, length, heads, heads, dim, jnp.bfloat16)
    route = lambda impl: lambda a: ops.attention(a["q"], a["k"], a["v"], causal=True,
                                                 segment_ids=seg, impl=impl)
    fns = {impl: route(impl) for impl in ("xla", "pallas", "auto")}
    if dc.BACKEND != "tpu" and dc.BACKEND != "cpu" and not lowers_to_kernel(fns["pallas"],
                                                                            qkv):
        fns["pallas"] = f"the Pallas attention kernels run interpreted on {dc.BACKEND}"
    if dc.BACKEND == "gpu":
        fns["cudnn"] = lambda a: jax.nn.dot_product_attention(  # mask [B, 1, L, L]
            a["q"], a["k"], a["v"], mask=seg[:, None, :, None] == seg[:, None, None, :],
            is_causal=True, implementation="cudnn")
    else:
        fns["cudnn"] = "cuDNN needs a GPU"
    useful = 3.5 * 4 * heads * dim * pairs  # forward 4 * H * D per pair, backward 2.5x
    resolved = choose_impl("auto", qkv["q"], qkv["k"], causal=True, segment_ids=seg)

    def extra(name, sec):
        work = None if name == "pallas" or (name == "auto" and resolved == "pallas") \
            else "kernels_pallas.flash_attention"
        return dict(roofline.fields(sec, "flash_attention", bsz, heads, length, length, dim,
                                    causal=True, backward=True, dtype_bytes=2,
                                    work_from=work),
                    resolved=resolved if name == "auto" else name)
    dc.speed_rows("attention_packed", fns, qkv, useful / 1e12, "tflops", size["iters"],
                  extra=extra, shape=dict(B=bsz, L=length, H=heads, D=dim),
                  docs_per_row=size["docs"], causal=True, dtype="bfloat16",
                  useful_flops=useful)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds; each phase starts settings only within its share")
    ap.add_argument("--dry-run", action="store_true",
                    help="toy sizes on the CPU, interpreted kernels (a CI check)")
    a = ap.parse_args()
    size = SIZES["dry" if a.dry_run else "full"]
    dc.json_stdout()
    budget = Budget(a.budget)
    dc.guarded("env", {}, environment)
    chosen = {}
    if budget.allows("scan_sweep fwd", ["scan_sweep"]):
        dc.guarded("scan_sweep", {}, lambda: chosen.update(
            setting=scan_sweep(size, budget)))
    if budget.allows("scan", ["scan"]):
        dc.guarded("scan", {}, lambda: scan_figure(size, chosen.get("setting")))
    if budget.allows("train_step", ["train_step"]):
        dc.guarded("train_step", {}, lambda: train_steps(size, budget))
    if budget.allows("attention_packed", ["attention_packed"]):
        dc.guarded("attention_packed", {}, lambda: attention_packed(size))
    failed = [r["check"] + (f":{r['impl']}" if "impl" in r else "") for r in dc.ROWS
              if r.get("ok") is False]
    dc.report("summary", ok=not failed, failed=failed, seconds=budget.elapsed(),
              dry_run=a.dry_run)


if __name__ == "__main__":
    main()
